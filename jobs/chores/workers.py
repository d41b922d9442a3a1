"""Worker retention: workers LOST for longer than WORKER_RETENTION, with no active
job, are forgotten (their row deleted), continuously, in small batches.

A chore: after a response, at most once per interval across every replica
and process, one bounded statement (store/workers.FORGET_WORKERS) deletes up
to FORGET_BATCH of them, oldest heartbeat first. A forgotten worker that
comes back gets 404 WORKER_NOT_FOUND from its next heartbeat and registers
again (docs/API.md, "Writing a worker"); its jobs were never touched.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from jobs.chores import Chore
from jobs.pruning import format_duration, parse_duration
from jobs.store import workers as worker_store

log = logging.getLogger("jobs")

# Up to 1,000 workers every 10 s across all replicas (100 a second, 8.6
# million a day), each run a single index-ordered statement looking at the
# FORGET_SCAN longest-lost workers at most (BENCHMARKS.md,
# "Design measurements: Forgetting lost workers"). Lost workers that keep a job waiting
# (SCHEDULED, which no lease expiry moves) are passed over; only when more
# than FORGET_SCAN of them are lost for longer than the retention does the
# chore stop reaching the idle ones behind them.
FORGET_INTERVAL_S = 10.0
FORGET_BATCH = 1000
FORGET_SCAN = 10 * FORGET_BATCH
OFF = "off"


def retention_setting(value) -> timedelta | None:
    """WORKER_RETENTION as configured: a duration (pruning.parse_duration), or "off"
    (None). A bad value stops the start-up with a message naming it."""
    if value is None or isinstance(value, timedelta):
        return value
    text = str(value).strip()
    if text.lower() == OFF:
        return None
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ValueError(f"WORKER_RETENTION: {exc} (or {OFF!r} to keep every worker)") from None


def forget_workers(cur, config) -> int:
    """Forget one batch of long-lost idle workers; how many."""
    forgotten = worker_store.forget_workers(
        cur,
        config["WORKER_RETENTION"].total_seconds(),
        config["WORKER_LOST_AFTER_S"],
        FORGET_BATCH,
        FORGET_SCAN,
    )
    if forgotten:
        log.info(
            "workers forgotten",
            extra={
                "fields": {
                    "forgotten": forgotten,
                    "lost_for": format_duration(config["WORKER_RETENTION"]),
                }
            },
        )
    return forgotten


def worker_retention_chore() -> Chore:
    return Chore(
        "worker_retention",
        FORGET_INTERVAL_S,
        forget_workers,
        enabled=lambda config: config.get("WORKER_RETENTION") is not None,
    )
