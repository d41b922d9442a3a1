"""The Jobs service: see, stop, clean up and follow extraction jobs.

docs/API.md is the reference. This file holds the routes and the factory;
each route reads as parse -> call the store -> map its outcome to an answer.
Where the rest lives: parse.py (input), store/ (SQL and outcomes), db.py
(connections), errors.py, auth.py, registry.py (the route declarations),
openapi.py, observability.py (request IDs, logs, metrics).
"""

from __future__ import annotations

import logging
import os

import psycopg2
from flask import Blueprint, Flask, current_app, request

import auth
import chores
import db
import errors
import history
import leases  # noqa: F401 (declares the lease sweep chore)
import observability
import openapi
import pool
from errors import ApiError
from parse import (
    cursor_from_query,
    event_id_from_path,
    has_body,
    job_id_from_path,
    limit_from_query,
    load_body,
    node_id_from_query,
    statuses_from_query,
    table_from_path,
    worker_id_from_path,
)
from registry import EndpointRegistry
from responses import json_response, json_with_fragments, no_content
from schemas import (
    ACTIVE_STATUSES,
    DELETE_STATUS_TOKENS,
    LIST_STATUS_TOKENS,
    MAX_BATCH,
    MAX_JOB_ID,
    NODE_ID_PATTERN,
    BulkDeleteProgressSchema,
    BulkDeleteSchema,
    CreateJobSchema,
    DeleteJobsQuerySchema,
    EventListSchema,
    FileBatchSchema,
    FilesRegisteredSchema,
    HealthSchema,
    HeartbeatSchema,
    JobEventSchema,
    JobListSchema,
    JobSchema,
    ListJobsQuerySchema,
    ProgressSchema,
    RegisterWorkerSchema,
    StatusReportSchema,
    WorkerListSchema,
    WorkerSchema,
)
from store import files as file_store
from store import jobs as job_store
from store import workers as worker_store
from store.files import FileConflict
from store.outcomes import Blocked, Moved, NotFound, Refused

log = logging.getLogger("jobs")

api = Blueprint("api", __name__)
endpoint = EndpointRegistry(api)

JOB_ID_PARAM = {
    "in": "path",
    "name": "job_id",
    "required": True,
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_JOB_ID},
}
JOB_ERRORS = {400: "INVALID_JOB_ID", 404: "JOB_NOT_FOUND"}
EVENT_ID_PARAM = {**JOB_ID_PARAM, "name": "event_id"}
NODE_ID_PARAM = {
    "in": "path",
    "name": "node_id",
    "required": True,
    "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": NODE_ID_PATTERN},
}


def job_not_found(job_id: int) -> ApiError:
    return ApiError(404, "JOB_NOT_FOUND", f"job {job_id} not found")


# ---- Jobs ------------------------------------------------------------------


@endpoint(
    "/jobs",
    "GET",
    access="read",
    error_code="LIST_JOBS_ERROR",
    summary="List jobs, newest first, with cursor paging and status and node filters",
    query=ListJobsQuerySchema,
    responses={200: JobListSchema},
    errors={400: ("INVALID_QUERY_PARAMETERS", "LIMIT_INVALID", "LIMIT_TOO_LARGE")},
)
def list_jobs():
    args = request.args
    limit = limit_from_query(args.get("limit"))
    max_id = cursor_from_query(args.get("last_job_id"))
    node_id = node_id_from_query(args.get("node_id"))
    statuses = ACTIVE_STATUSES
    if "status" in args:
        statuses = statuses_from_query(
            args["status"],
            LIST_STATUS_TOKENS,
            "INVALID_QUERY_PARAMETERS",
            "status must be comma-separated tokens among: " + ", ".join(LIST_STATUS_TOKENS),
        )
    page = job_store.list_page(statuses, MAX_JOB_ID if max_id is None else max_id, limit, node_id)
    cursor = "null" if page.next_cursor is None else str(page.next_cursor)
    return json_with_fragments({}, jobs=f"[{','.join(page.jobs_json)}]", next_cursor=cursor)


@endpoint(
    "/jobs",
    "POST",
    access="admin",
    error_code="CREATE_JOB_ERROR",
    summary="Schedule a job (idempotent with idempotency_key)",
    body=CreateJobSchema,
    responses={201: JobSchema, 200: JobSchema},
)
def create_job():
    job = load_body(CreateJobSchema())
    created = job_store.create_job(job["node_id"], job["descriptor"], job["idempotency_key"])
    if not created.new:
        return json_response(created.job_json, 200)
    return json_response(created.job_json, 201, {"Location": f"/jobs/{created.job_id}"})


@endpoint(
    "/jobs/<job_id>",
    "GET",
    access="read",
    error_code="GET_JOB_ERROR",
    summary="Get one job",
    params=[JOB_ID_PARAM],
    responses={200: JobSchema},
    errors=JOB_ERRORS,
)
def get_job(job_id):
    job_id = job_id_from_path(job_id)
    job_json = job_store.get_job(job_id)
    if job_json is None:
        raise job_not_found(job_id)
    return json_response(job_json)


@endpoint(
    "/jobs/<job_id>/progress",
    "GET",
    access="read",
    error_code="GET_JOB_ERROR",
    summary="Per-table progress along each table's canonical chain of files",
    params=[JOB_ID_PARAM],
    responses={200: ProgressSchema},
    errors=JOB_ERRORS,
)
def get_progress(job_id):
    job_id = job_id_from_path(job_id)
    progress = file_store.get_progress(job_id)
    if isinstance(progress, NotFound):
        raise job_not_found(job_id)
    return json_with_fragments(
        {"job_id": job_id, "job_status": progress.job_status}, tables=progress.tables_json
    )


@endpoint(
    "/jobs/<job_id>/events",
    "GET",
    access="read",
    error_code="GET_JOB_EVENTS_ERROR",
    summary="The job's history of status changes, oldest first",
    params=[JOB_ID_PARAM],
    responses={200: EventListSchema},
    errors=JOB_ERRORS,
)
def get_events(job_id):
    job_id = job_id_from_path(job_id)
    events = job_store.get_events(job_id)
    if events is None:
        raise job_not_found(job_id)
    return json_with_fragments({"job_id": job_id}, events=events)


@endpoint(
    "/jobs/<job_id>/events/<event_id>",
    "GET",
    access="read",
    error_code="GET_JOB_EVENT_ERROR",
    summary="One event of the job's history",
    params=[JOB_ID_PARAM, EVENT_ID_PARAM],
    responses={200: JobEventSchema},
    errors={400: "INVALID_JOB_ID", 404: ("JOB_NOT_FOUND", "EVENT_NOT_FOUND")},
)
def get_event(job_id, event_id):
    job_id = job_id_from_path(job_id)
    event_id = event_id_from_path(event_id)
    match job_store.get_event(job_id, event_id):
        case NotFound():
            raise job_not_found(job_id)
        case job_store.NoSuchEvent():
            raise ApiError(404, "EVENT_NOT_FOUND", f"job {job_id} has no event {event_id}")
        case found:
            return json_response(found.event_json)


# ---- Moves through the status machine ---------------------------------------


@endpoint(
    "/jobs/<job_id>/stop",
    ("PUT", "POST"),
    access="admin",
    error_code="STOP_JOB_ERROR",
    summary="Request a stop (idempotent): SCHEDULED/RUNNING become STOP_REQUESTED",
    params=[JOB_ID_PARAM],
    responses={200: JobSchema},
    errors=JOB_ERRORS,
)
def request_stop(job_id):
    job_id = job_id_from_path(job_id)
    match job_store.change_status(job_id, "STOP_REQUESTED"):
        case NotFound():
            raise job_not_found(job_id)
        # Refused: any status the stop cannot move from is already stopping or
        # finished, and the stop is idempotent.
        case Moved(job_json) | Refused(job_json=job_json):
            return json_response(job_json)


@endpoint(
    "/jobs/<job_id>/status",
    "PUT",
    access="worker",
    error_code="UPDATE_JOB_STATUS_ERROR",
    summary="A worker reports a status transition",
    params=[JOB_ID_PARAM],
    body=StatusReportSchema,
    responses={200: JobSchema},
    errors={**JOB_ERRORS, 409: "INVALID_STATE_TRANSITION"},
)
def report_status(job_id):
    job_id = job_id_from_path(job_id)
    report = load_body(StatusReportSchema())
    to = report["status"]
    match job_store.change_status(job_id, to, report["node_id"], report["detail"]):
        case NotFound():
            raise job_not_found(job_id)
        case Refused(status=before) if before != to:
            raise ApiError(
                409, "INVALID_STATE_TRANSITION", f"job {job_id} is {before}: it cannot move to {to}"
            )
        # Reporting the status the job already has is a no-op (a worker's retry).
        case Moved(job_json) | Refused(job_json=job_json):
            return json_response(job_json)


# ---- Files -------------------------------------------------------------------


@endpoint(
    "/jobs/<job_id>/tables/<table>/files",
    "POST",
    access="worker",
    error_code="REGISTER_FILES_ERROR",
    summary=f"A worker registers written files (one object, or an array of up to {MAX_BATCH})",
    params=[JOB_ID_PARAM, openapi.TABLE_PARAM],
    body=FileBatchSchema,
    responses={201: FilesRegisteredSchema, 200: FilesRegisteredSchema},
    errors={**JOB_ERRORS, 409: ("JOB_CONFLICT", "FILE_CONFLICT")},
)
def register_files(job_id, table):
    job_id = job_id_from_path(job_id)
    table = table_from_path(table)
    files = load_body(FileBatchSchema())["files"]
    match file_store.register_files(job_id, table, files):
        case NotFound():
            raise job_not_found(job_id)
        case Refused(status):
            raise ApiError(
                409,
                "JOB_CONFLICT",
                f"job {job_id} is {status}: files are accepted only while active",
            )
        case FileConflict(file_name):
            raise ApiError(
                409, "FILE_CONFLICT", f"file {file_name!r} is already registered with other fields"
            )
        case registered:
            counts = {"registered": registered.registered, "unchanged": registered.unchanged}
            return json_with_fragments(
                {"job_id": job_id, "table": table, **counts},
                201 if registered.registered else 200,
                progress=registered.progress_json,
            )


# ---- Deletes -------------------------------------------------------------------


@endpoint(
    "/jobs/<job_id>",
    "DELETE",
    access="admin",
    error_code="DELETE_JOB_ERROR",
    summary="Delete a terminal job (idempotent: 204 also when it does not exist)",
    params=[JOB_ID_PARAM],
    responses={204: None},
    errors={400: "INVALID_JOB_ID", 409: "JOB_CONFLICT"},
)
def delete_job(job_id):
    job_id = job_id_from_path(job_id)
    outcome = job_store.delete_job(job_id)
    if isinstance(outcome, Refused):
        raise ApiError(
            409,
            "JOB_CONFLICT",
            f"job {job_id} is {outcome.status}: only terminal jobs can be deleted",
        )
    return no_content()


@endpoint(
    "/jobs",
    "DELETE",
    access="admin",
    error_code="DELETE_JOBS_BY_STATUS_ERROR",
    summary="Delete every job in the given terminal status(es), or exactly the listed job_ids",
    query=DeleteJobsQuerySchema,
    query_error="INVALID_QUERY_PARAM",
    body=BulkDeleteSchema,
    body_required=False,
    responses={204: None, 200: BulkDeleteProgressSchema},
    errors={409: "JOB_CONFLICT", 500: "DELETE_JOBS_ERROR"},
)
def delete_jobs():
    if "status" not in request.args:
        return delete_listed_jobs(history.batch_timeout_ms(current_app.config))
    if has_body():
        # Both forms at once: deleting by status would silently ignore the
        # listed ids (and delete far more than the caller meant).
        raise ApiError(
            400, "INVALID_QUERY_PARAM", "give either ?status= or a body with job_ids, not both"
        )
    statuses = statuses_from_query(
        request.args["status"],
        DELETE_STATUS_TOKENS,
        "INVALID_QUERY_PARAM",
        "status must be one of terminal, completed, stopped, error (failed)",
    )
    # In batches, each its own transaction, for at most the request's budget
    # (history.py): any backlog gets an answer in time, and repeating continues.
    pruned = history.delete_by_status(statuses)
    log.info(
        "bulk delete",
        extra={"fields": {"statuses": statuses, "deleted": pruned.deleted, "more": pruned.more}},
    )
    if pruned.more:
        return json_response({"deleted": pruned.deleted, "more": True}, 200)
    return no_content()


def delete_listed_jobs(timeout_ms: int):
    """DELETE /jobs with {"job_ids": [...]}: exactly those jobs, all or nothing.

    One statement: at most 1000 jobs, so it needs no batches.
    """
    if not has_body():
        raise ApiError(400, "INVALID_QUERY_PARAM", "status is required (or a body with job_ids)")
    job_ids = load_body(BulkDeleteSchema())["job_ids"]
    with errors.database_errors_answer("DELETE_JOBS_ERROR"):
        outcome = job_store.delete_jobs_by_ids(job_ids, timeout_ms)
    if isinstance(outcome, Blocked):
        raise ApiError(
            409, "JOB_CONFLICT", f"job {outcome.job_id} is {outcome.status}: nothing was deleted"
        )
    return no_content()


# ---- Workers ---------------------------------------------------------------------

WORKER_ERRORS = {400: "INVALID_WORKER_ID", 404: "WORKER_NOT_FOUND"}


def worker_not_found(node_id: str) -> ApiError:
    return ApiError(404, "WORKER_NOT_FOUND", f"worker {node_id!r} is not registered")


def lost_after_s() -> float:
    return current_app.config["WORKER_LOST_AFTER_S"]


@endpoint(
    "/workers/<node_id>",
    "PUT",
    access="worker",
    error_code="REGISTER_WORKER_ERROR",
    summary="Register or re-register a worker (sets registered_at and heartbeat_at)",
    params=[NODE_ID_PARAM],
    body=RegisterWorkerSchema,
    body_required=False,
    responses={200: WorkerSchema},
    errors={400: "INVALID_WORKER_ID"},
)
def register_worker(node_id):
    node_id = worker_id_from_path(node_id)
    info = load_body(RegisterWorkerSchema())["info"] if has_body() else {}
    return json_response(worker_store.register(node_id, info, lost_after_s()))


@endpoint(
    "/workers/<node_id>/heartbeat",
    "POST",
    access="worker",
    error_code="WORKER_HEARTBEAT_ERROR",
    summary="A worker is alive: its SCHEDULED and STOP_REQUESTED jobs, oldest first",
    params=[NODE_ID_PARAM],
    responses={200: HeartbeatSchema},
    errors=WORKER_ERRORS,
)
def heartbeat(node_id):
    node_id = worker_id_from_path(node_id)
    beat = worker_store.heartbeat(node_id)
    if isinstance(beat, NotFound):
        raise worker_not_found(node_id)
    return json_response(
        {
            "node_id": node_id,
            "heartbeat_at": beat.heartbeat_at,
            "scheduled": beat.scheduled,
            "stop_requested": beat.stop_requested,
        }
    )


@endpoint(
    "/workers",
    "GET",
    access="read",
    error_code="SCHEDULER_LIST_WORKERS_ERROR",
    summary="Registered workers, most recently registered first",
    responses={200: WorkerListSchema},
)
def list_workers():
    return json_with_fragments({}, workers=worker_store.list_workers(lost_after_s()))


@endpoint(
    "/workers/<node_id>",
    "GET",
    access="read",
    error_code="SCHEDULER_GET_WORKER_ERROR",
    summary="One worker, with its build info and status",
    params=[NODE_ID_PARAM],
    responses={200: WorkerSchema},
    errors=WORKER_ERRORS,
)
def get_worker(node_id):
    node_id = worker_id_from_path(node_id)
    worker_json = worker_store.get_worker(node_id, lost_after_s())
    if worker_json is None:
        raise worker_not_found(node_id)
    return json_response(worker_json)


# ---- Operations ----------------------------------------------------------------


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
        pool.ping(cfg["DATABASE_URL"], cfg["READY_TIMEOUT_S"], application_name="jobs-readyz")
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
    body, content_type = observability.render_metrics(*worker_gauges())
    return current_app.response_class(body, 200, content_type=content_type)


def worker_gauges() -> list:
    """Workers by status, counted now on a connection of its own that gives up after
    READY_TIMEOUT_S: /metrics answers at once whatever the database does, without
    this family while the database does not answer."""
    cfg = current_app.config
    try:
        ((alive, lost),) = pool.query_once(
            cfg["DATABASE_URL"],
            cfg["READY_TIMEOUT_S"],
            worker_store.COUNT_WORKERS,
            {"lost_after_s": cfg["WORKER_LOST_AFTER_S"]},
            application_name="jobs-metrics",
        )
    except psycopg2.Error as exc:
        log.warning("metrics: workers not counted", extra={"fields": {"error": type(exc).__name__}})
        return []
    return [observability.worker_gauge(alive, lost)]


@endpoint(
    "/openapi.json",
    "GET",
    access="open",
    summary="This document",
    responses={200: {"application/json": {"schema": {"type": "object"}}}},
)
def openapi_document():
    return json_response(openapi.document(endpoint))


# ---- The factory -----------------------------------------------------------------


def check_access():
    return auth.refusal(endpoint.access_of(request.endpoint))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    seconds = float(value) if value.strip() else default
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds")
    return seconds


def create_app(test_config=None):
    # No static folder: an API serves no files (and every route is in /openapi.json).
    app = Flask(__name__, static_folder=None)
    app.config.from_mapping(
        DATABASE_URL=os.environ.get("DATABASE_URL", "postgresql:///jobs"),
        ADMIN_TOKEN=os.environ.get("ADMIN_TOKEN") or None,
        WORKER_TOKEN=os.environ.get("WORKER_TOKEN") or None,
        STATEMENT_TIMEOUT_MS=_env_int("STATEMENT_TIMEOUT_MS", 5000),
        # The time one DELETE /jobs request spends deleting. A per-request
        # budget rather than one statement's timeout (the old
        # BULK_DELETE_TIMEOUT_MS): a delete by status runs batches of
        # BULK_DELETE_BATCH jobs, each its own short transaction, and starts
        # none after the budget, answering 200 {"deleted", "more": true}; a
        # statement timeout instead cut one huge statement, deleting nothing
        # (a 500 at 25 s past ~1.4M jobs). The same value limits each
        # statement (history.batch_timeout_ms), so the worst case, a batch
        # stuck on a lock from the budget's last moment, ends within twice
        # the budget: 20 s with 10 s, below gunicorn's 30 s worker timeout.
        BULK_DELETE_BUDGET_MS=_env_int("BULK_DELETE_BUDGET_MS", 10000),
        # The most jobs one batch deletes (history.BatchSizer shrinks batches
        # whose jobs carry many files). 1000 jobs with 2 events each: 10-30 ms,
        # 60-100k jobs/s; larger caps gained nothing beyond the shared box's
        # noise and hold their locks longer (BENCHMARKS.md, Deleting history).
        BULK_DELETE_BATCH=_env_int("BULK_DELETE_BATCH", 1000),
        # Delete terminal jobs whose last change is older than this (30d, 12h,
        # 90m, 45s), continuously, as a chore (history.py). Unset: off.
        JOB_RETENTION=os.environ.get("JOB_RETENTION") or None,
        DB_CONNECT_TIMEOUT_S=_env_int("DB_CONNECT_TIMEOUT_S", 3),
        DB_POOL_SIZE=_env_int("DB_POOL_SIZE", 4),
        DB_POOL_TIMEOUT_S=_env_int("DB_POOL_TIMEOUT_S", 5),
        # A registered worker without a heartbeat for this long is LOST and its
        # leases expire (leases.py).
        WORKER_LOST_AFTER_S=_env_seconds("WORKER_LOST_AFTER_S", 30),
        READY_TIMEOUT_S=1.0,
        MAX_CONTENT_LENGTH=1024 * 1024,
    )
    if test_config is not None:
        app.config.update(test_config)
    # A bad value stops the start-up with a message naming it, not at the first run.
    app.config["JOB_RETENTION"] = history.retention_setting(app.config["JOB_RETENTION"])

    observability.configure_logging()
    # Werkzeug would answer /jobs//progress with an HTML 308 to /jobs/progress,
    # past every error handler; unmerged, it is an unknown route (JSON 404).
    app.url_map.merge_slashes = False
    app.register_blueprint(api)
    observability.init_app(app)
    app.before_request(check_access)
    db.init_app(app)
    chores.init_app(app)
    history.init_app(app)
    errors.init_app(app, endpoint.error_code_of)

    if not app.config["ADMIN_TOKEN"]:
        log.warning("ADMIN_TOKEN is not set: the API is open to anyone who can reach it")
        if app.config["WORKER_TOKEN"]:
            log.warning("WORKER_TOKEN is ignored while ADMIN_TOKEN is not set")
    return app
