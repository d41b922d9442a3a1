"""Every setting of the service: an environment variable, its default, and why.

create_app reads them once (``from_environment``); tests pass overrides as
``create_app(test_config)``. docs/API.md, "Settings", lists them for operators.
"""

from __future__ import annotations

import os

from jobs.domain import MAX_ATTEMPTS_LIMIT


def from_environment() -> dict:
    return dict(
        DATABASE_URL=os.environ.get("DATABASE_URL", "postgresql:///jobs"),
        ADMIN_TOKEN=os.environ.get("ADMIN_TOKEN") or None,
        WORKER_TOKEN=os.environ.get("WORKER_TOKEN") or None,
        STATEMENT_TIMEOUT_MS=_env_int("STATEMENT_TIMEOUT_MS", 5000),
        # The time one DELETE /jobs request spends deleting. A per-request
        # budget rather than one statement's timeout: a delete by status runs batches of
        # BULK_DELETE_BATCH jobs, each its own short transaction, and starts
        # none after the budget, answering 200 {"deleted", "more": true}; a
        # statement timeout instead cut one huge statement, deleting nothing
        # (a 500 at 25 s past ~1.4M jobs). Half of it limits each batch
        # statement (history.batch_timeout_ms), so the worst case, a batch
        # stuck on a lock from the budget's last moment, ends within twice
        # the budget: 20 s with 10 s.
        BULK_DELETE_BUDGET_MS=_env_int("BULK_DELETE_BUDGET_MS", 10000),
        # The most jobs one batch deletes (history.BatchSizer shrinks batches
        # whose jobs carry many files). 1000 jobs with 2 events each: 10-30 ms,
        # 60-100k jobs/s; larger caps gained nothing beyond the shared box's
        # noise and hold their locks longer (BENCHMARKS.md, Deleting history).
        BULK_DELETE_BATCH=_env_int("BULK_DELETE_BATCH", 1000),
        # Delete terminal jobs whose last change is older than this (30d, 12h,
        # 90m, 45s), continuously, as a chore (history.py). Unset: off.
        JOB_RETENTION=os.environ.get("JOB_RETENTION") or None,
        # A body of at most 1 MiB arrives in well under this from any real
        # client; one sent a byte at a time would otherwise hold its
        # connection (and, by the thousand, a worker's WORKER_CONNECTIONS) for
        # as long as it likes: 408 and the connection closed. The request
        # line and headers have gunicorn's own deadline (KEEPALIVE_S).
        BODY_READ_TIMEOUT_S=_env_seconds("BODY_READ_TIMEOUT_S", 10),
        DB_CONNECT_TIMEOUT_S=_env_int("DB_CONNECT_TIMEOUT_S", 3),
        DB_POOL_SIZE=_env_int("DB_POOL_SIZE", 4),
        DB_POOL_TIMEOUT_S=_env_int("DB_POOL_TIMEOUT_S", 5),
        # A registered worker without a heartbeat for this long is LOST and its
        # leases expire (leases.py).
        WORKER_LOST_AFTER_S=_env_seconds("WORKER_LOST_AFTER_S", 30),
        # Attempts a job gets unless POST /jobs says otherwise: 1 is no
        # automatic retry (docs/API.md, "Attempts and retries").
        JOB_MAX_ATTEMPTS=_env_in_range("JOB_MAX_ATTEMPTS", 1, 1, MAX_ATTEMPTS_LIMIT, int),
        # A failed job's retry waits RETRY_BACKOFF_S x 2^(attempt - 1) seconds,
        # at most RETRY_BACKOFF_MAX_S: 10 s, 20 s, 40 s ... an hour. At most a
        # day either way, so that a retry is never put off for good by a typo.
        RETRY_BACKOFF_S=_env_in_range("RETRY_BACKOFF_S", 10.0, 0.001, 86400.0),
        RETRY_BACKOFF_MAX_S=_env_in_range("RETRY_BACKOFF_MAX_S", 3600.0, 0.001, 86400.0),
        # How often the retry sweep looks for due retries (chores/retries.py):
        # a due retry is made within this (given traffic), so at most 5 s, and
        # the 10 s the API promises hold.
        RETRY_SWEEP_INTERVAL_S=_env_in_range("RETRY_SWEEP_INTERVAL_S", 5.0, 0.01, 5.0),
        READY_TIMEOUT_S=1.0,
        MAX_CONTENT_LENGTH=1024 * 1024,
    )


def _env_int(name: str, default: int) -> int:
    """A positive whole number; anything else stops the start-up with a message naming it."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be a positive whole number, not {value!r}")
    return int(value)


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    seconds = float(value) if value.strip() else default
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds")
    return seconds


def _env_in_range(name: str, default, low, high, kind=float):
    """A number in low..high (a whole one when ``kind`` is int); anything else stops the
    start-up with a message naming the variable and the range."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{name} must be {what} in {low:g}..{high:g}, not {text!r}")
    return value
