"""The naive baseline: the Flask + psycopg2 code a first version would have.

One connection per worker process, ``SELECT *``, rows turned into dicts,
timestamps formatted one by one, ``json.dumps``; the list query is the
obvious ``status = ANY(...) ORDER BY id DESC``, and progress walks every
file in Python on every request. run.py measures the service against it in
the same run, and can also serve it in the service's place
(``--service naive``) so the harness can be exercised before the service
exists. It is deliberately unvalidated and unguarded: it is a yardstick,
not a service.
"""

import json
import os
from datetime import UTC

import psycopg2
from flask import Flask, Response, request

app = Flask(__name__)

ACTIVE = ["SCHEDULED", "RUNNING", "STOP_REQUESTED", "STOPPING"]
TERMINAL = ["COMPLETED", "STOPPED", "FAILED"]
ALIASES = {"active": ACTIVE, "terminal": TERMINAL, "all": ACTIVE + TERMINAL, "error": ["FAILED"]}

_conn = None


# NAIVE_CLIENT_DEADLINE=1: the same app with the service's client-side
# deadline (pool.wait, psycopg2's wait callback) on every query, so that
# run.py measures what the deadline costs a bare round trip.
DEADLINE = os.environ.get("NAIVE_CLIENT_DEADLINE") == "1"


if DEADLINE:
    import threading

    # Waits now yield to other requests of the worker, so the one connection
    # must be theirs one at a time (gevent makes this lock cooperative).
    _turn = threading.Lock()

    @app.before_request
    def _take_turn():
        _turn.acquire()

    @app.teardown_request
    def _give_turn(exc=None):
        _turn.release()


def db():
    # Opened lazily so that each gunicorn worker gets its own after the fork.
    global _conn
    if _conn is None or _conn.closed:
        if DEADLINE:
            from jobs import pool

            pool.install_wait_callback()
            _conn = psycopg2.connect(
                os.environ["DATABASE_URL"], connection_factory=pool.Connection
            )
            _conn.budget_s = 6.0  # the service's default: 5 s + DEADLINE_GRACE_S
        else:
            _conn = psycopg2.connect(os.environ["DATABASE_URL"])
        _conn.autocommit = True
    return _conn


def statuses(text: str) -> list[str]:
    result = []
    for token in text.split(","):
        token = token.strip().lower()
        result += ALIASES.get(token, [token.upper()])
    return result


def timestamp(value) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def job_dict(cur, row) -> dict:
    job = dict(zip([column.name for column in cur.description], row, strict=True))
    job["created_at"] = timestamp(job["created_at"])
    job["updated_at"] = timestamp(job["updated_at"])
    del job["idempotency_key"]
    return job


def as_json(payload, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json")


@app.get("/jobs")
def list_jobs():
    limit = int(request.args.get("limit", 50))
    wanted = statuses(request.args.get("status", "active"))
    last_job_id = request.args.get("last_job_id")
    cur = db().cursor()
    if last_job_id:
        cur.execute(
            "SELECT * FROM jobs WHERE status = ANY(%s) AND id < %s ORDER BY id DESC LIMIT %s",
            (wanted, int(last_job_id), limit + 1),
        )
    else:
        cur.execute(
            "SELECT * FROM jobs WHERE status = ANY(%s) ORDER BY id DESC LIMIT %s",
            (wanted, limit + 1),
        )
    jobs = [job_dict(cur, row) for row in cur.fetchall()]
    next_cursor = jobs[limit - 1]["id"] if len(jobs) > limit else None
    return as_json({"jobs": jobs[:limit], "next_cursor": next_cursor})


@app.get("/jobs/<int:job_id>")
def get_job(job_id: int):
    cur = db().cursor()
    cur.execute("SELECT * FROM jobs WHERE id = %s", (job_id,))
    row = cur.fetchone()
    if row is None:
        return as_json({"error_code": "JOB_NOT_FOUND", "error_message": "no such job"}, 404)
    return as_json(job_dict(cur, row))


@app.get("/jobs/<int:job_id>/progress")
def progress(job_id: int):
    cur = db().cursor()
    cur.execute("SELECT status FROM jobs WHERE id = %s", (job_id,))
    row = cur.fetchone()
    if row is None:
        return as_json({"error_code": "JOB_NOT_FOUND", "error_message": "no such job"}, 404)
    cur.execute(
        "SELECT table_name, start_block, end_block, size_bytes, block_hash, prev_hash"
        " FROM job_files WHERE job_id = %s ORDER BY table_name, start_block, id DESC",
        (job_id,),
    )
    tables: dict[str, dict] = {}
    tips: dict[str, str | None] = {}
    for table, start, end, size, block_hash, prev_hash in cur.fetchall():
        chain = tables.get(table)
        if chain is None:
            tables[table] = {
                "start_block": start,
                "current_block": end,
                "files_count": 1,
                "total_size_bytes": size,
            }
            tips[table] = block_hash
            continue
        hashes_agree = tips[table] is None or prev_hash is None or prev_hash == tips[table]
        if start == chain["current_block"] + 1 and hashes_agree:
            chain["current_block"] = end
            chain["files_count"] += 1
            chain["total_size_bytes"] += size
            tips[table] = block_hash
    return as_json({"job_id": job_id, "job_status": row[0], "tables": tables})


@app.post("/jobs/<int:job_id>/tables/<table>/files")
def register_files(job_id: int, table: str):
    files = request.get_json()
    if isinstance(files, dict):
        files = [files]
    with db().cursor() as cur:
        cur.execute(
            "INSERT INTO job_tables (job_id, table_name) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (job_id, table),
        )
        cur.executemany(
            "INSERT INTO job_files (job_id, table_name, file_name, start_block, end_block,"
            " size_bytes, block_hash, prev_hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            [
                (
                    job_id,
                    table,
                    f["file_name"],
                    f["start_block"],
                    f["end_block"],
                    f["size_bytes"],
                    f.get("block_hash"),
                    f.get("prev_hash"),
                )
                for f in files
            ],
        )
    return as_json({"registered": len(files)}, 201)


@app.delete("/jobs")
def delete_jobs():
    wanted = [s for s in statuses(request.args["status"]) if s in TERMINAL]
    cur = db().cursor()
    cur.execute("DELETE FROM jobs WHERE status = ANY(%s)", (wanted,))
    return Response(status=204)
