"""The lease sweep: jobs of LOST workers leave their active statuses.

A chore (chores.py): after a response, at most once per interval across every
replica and process, one bounded statement (store/workers.EXPIRE_LEASES)
moves up to EXPIRY_BATCH jobs of lost workers along schemas.LEASE_EXPIRY.

The interval is min(5 s, WORKER_LOST_AFTER_S / 2): a worker is LOST
WORKER_LOST_AFTER_S after its last heartbeat, and its jobs move at the next
sweep, so given any traffic they move within WORKER_LOST_AFTER_S + 5 s (and
a few more when one worker had over EXPIRY_BATCH leased jobs: each further
interval takes the next batch).

What a sweep costs (EXPLAIN ANALYZE, PostgreSQL 16, 1,000,000 jobs of 100
nodes, 100 registered workers of which 10 LOST with 50 RUNNING and 5
STOPPING jobs each): expiring those 550 jobs (a full batch of 500 plus the
next 50) takes 14 ms and 1.6 ms; a sweep with nothing to expire, 0.07 ms
(10 lost workers with nothing left: 30 index probes). The claim that comes
first is one upsert of one row (~0.1 ms). The process that runs it has
already sent its response, so no request waits for it.
"""

from __future__ import annotations

import logging

import chores
import observability
from store import workers as worker_store

log = logging.getLogger("jobs")

EXPIRY_BATCH = 500


def sweep_interval(config) -> float:
    return min(5.0, config["WORKER_LOST_AFTER_S"] / 2)


@chores.chore("lease_expiry", sweep_interval)
def expire_leases(cur, config) -> dict[str, int]:
    """Move one batch of lost workers' jobs; the count per new status."""
    moved = worker_store.expire_leases(cur, config["WORKER_LOST_AFTER_S"], EXPIRY_BATCH)
    for status, count in moved.items():
        observability.LEASES_EXPIRED.labels(status).inc(count)
    if moved:
        log.info("leases expired", extra={"fields": {"moved": moved}})
    return moved
