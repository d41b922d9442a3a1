"""Helpers for the tests of attempts, fencing and automatic retries
(test_attempts.py, test_retries.py); the shared ones are in the other support modules.

- Workers: ``register``, ``leases_of`` (a heartbeat's leases, job_id -> attempt).
- Reports through a ``Call``: ``report`` (a status report, fenced when a node
  and attempt are given), ``register_files_as`` (a file registration, fenced
  the same way; unlike service.register_files, the answer is not checked).
- Retries without waiting for a clock: ``make_due`` pushes jobs' retry_at into
  the past, ``sweep_retries`` runs the retry chore once in process.
- ``retry_times``: a job's retry_at and updated_at as datetimes, from the database.
- ``rows_of``: every row of the job tables, to show a refusal changed nothing.
"""

from __future__ import annotations

import datetime
from urllib.parse import urlencode

import psycopg2

from dev.gunicorn import Call
from jobs import db
from jobs.chores import retries

JOB_TABLES = ("jobs", "job_events", "job_tables", "job_files")


def register(call: Call, node_id: str) -> None:
    code, body = call("PUT", f"/workers/{node_id}")
    assert code == 200, body


def leases_of(call: Call, node_id: str) -> dict[int, int]:
    """The worker's heartbeat: its leases as {job_id: attempt}."""
    code, body = call("POST", f"/workers/{node_id}/heartbeat")
    assert code == 200, body
    return {lease["job_id"]: lease["attempt"] for lease in body["leases"]}


def report(
    call: Call, job_id: int, status: str, node_id: str | None = None, attempt=None, **fields
) -> tuple[int, dict]:
    """PUT /jobs/{id}/status, naming the worker and attempt when given."""
    body = {"status": status, **fields}
    if node_id is not None:
        body["node_id"] = node_id
    if attempt is not None:
        body["attempt"] = attempt
    return call("PUT", f"/jobs/{job_id}/status", body)


def register_files_as(
    call: Call, job_id: int, table: str, files, node_id: str | None = None, attempt=None
) -> tuple[int, dict]:
    """POST /jobs/{id}/tables/{table}/files through ``call``, naming the worker and attempt
    (the query's node_id and attempt) when given: (status, body), unchecked."""
    query = {k: v for k, v in (("node_id", node_id), ("attempt", attempt)) if v is not None}
    suffix = f"?{urlencode(query)}" if query else ""
    return call("POST", f"/jobs/{job_id}/tables/{table}/files{suffix}", files)


def make_due(database_url: str, *job_ids: int) -> None:
    """Jobs waiting for a retry become due now (their retry_at a second ago)."""
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE jobs SET retry_at = now() - interval '1 second'"
                " WHERE id = ANY(%s) AND retry_at IS NOT NULL",
                (list(job_ids),),
            )
            assert cur.rowcount == len(set(job_ids)), "a job is not waiting for a retry"
    finally:
        conn.close()


def sweep_retries(app):
    """Run the retry chore once in process, unclaimed: (jobs retried, of which moved)."""
    with app.app_context(), db.transaction() as cur:
        done = retries.retry_due(cur, app.config)
    return done.retried, done.moved


def retry_times(conn, job_id: int) -> tuple[datetime.datetime | None, datetime.datetime]:
    with conn.cursor() as cur:
        cur.execute("SELECT retry_at, updated_at FROM jobs WHERE id = %s", (job_id,))
        return cur.fetchone()


def rows_of(conn) -> dict[str, list]:
    """Every row of the job tables (sorted), to compare before and after a refusal."""
    out = {}
    with conn.cursor() as cur:
        for table in JOB_TABLES:
            cur.execute(f"SELECT t::text FROM {table} t")
            out[table] = sorted(row[0] for row in cur.fetchall())
    return out
