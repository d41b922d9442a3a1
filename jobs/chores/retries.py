"""The retry sweep: failed jobs whose automatic retry is due are scheduled again.

A chore: after a response, at most once per RETRY_SWEEP_INTERVAL_S (5 s at
most) across every replica and process, one bounded statement
(store/workers.RETRY_DUE) moves up to RETRY_BATCH due jobs FAILED ->
SCHEDULED with their next attempt, each with one SCHEDULED event, on the
job's own worker or, when that one is LOST, on the least loaded ALIVE one.
The claim keeps two replicas from sweeping in the same interval, and the
statement's guard (still FAILED, still due, not locked by another sweep)
keeps a retry from ever being made twice if two sweeps overlap anyway.

A due retry is therefore made within RETRY_SWEEP_INTERVAL_S as long as the
service gets traffic (more than RETRY_BATCH due at once take one interval
per batch). What a sweep costs on a 1M-job table: BENCHMARKS.md, "Retries and fencing".
"""

from __future__ import annotations

import logging

from jobs import observability
from jobs.chores import Chore
from jobs.store import workers as worker_store

log = logging.getLogger("jobs")

RETRY_BATCH = 500


def sweep_interval(config) -> float:
    return float(config["RETRY_SWEEP_INTERVAL_S"])


def retry_due(cur, config) -> worker_store.Retried:
    """Schedule one batch of due retries; how many, and how many changed worker."""
    retried = worker_store.retry_due(cur, config["WORKER_LOST_AFTER_S"], RETRY_BATCH)
    observability.count_retries_performed(retried.retried - retried.moved, retried.moved)
    if retried.retried:
        log.info(
            "retries scheduled again",
            extra={"fields": {"retried": retried.retried, "to_other_node": retried.moved}},
        )
    return retried


def retry_chore() -> Chore:
    return Chore("retries", sweep_interval, retry_due)
