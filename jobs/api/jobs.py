"""Jobs: list, get, schedule, move through the status machine, history, delete."""

from __future__ import annotations

import logging
import time

from flask import current_app, request

from jobs import db, observability, parse, pruning
from jobs.api import endpoint, follow, waits
from jobs.domain import MAX_EVENTS_PAGE, MAX_JOB_ID
from jobs.errors import ApiError, database_errors_answer
from jobs.responses import json_response, json_with_fragments, no_content
from jobs.schemas import (
    BulkDeleteProgressSchema,
    BulkDeleteSchema,
    CreateJobSchema,
    DeleteJobsQuerySchema,
    EventListSchema,
    EventsQuerySchema,
    JobEventPath,
    JobEventSchema,
    JobListSchema,
    JobPath,
    JobSchema,
    ListJobsQuerySchema,
    StatusReportSchema,
)
from jobs.store import jobs as job_store
from jobs.store.outcomes import Blocked, Moved, NotFound, Refused

log = logging.getLogger("jobs")

JOB_ERRORS = {400: "INVALID_JOB_ID", 404: "JOB_NOT_FOUND"}


def job_not_found(job_id: int) -> ApiError:
    return ApiError(404, "JOB_NOT_FOUND", f"job {job_id} not found")


@endpoint(
    "/jobs",
    "GET",
    access="read",
    error_code="LIST_JOBS_ERROR",
    replica=True,
    summary="List jobs, newest first, with cursor paging and status and node filters",
    query=ListJobsQuerySchema,
    responses={200: JobListSchema},
    errors={400: ("INVALID_QUERY_PARAMETERS", "LIMIT_INVALID", "LIMIT_TOO_LARGE")},
)
def list_jobs(limit, last_job_id, status, node_id):
    max_id = MAX_JOB_ID if last_job_id is None else last_job_id - 1
    with db.cursor() as cur:
        page = job_store.list_page(cur, status, max_id, limit, node_id)
    cursor = "null" if page.next_cursor is None else str(page.next_cursor)
    # One join of the jobs' JSON, the object's head and tail stuck to the
    # first and last job, and the rows let go before the body is encoded: a
    # page of MAX_PAGE_BYTES is held twice at most, where joining piece by
    # piece held it four times (BENCHMARKS.md, "Design measurements: A page's body").
    parts = page.jobs_json or [""]
    parts[0] = '{"jobs":[' + parts[0]
    parts[-1] = f'{parts[-1]}],"next_cursor":{cursor}}}'
    body = ",".join(parts)
    del page, parts
    return json_response(body)


@endpoint(
    "/jobs",
    "POST",
    access="admin",
    error_code="CREATE_JOB_ERROR",
    summary="Schedule a job (idempotent with idempotency_key)",
    body=CreateJobSchema,
    responses={201: JobSchema, 200: JobSchema},
)
def create_job(body):
    max_attempts = body["max_attempts"]
    if max_attempts is None:
        max_attempts = current_app.config["JOB_MAX_ATTEMPTS"]
    with db.cursor() as cur:
        created = job_store.create_job(
            cur, body["node_id"], body["descriptor"], body["idempotency_key"], max_attempts
        )
    if not created.new:
        return json_response(created.job_json, 200)
    return json_response(created.job_json, 201, {"Location": f"/jobs/{created.job_id}"})


@endpoint(
    "/jobs/<job_id>",
    "GET",
    access="read",
    error_code="GET_JOB_ERROR",
    replica=True,
    summary="Get one job",
    path=JobPath,
    responses={200: JobSchema},
    errors=JOB_ERRORS,
)
def get_job(job_id):
    with db.cursor() as cur:
        job_json = job_store.get_job(cur, job_id)
    if isinstance(job_json, NotFound):
        raise job_not_found(job_id)
    return json_response(job_json)


@endpoint(
    "/jobs/<job_id>/events",
    "GET",
    access="read",
    error_code="GET_JOB_EVENTS_ERROR",
    # A replica answers the plain read; a wait or a follow stream reads the primary,
    # where the commit that wakes it is (a replica may not have replayed it yet).
    replica=lambda args: not args["wait"] and not args["follow"],
    summary="The job's history, oldest first, a page at a time; ?wait=S waits for the next"
    " event, ?follow=true streams them (text/event-stream)",
    path=JobPath,
    query=EventsQuerySchema,
    responses={
        200: {
            "application/json": {"schema": EventListSchema},
            "text/event-stream": {
                # The shape of each event of the stream (OpenAPI's reading of SSE).
                "schema": {
                    "type": "object",
                    "description": "with follow=true: id:, event: and data: (the event's "
                    "JSON) per event, comment lines as keep-alives",
                    "properties": {
                        "id": {"type": "string"},
                        "event": {"type": "string"},
                        "data": {"type": "string"},
                    },
                }
            },
        }
    },
    errors={
        **JOB_ERRORS,
        400: ("INVALID_JOB_ID", "LIMIT_INVALID", "LIMIT_TOO_LARGE"),
        **waits.BUSY_ERRORS,
    },
)
def get_events(job_id, after, limit, wait, follow):
    if follow:
        return follow_events(job_id, after)
    if not wait or waits.hub().stopping:
        with db.cursor() as cur:
            return events_answer(job_id, job_store.events_page(cur, job_id, after or 0, limit))
    # Registered before the first look, so nothing committed after it goes unheard.
    hub, waiter = waits.register(("job", job_id), "events")
    try:
        deadline = time.monotonic() + wait
        with db.cursor() as cur:
            if after is None:  # what comes after the latest event at arrival
                after = job_store.latest_event_id(cur, job_id)
            page = (
                after
                if isinstance(after, NotFound)
                else job_store.events_page(cur, job_id, after, limit)
            )
        # No event yet: wait, holding no connection, for the first (or a delete).
        while not isinstance(page, NotFound) and not page.events:
            db.release()
            if not hub.sleep(waiter, deadline):
                break
            with db.cursor() as cur:
                page = job_store.events_page(cur, job_id, after, limit)
    finally:
        hub.unregister(waiter)
    return events_answer(job_id, page)


def events_answer(job_id: int, page):
    if isinstance(page, NotFound):
        raise job_not_found(job_id)
    cursor = "null" if page.next_cursor is None else str(page.next_cursor)
    return json_with_fragments({"job_id": job_id}, events=page.events_json, next_cursor=cursor)


def follow_events(job_id: int, after: int | None):
    last_event_id = request.headers.get("Last-Event-ID", "")
    if last_event_id.strip():  # a reconnection resumes after what it has
        after = parse.last_event_id_from_header(last_event_id)
    after = after or 0
    hub, waiter = waits.register(("job", job_id), "follow")
    try:
        with db.cursor() as cur:
            first = job_store.events_page(cur, job_id, after, MAX_EVENTS_PAGE)
        if isinstance(first, NotFound):
            raise job_not_found(job_id)
        stream = follow.EventStream(
            job_id, first, after, hub, waiter, db.get_pool(), current_app.config
        )
    except BaseException:
        hub.unregister(waiter)
        raise
    # The request's connection goes back when the view returns, before the stream
    # starts; the stream borrows one for each look.
    return current_app.response_class(stream, 200, follow.HEADERS, content_type="text/event-stream")


@endpoint(
    "/jobs/<job_id>/events/<event_id>",
    "GET",
    access="read",
    error_code="GET_JOB_EVENT_ERROR",
    replica=True,
    summary="One event of the job's history",
    path=JobEventPath,
    responses={200: JobEventSchema},
    errors={400: "INVALID_JOB_ID", 404: ("JOB_NOT_FOUND", "EVENT_NOT_FOUND")},
)
def get_event(job_id, event_id):
    with db.cursor() as cur:
        found = job_store.get_event(cur, job_id, event_id)
    match found:
        case NotFound():
            raise job_not_found(job_id)
        case job_store.NoSuchEvent():
            raise ApiError(404, "EVENT_NOT_FOUND", f"job {job_id} has no event {event_id}")
        case _:
            return json_response(found.event_json)


# ---- Moves through the status machine ---------------------------------------


def stale_attempt(job_id: int, stale: job_store.Stale, kind: str) -> ApiError:
    observability.count_stale_report(kind)
    return ApiError(
        409,
        "STALE_ATTEMPT",
        f"job {job_id} is now on node {stale.node_id!r}, attempt {stale.attempt}:"
        " this report is for another worker or attempt, and nothing changed",
    )


@endpoint(
    "/jobs/<job_id>/stop",
    ("PUT", "POST"),
    access="admin",
    error_code="STOP_JOB_ERROR",
    summary="Request a stop (idempotent): SCHEDULED/RUNNING become STOP_REQUESTED; "
    "a FAILED job's pending retry is cancelled",
    path=JobPath,
    responses={200: JobSchema},
    errors=JOB_ERRORS,
)
def request_stop(job_id):
    with db.cursor() as cur:
        outcome = job_store.request_stop(cur, job_id)
    match outcome:
        case NotFound():
            raise job_not_found(job_id)
        # Refused: any status the stop cannot move from is already stopping or
        # finished (and waits for no retry), and the stop is idempotent.
        case Moved(job_json) | Refused(job_json=job_json):
            return json_response(job_json)


@endpoint(
    "/jobs/<job_id>/status",
    "PUT",
    access="worker",
    error_code="UPDATE_JOB_STATUS_ERROR",
    summary="A worker reports a status transition (fenced by node_id and attempt when given)",
    path=JobPath,
    body=StatusReportSchema,
    responses={200: JobSchema},
    errors={**JOB_ERRORS, 409: ("STALE_ATTEMPT", "INVALID_STATE_TRANSITION")},
)
def report_status(job_id, body):
    to = body["status"]
    # With SCHEDULED, node_id is where the job goes; with any other status, the
    # reporting worker, which must be the job's (the fence).
    moving = to == "SCHEDULED"
    with db.cursor() as cur:
        outcome = job_store.change_status(
            cur,
            job_id,
            to,
            body["node_id"] if moving else None,
            body["detail"],
            fence_node=None if moving else body["node_id"],
            fence_attempt=body["attempt"],
            retryable=body["retryable"] is not False,
            backoff=job_store.Backoff.of(current_app.config),
        )
    match outcome:
        case NotFound():
            raise job_not_found(job_id)
        case job_store.Stale():
            raise stale_attempt(job_id, outcome, "status")
        case Refused(status=before) if before != to:
            raise ApiError(
                409, "INVALID_STATE_TRANSITION", f"job {job_id} is {before}: it cannot move to {to}"
            )
        case job_store.RetryScheduled(job_json):
            observability.count_retries_scheduled("report")
            return json_response(job_json)
        # Reporting the status the job already has is a no-op (a worker's retry).
        case Moved(job_json) | Refused(job_json=job_json):
            return json_response(job_json)


# ---- Deletes -------------------------------------------------------------------


@endpoint(
    "/jobs/<job_id>",
    "DELETE",
    access="admin",
    error_code="DELETE_JOB_ERROR",
    summary="Delete a terminal job (idempotent: 204 also when it does not exist)",
    path=JobPath,
    responses={204: None},
    errors={400: "INVALID_JOB_ID", 409: "JOB_CONFLICT"},
)
def delete_job(job_id):
    with db.cursor() as cur:
        outcome = job_store.delete_job(cur, job_id)
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
    body_excludes="status",
    responses={204: None, 200: BulkDeleteProgressSchema},
    errors={409: "JOB_CONFLICT", 500: "DELETE_JOBS_ERROR"},
)
def delete_jobs(status, body):
    # Both forms at once are refused by the declaration (body_excludes): deleting
    # by status would silently ignore the listed ids, deleting far more than asked.
    if status is None:
        return delete_listed_jobs(body)
    # In batches, each its own transaction, for at most the request's budget
    # (pruning.py): any backlog gets an answer in time, and repeating continues.
    pruned = pruning.delete_by_status(status)
    log.info(
        "bulk delete",
        extra={"fields": {"statuses": status, "deleted": pruned.deleted, "more": pruned.more}},
    )
    if pruned.more:
        return json_response({"deleted": pruned.deleted, "more": True}, 200)
    return no_content()


def delete_listed_jobs(body):
    """DELETE /jobs with {"job_ids": [...]}: exactly those jobs, all or nothing.

    One statement: at most 1000 jobs, so it needs no batches.
    """
    if body is None:
        raise ApiError(400, "INVALID_QUERY_PARAM", "status is required (or a body with job_ids)")
    timeout_ms = pruning.batch_timeout_ms(current_app.config)
    with database_errors_answer("DELETE_JOBS_ERROR"), db.transaction(timeout_ms) as cur:
        outcome = job_store.delete_jobs_by_ids(cur, body["job_ids"])
    if isinstance(outcome, Blocked):
        raise ApiError(
            409, "JOB_CONFLICT", f"job {outcome.job_id} is {outcome.status}: nothing was deleted"
        )
    return no_content()
