"""Operations: liveness, readiness, metrics and the OpenAPI document (all open)."""

from __future__ import annotations

import logging
import threading
import time

import psycopg2
from flask import current_app

from jobs import observability, pool, readiness
from jobs.api import endpoint, openapi
from jobs.responses import json_response
from jobs.schemas import HealthSchema
from jobs.store import workers as worker_store

log = logging.getLogger("jobs")


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
    summary="Readiness: settings allowed, SELECT 1 and the schema within 1 s "
    "(checked once per second per process)",
    responses={200: HealthSchema, 503: HealthSchema},
)
def readyz():
    checker = current_app.extensions.get("jobs_readiness")
    if checker is None:
        checker = current_app.extensions.setdefault("jobs_readiness", readiness.Readiness())
    outcome = checker.outcome(current_app.config)
    return json_response(outcome.body(), 200 if outcome.ready else 503)


@endpoint(
    "/metrics",
    "GET",
    access="open",
    summary="Prometheus metrics",
    responses={200: {"text/plain": {"schema": {"type": "string"}}}},
)
def metrics():
    counter = current_app.extensions.setdefault("jobs_worker_counter", WorkerCounter())
    body, content_type = observability.render_metrics(*counter.gauges(current_app.config))
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


class WorkerCounter:
    """Workers by status for /metrics, counted at most once per TTL_S per process.

    /metrics is open to anyone: a flood of scrapes must not open a database
    connection each, so the last count is served meanwhile. The count runs on a
    connection of its own that gives up after READY_TIMEOUT_S: /metrics answers
    at once whatever the database does, without this family while it does not answer.
    """

    TTL_S = 5.0

    def __init__(self):
        self.expires = 0.0
        self.families: list = []
        self.lock = threading.Lock()

    def gauges(self, cfg) -> list:
        if time.monotonic() < self.expires or not self.lock.acquire(blocking=False):
            return self.families  # fresh enough, or another scrape is counting
        try:
            ((alive, lost),) = pool.query_once(
                cfg["DATABASE_URL"],
                cfg["READY_TIMEOUT_S"],
                worker_store.COUNT_WORKERS,
                {"lost_after_s": cfg["WORKER_LOST_AFTER_S"]},
                application_name="jobs-metrics",
            )
            self.families = [observability.worker_gauge(alive, lost)]
        except psycopg2.Error as exc:
            log.warning(
                "metrics: workers not counted", extra={"fields": {"error": type(exc).__name__}}
            )
            self.families = []
        finally:
            self.lock.release()
        self.expires = time.monotonic() + self.TTL_S
        return self.families
