"""Workers: registration, heartbeats (what to start and stop, and the leases), the list,
deregistration."""

from __future__ import annotations

import logging
import time

import orjson
from flask import current_app

from jobs import db, parse
from jobs.api import endpoint, waits
from jobs.errors import ApiError
from jobs.responses import json_response, json_with_fragments, no_content
from jobs.schemas import (
    HeartbeatQuerySchema,
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
    summary="A worker is alive: its SCHEDULED and STOP_REQUESTED jobs, and its leases "
    "(every active job with its attempt), oldest first"
    " (with ?wait=S, as soon as there are any, within S seconds)",
    path=WorkerPath,
    query=HeartbeatQuerySchema,
    responses={200: HeartbeatSchema},
    errors={**WORKER_ERRORS, **waits.BUSY_ERRORS},
)
def heartbeat(node_id, wait):
    if not wait or waits.hub().stopping:
        with db.cursor() as cur:
            return heartbeat_answer(node_id, worker_store.heartbeat(cur, node_id))
    # Registered before the first look, so nothing scheduled after it goes unheard.
    hub, waiter = waits.register(("node", node_id), "heartbeat")
    try:
        deadline = time.monotonic() + wait
        with db.cursor() as cur:
            beat = worker_store.heartbeat(cur, node_id, wait_s=wait)
        # Idle: nothing to start or stop yet; the worker is marked waiting (never
        # LOST meanwhile: ``mine``) and this request holds no connection while it sleeps.
        mine = None if isinstance(beat, NotFound) else beat.mine
        while not isinstance(beat, NotFound) and beat.idle:
            db.release()
            final = not hub.sleep(waiter, deadline)
            with db.cursor() as cur:
                beat = worker_store.heartbeat(cur, node_id, mine=mine, final=final)
            if final:
                break
    finally:
        hub.unregister(waiter)
    return heartbeat_answer(node_id, beat)


def heartbeat_answer(node_id: str, beat):
    if isinstance(beat, NotFound):
        raise worker_not_found(node_id)
    return json_response(heartbeat_body(node_id, beat))


def heartbeat_body(node_id: str, beat: worker_store.Heartbeat) -> dict:
    """The heartbeat's answer, built here only (whether it waited or not)."""
    return {
        "node_id": node_id,
        "heartbeat_at": beat.heartbeat_at,
        "scheduled": beat.scheduled,
        "stop_requested": beat.stop_requested,
        "leases": beat.leases,
    }


@endpoint(
    "/workers",
    "GET",
    access="read",
    error_code="SCHEDULER_LIST_WORKERS_ERROR",
    replica=True,
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
    replica=True,
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
