"""The Jobs service: see, stop, clean up and follow extraction jobs.

CONTRACT.md is the specification. Read top to bottom: errors, the database
handle, the SQL (every state guard is one statement), the routes, then the
per-request plumbing (request IDs, auth, logs, metrics) and the factory.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import logging
import os
import re
import time

import click
import orjson
import psycopg2
import psycopg2.extras
from flask import Blueprint, Flask, current_app, g, request
from flask.cli import with_appcontext
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

import chain
import db
import observability
import openapi
from schemas import (
    ACTIVE_STATUSES,
    DEFAULT_PAGE_SIZE,
    DELETE_STATUS_TOKENS,
    LIST_STATUS_TOKENS,
    MAX_JOB_ID,
    MAX_PAGE_SIZE,
    STATUSES,
    TERMINAL_STATUSES,
    TRANSITIONS,
    BulkDeleteSchema,
    CreateJobSchema,
    DeleteJobsQuerySchema,
    ErrorSchema,
    EventListSchema,
    FileBatchSchema,
    FilesRegisteredSchema,
    HealthSchema,
    JobListSchema,
    JobSchema,
    ListJobsQuerySchema,
    ProgressSchema,
    StatusReportSchema,
    is_table_name,
    parse_job_id,
    parse_status_tokens,
)

log = logging.getLogger("jobs")

# ---- Errors ----------------------------------------------------------------


class ApiError(Exception):
    """An answer of the route's fixed set of errors: {"error_code", "error_message"}."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def json_response(body, status: int = 200, headers=None):
    """``body`` is bytes of JSON already (often built by PostgreSQL) or a JSON-able value."""
    if not isinstance(body, bytes | str):
        body = orjson.dumps(body)
    return current_app.response_class(body, status, headers, content_type="application/json")


def error_response(status: int, code: str, message: str, headers=None):
    return json_response({"error_code": code, "error_message": message}, status, headers)


def job_id_from_path(text: str) -> int:
    job_id = parse_job_id(text)
    if job_id is None:
        raise ApiError(400, "INVALID_JOB_ID", "job id must be an integer in 1..9223372036854775807")
    return job_id


def job_not_found(job_id: int) -> ApiError:
    return ApiError(404, "JOB_NOT_FOUND", f"job {job_id} not found")


def describe_validation_error(messages, prefix: str = "") -> str:
    """Flatten marshmallow's nested messages into 'field: problem; other: problem'."""
    if isinstance(messages, dict):
        parts = []
        for key, value in messages.items():
            if key == "_schema":
                name = prefix or "body"
            elif isinstance(key, int):
                name = f"{prefix}[{key}]"
            else:
                name = f"{prefix}.{key}" if prefix else str(key)
            parts.append(describe_validation_error(value, name))
        return "; ".join(parts)
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return f"{prefix or 'body'}: {' '.join(messages)}"
    if isinstance(messages, list):
        return "; ".join(describe_validation_error(m, prefix) for m in messages)
    return f"{prefix or 'body'}: {messages}"


LONG_NUMBER = re.compile(rb"\d{20}")
MAX_JSON_DEPTH = 100


def json_depth(value) -> int:
    """How deeply arrays and objects nest in a parsed JSON document (without recursion)."""
    deepest, pending = 0, [(value, 0)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        deepest = max(deepest, depth + 1)
        pending.extend((item, depth + 1) for item in value)
    return deepest


def load_body(schema):
    """Parse the request body as JSON (whatever its Content-Type) into ``schema``."""
    raw = request.get_data(cache=False)
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    # A chunked body (no Content-Length): Werkzeug stops reading at the limit and
    # hands over what it read; one more byte on the wire means it was too large.
    if (
        request.content_length is None
        and limit is not None
        and len(raw) >= limit
        and request.environ["wsgi.input"].read(1)
    ):
        raise RequestEntityTooLarge()
    if not raw.strip():
        raise ApiError(400, "INVALID_PAYLOAD_FORMAT", "request body is empty; JSON expected")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(
            400, "INVALID_PAYLOAD_FORMAT", f"request body is not valid JSON: {exc}"
        ) from None
    # Checked before anything walks the document recursively (the stdlib
    # parser below, the schemas' checks), which a deeper one would exhaust.
    if json_depth(data) > MAX_JSON_DEPTH:
        raise ApiError(
            400,
            "INVALID_PAYLOAD_FORMAT",
            f"request body is nested deeper than {MAX_JSON_DEPTH} levels",
        )
    if LONG_NUMBER.search(raw):
        # orjson turns integers beyond 64 bits into floats, silently losing
        # digits of a descriptor; the stdlib keeps them exact. orjson has
        # already refused what is not strict JSON (NaN, lone surrogates).
        data = json.loads(raw)
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise ApiError(
            400, "INVALID_PAYLOAD_FORMAT", describe_validation_error(exc.messages)
        ) from None


# ---- The database handle ---------------------------------------------------


def get_pool() -> db.ConnectionPool:
    """The process's pool, created on first use: after gunicorn forks, never before."""
    pool = current_app.extensions.get("jobs_db_pool")
    if pool is None or pool.pid != os.getpid():
        cfg = current_app.config
        pool = db.ConnectionPool(
            cfg["DATABASE_URL"],
            max_size=cfg["DB_POOL_SIZE"],
            wait_timeout=cfg["DB_POOL_TIMEOUT_S"],
            **connect_options(cfg),
        )
        current_app.extensions["jobs_db_pool"] = pool
    return pool


def connect_options(cfg) -> dict:
    return {
        "connect_timeout": cfg["DB_CONNECT_TIMEOUT_S"],
        "application_name": "jobs-service",
        # Generic plans for the prepared statements (db.Prepared): each one's
        # plan is chosen for it, and re-planning per call is what preparing
        # saves. Plain SQL is planned per call whatever this says.
        "options": f"-c statement_timeout={int(cfg['STATEMENT_TIMEOUT_MS'])}"
        " -c plan_cache_mode=force_generic_plan",
        # A peer that vanishes (no RST) must fail requests in seconds, not minutes.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": int(cfg["STATEMENT_TIMEOUT_MS"]) + 5000,
    }


def get_db():
    if "db" not in g:
        g.db = get_pool().getconn()
    return g.db


def release_db(exc=None):
    conn = g.pop("db", None)
    if conn is not None:
        get_pool().putconn(conn, broken=isinstance(exc, psycopg2.InterfaceError))


def query_one(sql: str | db.Prepared, params=None):
    with get_db().cursor() as cur:
        _execute(cur, sql, params)
        return cur.fetchone()


def query_all(sql: str | db.Prepared, params=None) -> list[tuple]:
    with get_db().cursor() as cur:
        _execute(cur, sql, params)
        return cur.fetchall()


def _execute(cur, sql: str | db.Prepared, params) -> None:
    if isinstance(sql, db.Prepared):
        sql.execute(cur, params)
    else:
        cur.execute(sql, params)


def as_jsonb(value):
    return None if value is None else psycopg2.extras.Json(value, dumps=_dumps_text)


def _dumps_text(value) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        # An integer beyond 64 bits (see load_body): PostgreSQL's numeric holds it.
        return json.dumps(value, ensure_ascii=False, allow_nan=False)


# ---- SQL -------------------------------------------------------------------
# PostgreSQL renders the JSON of every read: no per-row Python on hot paths.
# A job's JSON is rendered when it is written (jobs.job_json, see schema.sql).
# The shapes are those of schemas.JobSchema etc.; tests hold them to it.


GET_JOB = db.Prepared(
    "get_job", "SELECT j.job_json FROM jobs j WHERE j.id = %(job_id)s", job_id="bigint"
)

# One range scan of jobs_status_newest per wanted status, merged: at most
# (limit + 1) index entries per status whatever the table's skew. The extra
# row tells whether a next page exists.
LIST_JOBS = """
WITH page AS (
    SELECT j.id
    FROM unnest(%(statuses)s::text[]) AS wanted(status)
    CROSS JOIN LATERAL (
        SELECT id FROM jobs
        WHERE jobs.status = wanted.status AND -jobs.id >= -%(max_id)s
        -- -id, not id DESC: only jobs_status_newest yields this order, so the
        -- planner cannot pick a primary-key scan that filters its way through
        -- every finished job when few match.
        ORDER BY -jobs.id
        LIMIT %(limit)s + 1
    ) j
    ORDER BY j.id DESC
    LIMIT %(limit)s + 1
)
-- Only the rows of the page are read from the table: the candidates come
-- from the index alone (an index-only scan, see jobs_status_newest). Rows,
-- not one aggregated string: string_agg and its concatenations cost
-- PostgreSQL more than joining 51 strings costs Python.
SELECT page.id, jobs.job_json FROM page JOIN jobs ON jobs.id = page.id ORDER BY page.id DESC
"""

# Prepared once per page size, so that its generic plan knows the LIMIT: with
# the limit as a parameter the planner assumes a tenth of the rows and scans
# whole statuses (6.6 ms a page instead of 0.28 ms). Other page sizes run
# the same SQL unprepared, planned on every request.
PREPARED_PAGE_SIZES = frozenset(
    {1, 10, 20, 25, 50, 100, 200, 250, 500, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE}
)


@functools.cache
def list_jobs_statement(limit: int) -> db.Prepared | str:
    sql = LIST_JOBS.replace("%(limit)s", str(int(limit)))
    if limit in PREPARED_PAGE_SIZES:
        return db.Prepared(f"list_jobs_{limit}", sql, statuses="text[]", max_id="bigint")
    return sql


# The state guard: lock the job, move it only from an allowed status, record
# the event, and tell "not found" / "not allowed from X" / "moved" apart.
CHANGE_STATUS = """
WITH target AS (
    SELECT * FROM jobs WHERE id = %(job_id)s FOR UPDATE
), moved AS (
    UPDATE jobs
    SET status = %(to)s, updated_at = clock_timestamp(),
        node_id = coalesce(%(node_id)s, jobs.node_id)
    FROM target
    WHERE jobs.id = target.id AND target.status = ANY(%(from)s)
    RETURNING jobs.*
), event AS (
    INSERT INTO job_events (job_id, created_at, event_type, node_id, detail)
    SELECT id, updated_at, status, node_id, %(detail)s FROM moved
)
SELECT target.status, moved.id IS NOT NULL,
       coalesce(moved.job_json, target.job_json)
FROM target LEFT JOIN moved ON true
"""

# A repeated idempotency_key finds the existing job; the no-op update makes
# the racing loser wait for and return the winner's row in this one statement.
CREATE_JOB = """
WITH created AS (
    INSERT INTO jobs (node_id, descriptor, idempotency_key)
    VALUES (%(node_id)s, %(descriptor)s, %(idempotency_key)s)
    ON CONFLICT (idempotency_key) DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key
    RETURNING *, (xmax = 0) AS inserted
), event AS (
    INSERT INTO job_events (job_id, created_at, event_type, node_id)
    SELECT id, created_at, status, node_id FROM created WHERE inserted
)
SELECT inserted, id, job_json FROM created
"""

DELETE_JOB = """
WITH target AS (
    SELECT id, status FROM jobs WHERE id = %(job_id)s FOR UPDATE
), removed AS (
    DELETE FROM jobs USING target
    WHERE jobs.id = target.id AND target.status = ANY(%(terminal)s)
    RETURNING jobs.id
)
SELECT target.status, removed.id IS NOT NULL FROM target LEFT JOIN removed ON true
"""

# Both bulk deletes run under this lock, taken first in their transaction: a
# delete by status locks its rows in scan order, and two bulk deletes locking
# in different orders would deadlock; nothing else locks more than one job.
# Cheaper than locking every row in id order before deleting it, which
# dirtied each row twice (700k jobs: 6.8 s instead of 11-13 s).
BULK_DELETE_LOCK = "SELECT pg_advisory_xact_lock(hashtext('jobs-service bulk delete'))"

# A row that turns active while the delete waits for its lock is rechecked
# against the WHERE clause (READ COMMITTED) and left alone.
DELETE_JOBS_BY_STATUS = """
DELETE FROM jobs WHERE status = ANY(%(statuses)s)
"""

# All or nothing: lock every listed job, so none can turn active between the
# check and the delete, and delete only when none of them is active.
DELETE_JOBS_BY_ID = """
WITH target AS (
    SELECT id, status FROM jobs WHERE id = ANY(%(job_ids)s) ORDER BY id FOR UPDATE
), blocker AS (
    SELECT id, status FROM target WHERE status <> ALL(%(terminal)s) ORDER BY id LIMIT 1
), removed AS (
    DELETE FROM jobs USING target
    WHERE jobs.id = target.id AND NOT EXISTS (SELECT FROM blocker)
    RETURNING jobs.id
)
SELECT blocker.id, blocker.status, (SELECT count(*) FROM removed)
FROM (SELECT) AS one LEFT JOIN blocker ON true
"""

_TABLE_PROGRESS_JSON = (
    "json_build_object('start_block', t.start_block, 'current_block', t.current_block, "
    "'files_count', t.files_count, 'total_size_bytes', t.total_size_bytes)"
)

GET_PROGRESS = f"""
SELECT j.status,
       coalesce(json_object_agg(t.table_name, {_TABLE_PROGRESS_JSON} ORDER BY t.table_name)
                FILTER (WHERE t.table_name IS NOT NULL), '{{}}')::text
FROM jobs j LEFT JOIN job_tables t ON t.job_id = j.id
WHERE j.id = %(job_id)s
GROUP BY j.id
"""

GET_EVENTS = """
SELECT coalesce(json_agg(json_build_object(
           'id', e.id, 'created_at', jobs_timestamp(e.created_at), 'event_type', e.event_type,
           'node_id', e.node_id, 'detail', e.detail) ORDER BY e.id), '[]')::text
FROM jobs j LEFT JOIN job_events e ON e.job_id = j.id
WHERE j.id = %(job_id)s
GROUP BY j.id
"""

# File registration, one statement: the job is locked so it cannot turn
# terminal until this transaction ends (and is only written to while active);
# the table's summary row is locked so registrations to one table serialise.
# FOR NO KEY UPDATE, not FOR SHARE: new share lockers pass a waiting FOR UPDATE,
# so busy registrations could starve a stop or a transition past its timeout.
INSERT_FILES = """
WITH job AS (
    SELECT id, status FROM jobs WHERE id = %(job_id)s FOR NO KEY UPDATE
), tbl AS (
    INSERT INTO job_tables (job_id, table_name)
    SELECT id, %(table)s FROM job WHERE status = ANY(%(active)s)
    ON CONFLICT (job_id, table_name) DO UPDATE SET table_name = EXCLUDED.table_name
    RETURNING start_block, current_block, tip_hash, files_count, total_size_bytes
), inserted AS (
    INSERT INTO job_files (job_id, table_name, file_name, start_block, end_block,
                           size_bytes, block_hash, prev_hash)
    SELECT %(job_id)s, %(table)s, f.*
    FROM (SELECT FROM tbl) AS locked,
         unnest(%(names)s::text[], %(starts)s::bigint[], %(ends)s::bigint[],
                %(sizes)s::bigint[], %(block_hashes)s::text[], %(prev_hashes)s::text[]) AS f
    ON CONFLICT (job_id, table_name, file_name) DO NOTHING
    RETURNING file_name, start_block
)
SELECT job.status, tbl.start_block, tbl.current_block, tbl.tip_hash, tbl.files_count,
       tbl.total_size_bytes,
       (SELECT coalesce(array_agg(file_name), '{}') FROM inserted),
       (SELECT min(start_block) FROM inserted)
FROM job LEFT JOIN tbl ON true
"""

EXISTING_FILES = """
SELECT file_name, start_block, end_block, size_bytes, block_hash, prev_hash
FROM job_files
WHERE job_id = %(job_id)s AND table_name = %(table)s AND file_name = ANY(%(names)s)
"""

TABLE_PROGRESS = f"""
SELECT {_TABLE_PROGRESS_JSON}::text FROM job_tables t
WHERE t.job_id = %(job_id)s AND t.table_name = %(table)s
"""

FILE_FIELDS = ("file_name", "start_block", "end_block", "size_bytes", "block_hash", "prev_hash")

# ---- Routes ----------------------------------------------------------------

api = Blueprint("api", __name__)
endpoint = openapi.EndpointRegistry(api)

JOB_ID_PARAM = {
    "in": "path",
    "name": "job_id",
    "required": True,
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_JOB_ID},
}
E400_JOB = {400: ("INVALID_JOB_ID", ErrorSchema)}


@endpoint(
    "/jobs",
    "GET",
    access="read",
    error_code="LIST_JOBS_ERROR",
    summary="List jobs, newest first, with cursor paging and a status filter",
    query=ListJobsQuerySchema,
    responses={200: JobListSchema, 400: ErrorSchema},
)
def list_jobs():
    args = request.args
    limit = parse_limit(args.get("limit"))
    max_id = MAX_JOB_ID
    if "last_job_id" in args:
        last_job_id = parse_job_id(args["last_job_id"])
        if last_job_id is None:
            raise ApiError(
                400,
                "INVALID_QUERY_PARAMETERS",
                "last_job_id must be an integer in 1..9223372036854775807",
            )
        max_id = last_job_id - 1
    statuses = ACTIVE_STATUSES
    if "status" in args:
        statuses = parse_status_tokens(args["status"], LIST_STATUS_TOKENS)
        if statuses is None:
            raise ApiError(
                400,
                "INVALID_QUERY_PARAMETERS",
                "status must be comma-separated tokens among: " + ", ".join(LIST_STATUS_TOKENS),
            )
    rows = query_all(list_jobs_statement(limit), {"statuses": list(statuses), "max_id": max_id})
    # One row more than the page tells whether there is a next page.
    page = rows[:limit]
    cursor = b"%d" % page[-1][0] if len(rows) > limit else b"null"
    jobs = ",".join(job for _, job in page).encode()
    return json_response(b'{"jobs":[' + jobs + b'],"next_cursor":' + cursor + b"}")


def parse_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_PAGE_SIZE
    stripped = text.strip()
    digits = stripped.lstrip("+-")
    if not digits.isdigit() or not digits.isascii() or len(stripped) - len(digits) > 1:
        raise ApiError(400, "INVALID_QUERY_PARAMETERS", "limit must be an integer")
    # No int() before the length check: a 5000-digit limit would raise (a 500).
    if stripped.startswith("-") or not digits.strip("0"):
        raise ApiError(400, "LIMIT_INVALID", "limit must be at least 1")
    if len(digits) > 6 or int(digits) > MAX_PAGE_SIZE:
        raise ApiError(400, "LIMIT_TOO_LARGE", f"limit must be at most {MAX_PAGE_SIZE}")
    return int(digits)


@endpoint(
    "/jobs",
    "POST",
    access="admin",
    error_code="CREATE_JOB_ERROR",
    summary="Schedule a job (idempotent with idempotency_key)",
    body=CreateJobSchema,
    responses={201: JobSchema, 200: JobSchema, 400: ErrorSchema},
)
def create_job():
    job = load_body(CreateJobSchema())
    inserted, job_id, body = query_one(
        CREATE_JOB,
        {
            "node_id": job["node_id"],
            "descriptor": as_jsonb(job["descriptor"]),
            "idempotency_key": job["idempotency_key"],
        },
    )
    if not inserted:
        return json_response(body, 200)
    return json_response(body, 201, {"Location": f"/jobs/{job_id}"})


@endpoint(
    "/jobs/<job_id>",
    "GET",
    access="read",
    error_code="GET_JOB_ERROR",
    summary="Get one job",
    params=[JOB_ID_PARAM],
    responses={200: JobSchema, 400: ErrorSchema, 404: ErrorSchema},
)
def get_job(job_id):
    job_id = job_id_from_path(job_id)
    row = query_one(GET_JOB, {"job_id": job_id})
    if row is None:
        raise job_not_found(job_id)
    return json_response(row[0])


@endpoint(
    "/jobs/<job_id>/progress",
    "GET",
    access="read",
    error_code="GET_JOB_ERROR",
    summary="Per-table progress along each table's canonical chain of files",
    params=[JOB_ID_PARAM],
    responses={200: ProgressSchema, 400: ErrorSchema, 404: ErrorSchema},
)
def get_progress(job_id):
    job_id = job_id_from_path(job_id)
    row = query_one(GET_PROGRESS, {"job_id": job_id})
    if row is None:
        raise job_not_found(job_id)
    status, tables = row
    head = orjson.dumps({"job_id": job_id, "job_status": status})[:-1]
    return json_response(head + b',"tables":' + tables.encode() + b"}")


@endpoint(
    "/jobs/<job_id>/events",
    "GET",
    access="read",
    error_code="GET_JOB_EVENTS_ERROR",
    summary="The job's history of status changes, oldest first",
    params=[JOB_ID_PARAM],
    responses={200: EventListSchema, 400: ErrorSchema, 404: ErrorSchema},
)
def get_events(job_id):
    job_id = job_id_from_path(job_id)
    row = query_one(GET_EVENTS, {"job_id": job_id})
    if row is None:
        raise job_not_found(job_id)
    return json_response(b'{"job_id":%d,"events":%s}' % (job_id, row[0].encode()))


def change_status(job_id: int, to: str, node_id=None, detail=None):
    """Apply one move of TRANSITIONS atomically: (status before, moved?, job JSON) or None."""
    return query_one(
        CHANGE_STATUS,
        {
            "job_id": job_id,
            "to": to,
            "from": sorted(TRANSITIONS[to]),
            "node_id": node_id,
            "detail": as_jsonb(detail),
        },
    )


@endpoint(
    "/jobs/<job_id>/stop",
    ("PUT", "POST"),
    access="admin",
    error_code="STOP_JOB_ERROR",
    summary="Request a stop (idempotent): SCHEDULED/RUNNING become STOP_REQUESTED",
    params=[JOB_ID_PARAM],
    responses={200: JobSchema, 400: ErrorSchema, 404: ErrorSchema},
)
def request_stop(job_id):
    job_id = job_id_from_path(job_id)
    result = change_status(job_id, "STOP_REQUESTED")
    if result is None:
        raise job_not_found(job_id)
    # Any status the stop cannot move from is already stopping or finished.
    return json_response(result[2])


@endpoint(
    "/jobs/<job_id>/status",
    "PUT",
    access="worker",
    error_code="UPDATE_JOB_STATUS_ERROR",
    summary="A worker reports a status transition",
    params=[JOB_ID_PARAM],
    body=StatusReportSchema,
    responses={200: JobSchema, 400: ErrorSchema, 404: ErrorSchema, 409: ErrorSchema},
)
def report_status(job_id):
    job_id = job_id_from_path(job_id)
    report = load_body(StatusReportSchema())
    to = report["status"]
    result = change_status(job_id, to, report["node_id"], report["detail"])
    if result is None:
        raise job_not_found(job_id)
    before, moved, body = result
    if not moved and before != to:
        raise ApiError(
            409,
            "INVALID_STATE_TRANSITION",
            f"job {job_id} is {before}: it cannot move to {to}",
        )
    return json_response(body)


@endpoint(
    "/jobs/<job_id>/tables/<table>/files",
    "POST",
    access="worker",
    error_code="REGISTER_FILES_ERROR",
    summary="A worker registers written files (one object, or an array of up to 1000)",
    params=[
        JOB_ID_PARAM,
        {
            "in": "path",
            "name": "table",
            "required": True,
            "schema": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,62}$"},
        },
    ],
    body=FileBatchSchema,
    responses={
        201: FilesRegisteredSchema,
        200: FilesRegisteredSchema,
        400: ErrorSchema,
        404: ErrorSchema,
        409: ErrorSchema,
    },
)
def register_files(job_id, table):
    job_id = job_id_from_path(job_id)
    if not is_table_name(table):
        raise ApiError(
            400, "INVALID_PAYLOAD_FORMAT", "table must match ^[A-Za-z_][A-Za-z0-9_]{0,62}$"
        )
    files = load_body(FileBatchSchema())["files"]
    conn = get_db()
    with conn, conn.cursor() as cur:
        params = {"job_id": job_id, "table": table, "active": list(ACTIVE_STATUSES)}
        for column, field in zip(
            ("names", "starts", "ends", "sizes", "block_hashes", "prev_hashes"),
            FILE_FIELDS,
            strict=True,
        ):
            params[column] = [f[field] for f in files]
        cur.execute(INSERT_FILES, params)
        row = cur.fetchone()
        if row is None:
            raise job_not_found(job_id)
        status, *stored, inserted_names, lowest_new_start = row
        if status not in ACTIVE_STATUSES:
            raise ApiError(
                409,
                "JOB_CONFLICT",
                f"job {job_id} is {status}: files are accepted only while active",
            )
        inserted = set(inserted_names)
        retried = [f for f in files if f["file_name"] not in inserted]
        if retried:
            cur.execute(
                EXISTING_FILES,
                {"job_id": job_id, "table": table, "names": [f["file_name"] for f in retried]},
            )
            existing = {r[0]: r for r in cur.fetchall()}
            for f in retried:
                if existing.get(f["file_name"]) != tuple(f[k] for k in FILE_FIELDS):
                    raise ApiError(
                        409,
                        "FILE_CONFLICT",
                        f"file {f['file_name']!r} is already registered with other fields",
                    )
        if inserted:
            summary = None if stored[0] is None else chain.Chain(*stored[:4], int(stored[4]))
            chain.refresh_table(cur, job_id, table, summary, lowest_new_start)
        cur.execute(TABLE_PROGRESS, {"job_id": job_id, "table": table})
        progress = cur.fetchone()[0]
    head = orjson.dumps(
        {"job_id": job_id, "table": table, "registered": len(inserted), "unchanged": len(retried)}
    )[:-1]
    return json_response(
        head + b',"progress":' + progress.encode() + b"}", 201 if inserted else 200
    )


@endpoint(
    "/jobs/<job_id>",
    "DELETE",
    access="admin",
    error_code="DELETE_JOB_ERROR",
    summary="Delete a terminal job (idempotent: 204 also when it does not exist)",
    params=[JOB_ID_PARAM],
    responses={204: None, 400: ErrorSchema, 409: ErrorSchema},
)
def delete_job(job_id):
    job_id = job_id_from_path(job_id)
    row = query_one(DELETE_JOB, {"job_id": job_id, "terminal": list(TERMINAL_STATUSES)})
    if row is not None and not row[1]:
        raise ApiError(
            409, "JOB_CONFLICT", f"job {job_id} is {row[0]}: only terminal jobs can be deleted"
        )
    return current_app.response_class(status=204)


@endpoint(
    "/jobs",
    "DELETE",
    access="admin",
    error_code="DELETE_JOBS_BY_STATUS_ERROR",
    summary="Delete every job in the given terminal status(es), or exactly the listed job_ids",
    query=DeleteJobsQuerySchema,
    body=BulkDeleteSchema,
    responses={204: None, 400: ErrorSchema, 409: ErrorSchema},
)
def delete_jobs():
    if "status" in request.args and request.get_data(cache=True).strip():
        # Both forms at once: deleting by status would silently ignore the
        # listed ids (and delete far more than the caller meant).
        raise ApiError(
            400,
            "INVALID_QUERY_PARAM",
            "give either ?status= or a body with job_ids, not both",
        )
    if "status" in request.args:
        statuses = parse_status_tokens(request.args["status"], DELETE_STATUS_TOKENS)
        if statuses is None:
            raise ApiError(
                400,
                "INVALID_QUERY_PARAM",
                "status must be one of terminal, completed, stopped, error (failed)",
            )
        with bulk_delete() as cur:
            cur.execute(DELETE_JOBS_BY_STATUS, {"statuses": list(statuses)})
            log.info(
                "bulk delete", extra={"fields": {"statuses": statuses, "deleted": cur.rowcount}}
            )
        return current_app.response_class(status=204)
    if not request.get_data(cache=True).strip():
        raise ApiError(400, "INVALID_QUERY_PARAM", "status is required (or a body with job_ids)")
    g.db_error_code = "DELETE_JOBS_ERROR"
    job_ids = sorted(set(load_body(BulkDeleteSchema())["job_ids"]))
    with bulk_delete() as cur:
        cur.execute(DELETE_JOBS_BY_ID, {"job_ids": job_ids, "terminal": list(TERMINAL_STATUSES)})
        blocker_id, blocker_status, _ = cur.fetchone()
    if blocker_id is not None:
        raise ApiError(
            409,
            "JOB_CONFLICT",
            f"job {blocker_id} is {blocker_status}: nothing was deleted",
        )
    return current_app.response_class(status=204)


@contextlib.contextmanager
def bulk_delete():
    """A transaction for one bulk delete: its own time limit, and the bulk-delete lock."""
    conn = get_db()
    with conn, conn.cursor() as cur:
        # Deleting a large share of the table takes longer than a request's
        # statement_timeout allows; the worker's own timeout still bounds it.
        cur.execute(
            "SET LOCAL statement_timeout = %s", (int(current_app.config["BULK_DELETE_TIMEOUT_MS"]),)
        )
        cur.execute(BULK_DELETE_LOCK)
        yield cur


@endpoint(
    "/healthz",
    "GET",
    access="open",
    summary="Liveness: the process answers (never touches the database)",
    responses={200: HealthSchema},
)
def healthz():
    return json_response(b'{"status":"ok"}')


@endpoint(
    "/readyz",
    "GET",
    access="open",
    summary="Readiness: SELECT 1 succeeds within 1 s",
    responses={200: HealthSchema, 503: HealthSchema},
)
def readyz():
    cfg = current_app.config
    try:
        db.ping(cfg["DATABASE_URL"], cfg["READY_TIMEOUT_S"], application_name="jobs-readyz")
    except psycopg2.Error as exc:
        log.warning("readiness check failed", extra={"fields": {"error": type(exc).__name__}})
        return json_response(
            {
                "status": "unavailable",
                "error_code": "DATABASE_UNAVAILABLE",
                "error_message": "the database did not answer SELECT 1 in time",
            },
            503,
        )
    return json_response(b'{"status":"ok"}')


@endpoint(
    "/metrics",
    "GET",
    access="open",
    summary="Prometheus metrics",
    responses={200: {"text/plain": {"schema": {"type": "string"}}}},
)
def metrics():
    body, content_type = observability.render_metrics()
    return current_app.response_class(body, 200, content_type=content_type)


@endpoint(
    "/openapi.json",
    "GET",
    access="open",
    summary="This document",
    responses={200: {"application/json": {"schema": {"type": "object"}}}},
)
def openapi_document():
    return json_response(openapi.document(endpoint))


# ---- Per-request plumbing --------------------------------------------------

ROLE_GRANTS = {
    "open": {None, "worker", "admin"},
    "read": {"worker", "admin"},
    "worker": {"worker", "admin"},
    "admin": {"admin"},
}


def before_request():
    g.started = time.perf_counter()
    g.request_id = observability.request_id(request.environ.get("HTTP_X_REQUEST_ID"))
    access = endpoint.access_of(request.endpoint)
    if access is None or access == "open":
        return None
    admin_token = current_app.config["ADMIN_TOKEN"]
    if not admin_token:
        return None
    role = caller_role(
        request.headers.get("Authorization", ""), admin_token, current_app.config["WORKER_TOKEN"]
    )
    if role is None:
        return error_response(
            401, "UNAUTHORIZED", "a valid Bearer token is required", {"WWW-Authenticate": "Bearer"}
        )
    if role not in ROLE_GRANTS[access]:
        return error_response(403, "FORBIDDEN", "this token may not use this route")
    return None


def caller_role(authorization: str, admin_token: str, worker_token: str | None) -> str | None:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    presented = token.strip().encode()
    # Both comparisons always run, so timing tells nothing about which matched.
    is_admin = hmac.compare_digest(presented, admin_token.encode())
    is_worker = bool(worker_token) and hmac.compare_digest(presented, worker_token.encode())
    if is_admin:
        return "admin"
    return "worker" if is_worker else None


def after_request(response):
    response.headers["X-Request-ID"] = g.get("request_id") or observability.request_id(None)
    rule = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    observability.record_request(
        request.method,
        rule,
        response.status_code,
        time.perf_counter() - g.get("started", time.perf_counter()),
        g.get("request_id"),
    )
    return response


def handle_api_error(exc: ApiError):
    return error_response(exc.status, exc.code, exc.message)


HTTP_ERROR_CODES = {
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    414: "URI_TOO_LONG",
    400: "BAD_REQUEST",
}


def handle_http_error(exc: HTTPException):
    code = HTTP_ERROR_CODES.get(exc.code, (exc.name or "HTTP_ERROR").upper().replace(" ", "_"))
    message = exc.description or exc.name
    if exc.code == 413:
        message = "request body is larger than 1 MiB"
    headers = {k: v for k, v in exc.get_headers() if k.lower() == "allow"}
    return error_response(exc.code or 500, code, message, headers)


def handle_database_error(exc: psycopg2.Error):
    code = g.get("db_error_code") or endpoint.error_code_of(request.endpoint)
    log.error(
        "database error",
        extra={
            "fields": {
                "error": type(exc).__name__,
                "pgcode": exc.pgcode,
                "detail": str(exc).strip().splitlines()[0] if str(exc) else "",
            }
        },
    )
    return error_response(500, code, "database error; the request was not completed")


def handle_unexpected_error(exc: Exception):
    code = g.get("db_error_code") or endpoint.error_code_of(request.endpoint)
    log.exception("unhandled error")
    return error_response(500, code, "internal error; the request was not completed")


# ---- The factory -----------------------------------------------------------


@click.command("init-db")
@with_appcontext
def init_db_command():
    """Create missing tables and indexes. Idempotent; never drops anything."""
    with current_app.open_resource("schema.sql") as f:
        schema = f.read().decode()
    conn = psycopg2.connect(
        current_app.config["DATABASE_URL"],
        connect_timeout=current_app.config["DB_CONNECT_TIMEOUT_S"],
    )
    try:
        with conn, conn.cursor() as cur:
            # Replicas deploying at once must not race on CREATE ... IF NOT EXISTS.
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('jobs-service init-db'))")
            cur.execute(schema)
    finally:
        conn.close()
    click.echo("Initialized the database.")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def create_app(test_config=None):
    # No static folder: an API serves no files (and every route is in /openapi.json).
    app = Flask(__name__, static_folder=None)
    app.config.from_mapping(
        DATABASE_URL=os.environ.get("DATABASE_URL", "postgresql:///jobs"),
        ADMIN_TOKEN=os.environ.get("ADMIN_TOKEN") or None,
        WORKER_TOKEN=os.environ.get("WORKER_TOKEN") or None,
        STATEMENT_TIMEOUT_MS=_env_int("STATEMENT_TIMEOUT_MS", 5000),
        # Below gunicorn's worker timeout (30 s), which would kill the worker.
        BULK_DELETE_TIMEOUT_MS=_env_int("BULK_DELETE_TIMEOUT_MS", 25000),
        DB_CONNECT_TIMEOUT_S=_env_int("DB_CONNECT_TIMEOUT_S", 3),
        DB_POOL_SIZE=_env_int("DB_POOL_SIZE", 4),
        DB_POOL_TIMEOUT_S=_env_int("DB_POOL_TIMEOUT_S", 5),
        READY_TIMEOUT_S=1.0,
        MAX_CONTENT_LENGTH=1024 * 1024,
    )
    if test_config is not None:
        app.config.update(test_config)

    observability.configure_logging()
    # Werkzeug would answer /jobs//progress with an HTML 308 to /jobs/progress,
    # past every error handler; unmerged, it is an unknown route (JSON 404).
    app.url_map.merge_slashes = False
    app.register_blueprint(api)
    app.before_request(before_request)
    app.after_request(after_request)
    app.teardown_appcontext(release_db)
    app.register_error_handler(ApiError, handle_api_error)
    app.register_error_handler(HTTPException, handle_http_error)
    app.register_error_handler(psycopg2.Error, handle_database_error)
    app.register_error_handler(Exception, handle_unexpected_error)
    app.cli.add_command(init_db_command)

    if not app.config["ADMIN_TOKEN"]:
        log.warning("ADMIN_TOKEN is not set: the API is open to anyone who can reach it")
        if app.config["WORKER_TOKEN"]:
            log.warning("WORKER_TOKEN is ignored while ADMIN_TOKEN is not set")
    return app


__all__ = ["STATUSES", "create_app"]
