"""Running statements: plain SQL or ``Prepared``, on the caller's cursor."""

from __future__ import annotations

import re
from decimal import Decimal

import orjson
import psycopg2.extras


class Prepared:
    """A statement prepared once per session, then only EXECUTEd, where sessions are ours.

    psycopg2 sends every query as text for the server to parse and plan anew;
    for the hot reads that planning costs as much as running them
    (BENCHMARKS.md, "How the service gets there"). ``sql``
    uses psycopg2's %(name)s placeholders; ``types`` names each parameter's
    SQL type, in order. Prepared statements outlive transactions, not the
    session: a new connection (pool.Connection.prepared empty) prepares again.
    Through a pooler (pool.Connection.direct false) the plain SQL runs instead.
    """

    def __init__(self, name: str, sql: str, **types: str):
        numbers = {param: f"${n}" for n, param in enumerate(types, start=1)}
        body = re.sub(r"%\((\w+)\)s", lambda m: numbers[m.group(1)], sql)
        self.name = name
        self.sql = sql
        self.prepare_sql = f"PREPARE {name} ({', '.join(types.values())}) AS {body}"
        self.execute_sql = f"EXECUTE {name} ({', '.join(f'%({p})s' for p in types)})"

    def execute(self, cur, params) -> None:
        conn = cur.connection
        if not getattr(conn, "direct", False):
            cur.execute(self.sql, params)
            return
        if self.name not in conn.prepared:
            cur.execute(self.prepare_sql)
            conn.prepared.add(self.name)
        cur.execute(self.execute_sql, params)


def run(cur, statement: str | Prepared, params=None) -> None:
    if isinstance(statement, Prepared):
        statement.execute(cur, params)
    else:
        cur.execute(statement, params)


def fetch_one(cur, statement: str | Prepared, params=None):
    run(cur, statement, params)
    return cur.fetchone()


def fetch_all(cur, statement: str | Prepared, params=None) -> list[tuple]:
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
