"""Running statements: plain SQL or pool.Prepared, on the caller's cursor."""

from __future__ import annotations

import json

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
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        # An integer beyond 64 bits (parse.load_body keeps it exact): PostgreSQL's
        # numeric holds it.
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
