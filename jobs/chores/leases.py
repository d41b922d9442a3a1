"""The lease sweep: jobs of LOST workers leave their active statuses.

A chore: after a response, at most once per interval across every replica
and process, one bounded statement (store/workers.EXPIRE_LEASES) moves up to
EXPIRY_BATCH jobs of lost workers along domain.LEASE_EXPIRY, in its own
greenlet (chores.init_app): no request waits for it.

The interval is min(5 s, WORKER_LOST_AFTER_S / 2): a worker is LOST
WORKER_LOST_AFTER_S after its last heartbeat, and its jobs move at the next
sweep, so given any traffic they move within WORKER_LOST_AFTER_S + 5 s (a
few intervals more when one worker had over EXPIRY_BATCH leased jobs).
What a sweep costs on a 1M-job table: BENCHMARKS.md, "The lease sweep".
"""

from __future__ import annotations

import logging

from jobs import observability
from jobs.chores import Chore
from jobs.store import jobs as job_store
from jobs.store import workers as worker_store

log = logging.getLogger("jobs")

EXPIRY_BATCH = 500


def sweep_interval(config) -> float:
    return min(5.0, config["WORKER_LOST_AFTER_S"] / 2)


def expire_leases(cur, config) -> dict[str, int]:
    """Move one batch of lost workers' jobs; the count per new status."""
    moved = worker_store.expire_leases(
        cur,
        config["WORKER_LOST_AFTER_S"],
        EXPIRY_BATCH,
        job_store.Backoff.of(config),
    )
    for status, count in moved.items():
        observability.LEASES_EXPIRED.labels(status).inc(count)
    # A RUNNING job failed below its max_attempts waits for its retry.
    observability.count_retries_scheduled("lease_expiry", moved.retries_scheduled)
    if moved:
        log.info("leases expired", extra={"fields": {"moved": moved}})
    return moved


def lease_chore() -> Chore:
    return Chore("lease_expiry", sweep_interval, expire_leases)
