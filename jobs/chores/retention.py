"""Retention: terminal jobs older than JOB_RETENTION are deleted continuously, in small batches.

The same batches as every bulk delete (pruning.py), one per chore run.
"""

from __future__ import annotations

import time

from jobs import observability
from jobs.chores import Chore
from jobs.domain import TERMINAL_STATUSES
from jobs.pruning import BatchSizer
from jobs.store import jobs as job_store

# One batch of at most RETENTION_BATCH jobs every RETENTION_INTERVAL_S across
# all replicas: up to 100 jobs/s (8.6 million a day) of retention, each run a
# few milliseconds of one worker after a response. A backlog larger than
# that (retention just turned on) is what flask prune is for.
RETENTION_INTERVAL_S = 5.0
RETENTION_BATCH = 500


class Retention:
    """The retention chore's run: one batch of terminal jobs older than JOB_RETENTION.

    Its batch size is kept across runs (a run is a single batch, so the size
    it settles on must outlive it), with a smaller target than a request's
    batches: it runs on a worker's time that no request asked for.
    """

    def __init__(self):
        self.sizer = BatchSizer(RETENTION_BATCH, target_s=0.025, start=50)

    def __call__(self, cur, config) -> None:
        # A bulk delete or a prune running right now is already deleting: skip
        # rather than make this worker wait for its batch.
        if not job_store.lock_bulk_deletes(cur, wait=False):
            return
        started = time.monotonic()
        batch = job_store.delete_batch(
            cur,
            TERMINAL_STATUSES,
            config["JOB_RETENTION"].total_seconds(),
            job_store.START,
            self.sizer.size,
        )
        self.sizer.update(time.monotonic() - started)
        observability.count_pruned("retention", batch.deleted)


def retention_chore() -> Chore:
    return Chore(
        "retention",
        RETENTION_INTERVAL_S,
        Retention(),
        enabled=lambda config: config.get("JOB_RETENTION") is not None,
    )
