"""History at any size: deleting finished jobs in batches (docs/API.md, "History and retention").

Three callers share one loop of short transactions (store/jobs.py DELETE_BATCH):

- ``DELETE /jobs?status=`` (``delete_by_status``): batches while the request's
  time budget lasts, then answers how far it got;
- retention (``JOB_RETENTION``): one small batch per chore run (chores/retention.py),
  after a response, at most once per interval across every replica;
- ``flask --app app prune``: batches until nothing is left, for cron or a backlog.

Each batch is its own transaction under the bulk delete lock, so a delete of
millions of jobs never holds locks, an open transaction or a growing trigger
queue for longer than one batch, and whatever a batch deleted stays deleted
if a later one fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import click
import psycopg2
from flask import current_app
from flask.cli import with_appcontext

from jobs import db, observability
from jobs.domain import DELETE_STATUS_TOKENS, TERMINAL_STATUSES, parse_status_tokens
from jobs.settings import DURATION_UNITS_S, parse_duration
from jobs.store import jobs as job_store

# ---- Durations (JOB_RETENTION, prune --older-than): parsed as settings.py says ----------

def retention_setting(value) -> timedelta | None:
    """JOB_RETENTION as configured: unset or empty is off; anything else must parse."""
    if value is None or isinstance(value, timedelta):
        return value
    if not str(value).strip():
        return None
    try:
        return parse_duration(str(value).strip())
    except ValueError as exc:
        raise ValueError(f"JOB_RETENTION: {exc}") from None


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in DURATION_UNITS_S.items():
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"  # pragma: no cover (seconds always divide)


# ---- The loop -------------------------------------------------------------------------


class BatchSizer:
    """Jobs per batch: starts small, doubles while batches are quick, halves when slow.

    A batch's time grows with its jobs' events and files, not only with its
    jobs (BENCHMARKS.md, "Design measurements: Bulk delete batches"). Sizing
    by measured time keeps every batch near ``target_s`` whatever the jobs
    carry, so locks are held briefly and a request overshoots its budget by
    one short batch at most.
    """

    def __init__(self, most: int, target_s: float, start: int = 100):
        self.most = max(1, int(most))
        self.target_s = target_s
        self.size = min(self.most, start)

    def update(self, seconds: float) -> None:
        if seconds > self.target_s:
            self.size = max(1, self.size // 2)
        elif seconds < self.target_s / 4:
            self.size = min(self.most, self.size * 2)


# Room above what 1,000 jobs with a few events each take: batches shrink only
# for jobs with many files (BENCHMARKS.md, "Design measurements: Bulk delete batches").
BATCH_TARGET_S = 0.1


@dataclass(frozen=True)
class Pruned:
    deleted: int
    more: bool  # stopped by the time budget; more jobs may match
    batches: int = 0


def delete_in_batches(
    statuses: tuple[str, ...],
    older_than_s: float | None,
    *,
    batch_max: int,
    timeout_ms: int,
    via: str,
    budget_s: float | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> Pruned:
    """Delete jobs in ``statuses`` (older than ``older_than_s``) until none is left.

    With ``budget_s``, no batch starts once that much time has passed: the
    answer then says more may remain. ``timeout_ms`` limits each batch's
    statements (the lock wait included). ``on_batch(deleted, batches)`` is
    called after each batch; ``via`` labels the jobs_pruned_total metric.
    """
    started = time.monotonic()
    sizer = BatchSizer(batch_max, BATCH_TARGET_S)
    position = job_store.START
    deleted = batches = 0
    while True:
        size = sizer.size
        batch_started = time.monotonic()
        with db.transaction(timeout_ms) as cur:
            job_store.lock_bulk_deletes(cur)
            batch = job_store.delete_batch(cur, statuses, older_than_s, position, size)
        sizer.update(time.monotonic() - batch_started)
        observability.count_pruned(via, batch.deleted)
        deleted += batch.deleted
        batches += 1
        position = batch.last
        if on_batch is not None:
            on_batch(deleted, batches)
        if batch.scanned < size:
            return Pruned(deleted, False, batches)
        if budget_s is not None and time.monotonic() - started >= budget_s:
            return Pruned(deleted, True, batches)


def batch_timeout_ms(config) -> int:
    """Each batch statement's time limit: half the request's budget, never below the
    ordinary limit.

    A batch is normally far shorter (BENCHMARKS.md, "Design measurements:
    Bulk delete batches"); the limit only ends one stuck on a lock or a
    stalled server. A batch runs two statements (the wait for the bulk delete
    lock, then the delete) and none starts after the budget, so a request ends
    within twice the budget at the very worst: 20 s with the default 10 s. (0
    would mean no limit at all.)
    """
    return max(int(config["BULK_DELETE_BUDGET_MS"]) // 2, int(config["STATEMENT_TIMEOUT_MS"]), 1)


def delete_by_status(statuses: tuple[str, ...]) -> Pruned:
    """DELETE /jobs?status=: batches within the request's budget (BULK_DELETE_BUDGET_MS)."""
    config = current_app.config
    return delete_in_batches(
        statuses,
        None,
        batch_max=config["BULK_DELETE_BATCH"],
        timeout_ms=batch_timeout_ms(config),
        via="api",
        budget_s=config["BULK_DELETE_BUDGET_MS"] / 1000,
    )


# ---- flask --app app prune ---------------------------------------------------------------

# A batch of the command is limited to a minute: no request waits for it,
# but a batch stuck on a lock should still end.
PRUNE_BATCH_TIMEOUT_MS = 60_000
PROGRESS_EVERY_S = 5.0


class DurationParam(click.ParamType):
    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class StatusesParam(click.ParamType):
    name = "status"

    def convert(self, value, param, ctx):
        try:
            return parse_status_tokens(value, DELETE_STATUS_TOKENS)
        except ValueError as exc:
            self.fail(f"{value!r}: {exc}", param, ctx)


@click.command("prune")
@click.option(
    "--older-than",
    type=DurationParam(),
    default=None,
    help="Only jobs whose last change is older than this (30d, 12h, 90m, 45s). Default: any age.",
)
@click.option(
    "--status",
    "status_groups",
    type=StatusesParam(),
    multiple=True,
    help="terminal (default), completed, stopped, failed (or error); repeat or "
    "comma-separate for several.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 100_000),
    default=None,
    help="At most this many jobs per transaction (default: BULK_DELETE_BATCH).",
)
@with_appcontext
def prune_command(older_than, status_groups, batch_size):
    """Delete terminal jobs (with their events, tables and files) in batches, until none is left."""
    wanted = {s for group in status_groups for s in group} or set(TERMINAL_STATUSES)
    statuses = tuple(s for s in TERMINAL_STATUSES if s in wanted)
    config = current_app.config
    what = ", ".join(statuses) + (
        f" older than {format_duration(older_than)}" if older_than else " of any age"
    )
    click.echo(f"pruning {what}")
    started = time.monotonic()
    shown = {"at": started, "deleted": 0}

    def progress(deleted: int, batches: int) -> None:
        now = time.monotonic()
        shown["deleted"] = deleted
        if batches == 1 or now - shown["at"] >= PROGRESS_EVERY_S:
            shown["at"] = now
            click.echo(
                f"  {deleted:,} jobs deleted so far ({_batches(batches)}), "
                f"{deleted / max(now - started, 1e-6):,.0f} jobs/s"
            )

    try:
        pruned = delete_in_batches(
            statuses,
            None if older_than is None else older_than.total_seconds(),
            batch_max=batch_size or config["BULK_DELETE_BATCH"],
            timeout_ms=PRUNE_BATCH_TIMEOUT_MS,
            via="prune",
            on_batch=progress,
        )
    except psycopg2.Error as exc:
        # Batches that finished stay deleted; running the command again resumes.
        raise click.ClickException(
            f"database error ({type(exc).__name__}) after {shown['deleted']:,} jobs were "
            "deleted; they stay deleted, run the command again to continue"
        ) from None
    seconds = time.monotonic() - started
    click.echo(
        f"pruned {pruned.deleted:,} jobs ({what}) in {seconds:.1f} s "
        f"({_batches(pruned.batches)}), {pruned.deleted / max(seconds, 1e-6):,.0f} jobs/s"
    )


def _batches(count: int) -> str:
    return f"{count:,} batch" if count == 1 else f"{count:,} batches"


def init_app(app) -> None:
    app.cli.add_command(prune_command)
