"""Every setting of the service: an environment variable, its default, and why.

create_app reads them once (``from_environment``); tests pass overrides as
``create_app(test_config)``. docs/API.md, "Settings", lists them for operators.
"""

from __future__ import annotations

import os


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
        # Forget a worker LOST for this long that has no active job (same
        # durations; "off": never), as a chore (chores/workers.py): without it
        # every node_id ever registered stays in the table, and in GET /workers.
        # Unset or empty: the default.
        WORKER_RETENTION=os.environ.get("WORKER_RETENTION", "").strip() or "7d",
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
