"""Running statements: plain SQL or pool.Prepared, on the caller's cursor."""

from __future__ import annotations

from decimal import Decimal

import orjson
import psycopg2.extras

from jobs import pool


def run(cur, statement: str | pool.Prepared, params=None) -> None:
    if isinstance(statement, pool.Prepared):
        statement.execute(cur, params)
    else:
        cur.execute(statement, params)


def fetch_one(cur, statement: str | pool.Prepared, params=None):
    run(cur, statement, params)
    return cur.fetchone()


def fetch_all(cur, statement: str | pool.Prepared, params=None) -> list[tuple]:
    run(cur, statement, params)
    return cur.fetchall()


def as_jsonb(value):
    return None if value is None else psycopg2.extras.Json(value, dumps=_dumps_text)


def _dumps_text(value) -> str:
    return json_bytes(value).decode()


def json_bytes(value) -> bytes:
    """``value`` as compact JSON, its numbers exactly as parse.load_body read them.

    Decimals (a body's fractions) and integers beyond 64 bits are written with
    all their digits; PostgreSQL's numeric (jsonb) keeps them so.
    """
    try:
        return orjson.dumps(value, default=_exact_number)
    except orjson.JSONEncodeError:
        # orjson refuses integers beyond 64 bits without asking ``default``.
        return orjson.dumps(_big_ints_exact(value), default=_exact_number)


def _exact_number(value):
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value))
    raise TypeError(f"{type(value).__name__} is not JSON")


def _big_ints_exact(value):
    if isinstance(value, dict):
        return {k: _big_ints_exact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_big_ints_exact(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return orjson.Fragment(str(value))
    return value
