"""What the waiting routes share: a waiter of this process's hub (waiting.py), or a 503."""

from __future__ import annotations

from flask import current_app

from jobs import waiting
from jobs.errors import ApiError

BUSY_ERRORS = {503: "SERVICE_BUSY"}
# Long enough for waits to end elsewhere, short enough for a worker's heartbeat
# to stay well within WORKER_LOST_AFTER_S.
RETRY_AFTER_S = 1


def hub() -> waiting.Hub:
    return waiting.of(current_app)


def register(key: tuple, kind: str) -> tuple[waiting.Hub, waiting.Waiter]:
    """A waiter for ``key``; 503 SERVICE_BUSY when the process holds its WAITERS_PER_PROCESS."""
    current = hub()
    try:
        return current, current.register(key, kind)
    except waiting.Busy:
        raise ApiError(
            503,
            "SERVICE_BUSY",
            f"this process holds {current.capacity} waiting requests already:"
            f" retry in {RETRY_AFTER_S} s, or ask without wait",
            {"Retry-After": str(RETRY_AFTER_S)},
        ) from None
