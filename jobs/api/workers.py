"""Workers: registration, heartbeats (what to start and stop), the list, deregistration."""

from __future__ import annotations

import dataclasses
import logging

import orjson
from flask import current_app

from jobs import db, parse
from jobs.api import endpoint
from jobs.errors import ApiError
from jobs.responses import json_response, json_with_fragments, no_content
from jobs.schemas import (
    HeartbeatSchema,
    ListWorkersQuerySchema,
    RegisterWorkerSchema,
    WorkerListSchema,
    WorkerPath,
    WorkerSchema,
)
from jobs.store import workers as worker_store
from jobs.store.outcomes import NotFound

log = logging.getLogger("jobs")

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
    path=WorkerPath,
    body=RegisterWorkerSchema,
    body_required=False,
    responses={200: WorkerSchema},
    errors={400: "INVALID_WORKER_ID"},
)
def register_worker(node_id, body):
    info = {} if body is None else body["info"]
    with db.cursor() as cur:
        return json_response(worker_store.register(cur, node_id, info, lost_after_s()))


@endpoint(
    "/workers/<node_id>/heartbeat",
    "POST",
    access="worker",
    error_code="WORKER_HEARTBEAT_ERROR",
    summary="A worker is alive: its SCHEDULED and STOP_REQUESTED jobs, oldest first",
    path=WorkerPath,
    responses={200: HeartbeatSchema},
    errors=WORKER_ERRORS,
)
def heartbeat(node_id):
    with db.cursor() as cur:
        beat = worker_store.heartbeat(cur, node_id)
    if isinstance(beat, NotFound):
        raise worker_not_found(node_id)
    return json_response({"node_id": node_id, **dataclasses.asdict(beat)})


@endpoint(
    "/workers",
    "GET",
    access="read",
    error_code="SCHEDULER_LIST_WORKERS_ERROR",
    summary="Registered workers, most recently registered first, a page at a time",
    query=ListWorkersQuerySchema,
    responses={200: WorkerListSchema},
    errors={400: ("INVALID_QUERY_PARAMETERS", "LIMIT_INVALID", "LIMIT_TOO_LARGE")},
)
def list_workers(limit, cursor):
    after = worker_store.WorkerPosition() if cursor is None else cursor
    with db.cursor() as cur:
        page = worker_store.list_workers(cur, after, limit, lost_after_s())
    next_cursor = None if page.next is None else parse.worker_cursor(page.next)
    return json_with_fragments(
        {}, workers=f"[{','.join(page.workers_json)}]", next_cursor=orjson.dumps(next_cursor)
    )


@endpoint(
    "/workers/<node_id>",
    "DELETE",
    access="admin",
    error_code="DELETE_WORKER_ERROR",
    summary="Deregister a worker: its jobs stay, no longer under a lease (204 also when absent)",
    path=WorkerPath,
    responses={204: None},
    errors={400: "INVALID_WORKER_ID"},
)
def delete_worker(node_id):
    with db.cursor() as cur:
        forgotten = worker_store.delete_worker(cur, node_id)
    if forgotten:
        log.info("worker deregistered", extra={"fields": {"node_id": node_id}})
    return no_content()


@endpoint(
    "/workers/<node_id>",
    "GET",
    access="read",
    error_code="SCHEDULER_GET_WORKER_ERROR",
    summary="One worker, with its build info and status",
    path=WorkerPath,
    responses={200: WorkerSchema},
    errors=WORKER_ERRORS,
)
def get_worker(node_id):
    with db.cursor() as cur:
        worker_json = worker_store.get_worker(cur, node_id, lost_after_s())
    if isinstance(worker_json, NotFound):
        raise worker_not_found(node_id)
    return json_response(worker_json)
