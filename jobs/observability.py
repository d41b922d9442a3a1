"""Request IDs, one JSON log line per request, and Prometheus metrics.

Metrics work under several gunicorn workers through prometheus-client's
multiprocess mode: gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a fresh
directory before any worker imports this module, and marks exited workers dead.
Without it (tests, `flask run`) the default in-process registry is used.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import time

import orjson
from flask import g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric

REQUESTS = Counter(
    "jobs_http_requests_total",
    "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"],
)
# Incremented by the process whose lease sweep moved the jobs (summed over the
# instance's processes like every counter here; sum() across replicas).
LEASES_EXPIRED = Counter(
    "jobs_leases_expired_total",
    "Jobs moved because their worker was LOST, by the status they moved to.",
    ["status"],
)
# Automatic retries (docs/API.md, "Attempts and retries"), counted by the
# process that made the change (sum() across processes and replicas, like
# jobs_leases_expired_total). Scheduled: a FAILED change below max_attempts
# set retry_at, by what failed the job; performed: the retry sweep moved a
# due job back to SCHEDULED, on its own worker or on another (its was LOST).
RETRY_SCHEDULED_VIA = ("report", "lease_expiry")
RETRIES_SCHEDULED = Counter(
    "jobs_retries_scheduled_total",
    "Failed jobs given an automatic retry, by what failed them (report, lease_expiry).",
    ["via"],
)
RETRY_PLACEMENTS = ("same_node", "other_node")
RETRIES_PERFORMED = Counter(
    "jobs_retries_performed_total",
    "Automatic retries made (FAILED -> SCHEDULED), on the job's node or on another.",
    ["placement"],
)
# Refused as 409 STALE_ATTEMPT: a status report or a file registration naming
# another worker or attempt than the job's (a late or moved worker).
STALE_REPORT_KINDS = ("status", "files")
STALE_REPORTS = Counter(
    "jobs_stale_reports_total",
    "Reports refused because they named another worker or attempt than the job's.",
    ["report"],
)
_retries_scheduled = {via: RETRIES_SCHEDULED.labels(via) for via in RETRY_SCHEDULED_VIA}
_retries_performed = {p: RETRIES_PERFORMED.labels(p) for p in RETRY_PLACEMENTS}
_stale_reports = {kind: STALE_REPORTS.labels(kind) for kind in STALE_REPORT_KINDS}


def count_retries_scheduled(via: str, jobs: int = 1) -> None:
    if jobs:
        _retries_scheduled[via].inc(jobs)


def count_retries_performed(same_node: int, other_node: int) -> None:
    if same_node:
        _retries_performed["same_node"].inc(same_node)
    if other_node:
        _retries_performed["other_node"].inc(other_node)


def count_stale_report(kind: str) -> None:
    _stale_reports[kind].inc()


# Requests waiting right now (waiting.py), by kind: heartbeat, events, follow; each
# counted from its first sleep, after its first look at the database (waiting.Waiter).
# Summed over the instance's live processes.
WAIT_KINDS = ("heartbeat", "events", "follow")
WAITING = Gauge(
    "jobs_waiting_requests",
    "Requests waiting right now (long-polled heartbeats and events, follow streams), by kind.",
    ["kind"],
    multiprocess_mode="livesum",
)
for _kind in WAIT_KINDS:
    WAITING.labels(_kind)
WAIT_CONNECTS = Counter(
    "jobs_wait_connects_total",
    "Connections the waiting machinery made, by mode (listen, or poll through a pooler);"
    " more than one per process means it reconnected.",
    ["mode"],
)
LATENCY = Histogram(
    "jobs_http_request_duration_seconds",
    "Time to answer HTTP requests, by method and route template.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

# Who deleted the history: DELETE /jobs?status= ("api"), the JOB_RETENTION
# chore ("retention"), flask prune ("prune"; counted in the command's own
# process, so only visible when it shares PROMETHEUS_MULTIPROC_DIR). A fixed
# set, each series created at zero.
PRUNED_VIA = ("api", "retention", "prune")
PRUNED = Counter(
    "jobs_pruned_total",
    "Terminal jobs deleted in bulk (with their events, tables and files), by who deleted them.",
    ["via"],
)
_pruned = {via: PRUNED.labels(via) for via in PRUNED_VIA}


# Requests answered 503 SERVICE_BUSY because no pooled database connection was
# free within DB_POOL_TIMEOUT_S, by route template (a fixed set).
OVERLOAD = Counter(
    "jobs_overload_total",
    "Requests answered 503 SERVICE_BUSY (no database connection free in time), by route template.",
    ["route"],
)


def count_overload(route: str) -> None:
    OVERLOAD.labels(route).inc()


def count_pruned(via: str, jobs: int) -> None:
    if jobs:
        _pruned[via].inc(jobs)


# Where the reads of routes declared replica=True were answered (api/registry.py,
# db.read_on_replica), and why one went to the primary though replicas are set:
# "lag" (none known to be within REPLICA_MAX_LAG_S), "down" (none reachable, or
# the read failed on one and ran again on the primary). Fixed sets, each at zero.
READ_TARGETS = ("primary", "replica")
READS = Counter(
    "jobs_db_reads_total",
    "Reads of the routes that may go to a replica, by where they were answered.",
    ["target"],
)
_reads = {target: READS.labels(target) for target in READ_TARGETS}
FALLBACK_REASONS = ("lag", "down")
FALLBACKS = Counter(
    "jobs_replica_fallbacks_total",
    "Reads that went to the primary though replicas are configured, by why.",
    ["reason"],
)
_fallbacks = {reason: FALLBACKS.labels(reason) for reason in FALLBACK_REASONS}
# Per replica (its position in DATABASE_REPLICA_URL, never its URL): the
# largest over the instance's live processes, +Inf while down or not yet known.
REPLICA_AGE = Gauge(
    "jobs_replica_lag_seconds",
    "How old a replica's data was at its last check (at most), by replica number.",
    ["replica"],
    multiprocess_mode="livemax",
)


def count_read(target: str) -> None:
    _reads[target].inc()


def count_fallback(reason: str) -> None:
    _fallbacks[reason].inc()


def replica_age(number: int, seconds: float | None) -> None:
    REPLICA_AGE.labels(str(number)).set(float("inf") if seconds is None else seconds)


access_log = logging.getLogger("jobs.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(incoming: str | None) -> str:
    """The caller's X-Request-ID when it is a sane token, else a new one."""
    if incoming and _REQUEST_ID.fullmatch(incoming):
        return incoming
    return os.urandom(16).hex()


# Label values come from fixed sets, or every made-up method becomes a series
# of its own: 20,000 requests `N000123ZZ /jobs` (405s, no token needed) grew
# /metrics from 31 KB to 32 MB and its render to 16 s. The route is a
# registered rule or "<unmatched>" (the caller passes it), the status is
# bounded by HTTP, and a method outside this set is "other". (The access
# line keeps the method as sent: a log line is not a series.)
METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})

# labels() costs more than the increment: keep each series' child.
_series: dict[tuple, tuple] = {}


def record_request(method, route, status, seconds, req_id) -> None:
    label = method if method in METHOD_LABELS else "other"
    key = (label, route, status)
    series = _series.get(key)
    if series is None:
        series = (REQUESTS.labels(label, route, str(status)), LATENCY.labels(label, route))
        _series[key] = series
    series[0].inc()
    series[1].observe(seconds)
    if access_log.isEnabledFor(logging.INFO):
        _write_access_line(
            {
                "ts": _rfc3339(),
                "level": "info",
                "logger": "jobs.access",
                "msg": "request",
                "method": method,
                "route": route,
                "status": status,
                "duration_ms": round(seconds * 1000, 3),
                "request_id": req_id,
            }
        )


def _rfc3339(seconds: float | None = None) -> str:
    """A log line's timestamp: UTC, microseconds, Z; now unless ``seconds`` is given."""
    moment = time.time() if seconds is None else seconds
    whole = int(moment)
    return f"{_utc_second(whole)}.{int((moment - whole) * 1_000_000):06d}Z"


@functools.lru_cache(maxsize=4)
def _utc_second(whole: int) -> str:
    # Formatted once per second: datetime's isoformat on every request was a
    # visible share of a GET (BENCHMARKS.md, "Design measurements: Log timestamps").
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def _write_access_line(entry: dict) -> None:
    """The line JsonFormatter would make, written by the same handlers without a LogRecord.

    A request's own bookkeeping is the one log call on every request, and the
    logging machinery (record, filters, formatter) cost as much as the rest
    of it together.
    """
    line = orjson.dumps(entry).decode()
    for handler in _json_handlers(access_log):
        with handler.lock:
            try:
                handler.stream.write(line + handler.terminator)
                handler.flush()
            except (OSError, ValueError):
                # A closed or broken stdout (EPIPE) must not turn the answer
                # into a 500; logging's own handlers swallow it the same way.
                pass


def _json_handlers(logger: logging.Logger):
    while logger is not None:
        for handler in logger.handlers:
            if getattr(handler, "jobs_json", False):
                yield handler
        logger = logger.parent if logger.propagate else None


def init_app(app) -> None:
    """Time every request, give it an X-Request-ID, and count and log it when answered."""

    def start():
        g.started = time.perf_counter()
        g.request_id = request_id(request.environ.get("HTTP_X_REQUEST_ID"))

    def finish(response):
        response.headers["X-Request-ID"] = g.get("request_id") or request_id(None)
        rule = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        record_request(
            request.method,
            rule,
            response.status_code,
            time.perf_counter() - g.get("started", time.perf_counter()),
            g.get("request_id"),
        )
        return response

    app.before_request(start)
    app.after_request(finish)


def render_metrics(*families: Metric) -> tuple[bytes, str]:
    """The exposition of every process's metrics, then ``families`` computed for this scrape."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    body = generate_latest(registry)
    if families:
        body += generate_latest(_Families(families))
    return body, CONTENT_TYPE_LATEST


class _Families:
    """A collector of ready-made metric families (for generate_latest)."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return iter(self.families)


def worker_gauge(alive: int, lost: int) -> Metric:
    """Registered workers by status, counted in the database at scrape time.

    At scrape time rather than a gauge the lease sweep sets: the sweep runs in
    one process of one replica per interval, so every other process and
    replica would export a stale value; a count of the workers table is the
    same from whichever replica Prometheus asks.
    """
    gauge = GaugeMetricFamily(
        "jobs_workers", "Registered workers, by status (ALIVE or LOST).", labels=["status"]
    )
    gauge.add_metric(["ALIVE"], alive)
    gauge.add_metric(["LOST"], lost)
    return gauge


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what any log shipper reads without configuration."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str = "INFO") -> None:
    """Send the service's logs to stdout as JSON lines, at ``level`` (LOG_LEVEL;
    once per process)."""
    logger = logging.getLogger("jobs")
    if any(getattr(h, "jobs_json", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler.jobs_json = True
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
