"""The Jobs service: see, stop, clean up and follow extraction jobs.

docs/API.md is the reference. This file holds the routes and the factory;
each route reads as parse -> call the store -> map its outcome to an answer.
Where the rest lives: parse.py (input), store/ (SQL and outcomes), db.py
(connections), errors.py, auth.py, registry.py (the route declarations),
openapi.py, observability.py (request IDs, logs, metrics), jobs/console/
(the operator's console in the browser, served by the Console section here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import psycopg2
from flask import Blueprint, Flask, current_app, request

import auth
import chores
import db
import errors
import history
import leases
import observability
import openapi
import pool
import settings
from errors import ApiError
from parse import (
    cursor_from_query,
    delete_statuses_from_query,
    event_id_from_path,
    has_body,
    job_id_from_path,
    limit_from_query,
    list_statuses_from_query,
    load_body,
    node_id_from_query,
    table_from_path,
    worker_id_from_path,
)
from registry import EndpointRegistry
from responses import json_response, json_with_fragments, no_content
from schemas import (
    MAX_BATCH,
    MAX_JOB_ID,
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

JOB_ERRORS = {400: "INVALID_JOB_ID", 404: "JOB_NOT_FOUND"}


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
    statuses = list_statuses_from_query(args.get("status"))
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
    params=[openapi.JOB_ID_PARAM],
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
    params=[openapi.JOB_ID_PARAM],
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
    params=[openapi.JOB_ID_PARAM],
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
    params=[openapi.JOB_ID_PARAM, openapi.EVENT_ID_PARAM],
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
    params=[openapi.JOB_ID_PARAM],
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
    params=[openapi.JOB_ID_PARAM],
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
    params=[openapi.JOB_ID_PARAM, openapi.TABLE_PARAM],
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
    params=[openapi.JOB_ID_PARAM],
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
    statuses = delete_statuses_from_query(request.args["status"])
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
    params=[openapi.NODE_ID_PARAM],
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
    params=[openapi.NODE_ID_PARAM],
    responses={200: HeartbeatSchema},
    errors=WORKER_ERRORS,
)
def heartbeat(node_id):
    node_id = worker_id_from_path(node_id)
    beat = worker_store.heartbeat(node_id)
    if isinstance(beat, NotFound):
        raise worker_not_found(node_id)
    return json_response({"node_id": node_id, **dataclasses.asdict(beat)})


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
    params=[openapi.NODE_ID_PARAM],
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
    body, content_type = observability.render_metrics(*leases.worker_gauges(current_app.config))
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


# ---- Console -------------------------------------------------------------------
# The operator's console at /ui/ (docs/API.md, Console): static HTML, CSS and
# plain JavaScript modules from jobs/console/, sent as they are. The page is
# open like /healthz; it holds no data, and every API call it makes carries
# the operator's token. Only the files named in CONSOLE_FILES are served: a
# name is a key of that dict or a JSON 404, never a path on disk.

CONSOLE_DIR = Path(__file__).resolve().parent / "jobs" / "console"
CONSOLE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "dom.js": "text/javascript; charset=utf-8",
    "follow.js": "text/javascript; charset=utf-8",
    "views.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Its own scripts, styles and API only: no inline script or style, no eval, no
# other origin, never framed. Sent on every /ui answer, errors included.
CONSOLE_HEADERS = {
    "Content-Security-Policy": "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "img-src 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "form-action 'self'",
        ]
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load against the ETag: a deploy shows at once, and
    # an unchanged file costs a 304 without a body.
    "Cache-Control": "no-cache",
}
CONSOLE_NAME_PARAM = {
    "in": "path",
    "name": "name",
    "required": True,
    "schema": {"type": "string", "enum": sorted(CONSOLE_FILES)},
}


def _console_content(names) -> dict:
    media = sorted({CONSOLE_FILES[n].split(";")[0] for n in names})
    return {m: {"schema": {"type": "string"}} for m in media}


def console_file(name: str):
    media = CONSOLE_FILES.get(name)
    if media is None:
        raise ApiError(404, "NOT_FOUND", "the console has no file of that name")
    body = (CONSOLE_DIR / name).read_bytes()
    response = current_app.response_class(body, 200, content_type=media)
    response.set_etag(hashlib.sha256(body).hexdigest()[:32])
    return response.make_conditional(request)


@endpoint(
    "/ui/",
    "GET",
    access="open",
    summary="The operator's console (a page in the browser; docs/API.md, Console)",
    responses={200: _console_content(["index.html"]), 304: None},
)
def console_index():
    return console_file("index.html")


@endpoint(
    "/ui/<name>",
    "GET",
    access="open",
    summary="One of the console's static files",
    params=[CONSOLE_NAME_PARAM],
    responses={200: _console_content(CONSOLE_FILES), 304: None},
    errors={404: "NOT_FOUND"},
)
def console_asset(name):
    return console_file(name)


@api.after_app_request
def console_headers(response):
    path = request.path
    if path == "/ui" or path.startswith("/ui/"):
        response.headers.update(CONSOLE_HEADERS)
    return response


# ---- The factory -----------------------------------------------------------------


def check_access():
    return auth.refusal(endpoint.access_of(request.endpoint))


def create_app(test_config=None):
    # No static folder: an API serves no files (and every route is in /openapi.json).
    app = Flask(__name__, static_folder=None)
    app.config.from_mapping(settings.from_environment())
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
