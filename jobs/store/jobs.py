"""Jobs: create, read, list, move through the status machine, delete."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from jobs.domain import (
    DEFAULT_PAGE_SIZE,
    EVENTS_PAGE_BYTES,
    MAX_PAGE_BYTES,
    MAX_PAGE_SIZE,
    REASSIGNABLE_STATUSES,
    RETRY_CANCELLED,
    TERMINAL_STATUSES,
    TRANSITIONS,
)
from jobs.store.outcomes import NOT_FOUND, Blocked, Deleted, Moved, NotFound, Refused
from jobs.store.sql import Prepared, as_jsonb, fetch_all, fetch_one

TERMINAL = list(TERMINAL_STATUSES)

GET_JOB = Prepared(
    "get_job", "SELECT j.job_json FROM jobs j WHERE j.id = %(job_id)s", job_id="bigint"
)


def get_job(cur, job_id: int) -> str | NotFound:
    """The job's JSON."""
    row = fetch_one(cur, GET_JOB, {"job_id": job_id})
    return NOT_FOUND if row is None else row[0]


# One range scan of jobs_status_newest per wanted status, merged: at most
# (limit + 1) index entries per status whatever the table's skew. The extra
# row tells whether a next page exists. With ?node_id= the scans are of
# jobs_node_status_newest instead (the {node_filter} below), so a node with
# 10 active jobs among a million finished ones reads 10 index entries
# (BENCHMARKS.md, "Design measurements: Listing by node").
LIST_JOBS = """
WITH page AS (
    SELECT j.id
    FROM unnest(%(statuses)s::text[]) AS wanted(status)
    CROSS JOIN LATERAL (
        SELECT id FROM jobs
        WHERE {node_filter}jobs.status = wanted.status AND -jobs.id >= -%(max_id)s
        -- -id, not id DESC: only jobs_status_newest yields this order, so the
        -- planner cannot pick a primary-key scan that filters its way through
        -- every finished job when few match.
        ORDER BY -jobs.id
        LIMIT %(limit)s + 1
    ) j
    ORDER BY j.id DESC
    LIMIT %(limit)s + 1
)
-- Only the rows of the page are read from the table: the candidates come
-- from the index alone (an index-only scan, see jobs_status_newest). Rows,
-- not one aggregated string: string_agg and its concatenations cost
-- PostgreSQL more than joining 51 strings costs Python.
-- The page's byte budget (domain.MAX_PAGE_BYTES): each row's JSON comes only
-- when it is at most {inline_max} bytes, the budget shared by the limit + 1
-- rows, so this statement never sends more than the budget; larger jobs come
-- as their size alone (octet_length reads a TOASTed value's header, not the
-- value) and list_page fetches those that fit (JOBS_JSON). A CASE, not a
-- running sum (a window over the rows), which cost the hot page far more
-- (BENCHMARKS.md, "Design measurements: The list's page budget").
SELECT page.id, octet_length(jobs.job_json),
       CASE WHEN octet_length(jobs.job_json) <= {inline_max} THEN jobs.job_json END
FROM page JOIN jobs ON jobs.id = page.id ORDER BY page.id DESC
"""
NODE_FILTER = "jobs.node_id = %(node_id)s AND "

# Prepared once per page size, so that its generic plan knows the LIMIT: with
# the limit as a parameter the planner assumes a tenth of the rows and scans
# whole statuses (BENCHMARKS.md, "How the service gets there"). Other page
# sizes run the same SQL unprepared, planned on every request.
PREPARED_PAGE_SIZES = frozenset(
    {1, 10, 20, 25, 50, 100, 200, 250, 500, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE}
)


@functools.cache
def list_statement(limit: int, by_node: bool = False) -> Prepared | str:
    sql = LIST_JOBS.replace("%(limit)s", str(int(limit)))
    sql = sql.replace("{inline_max}", str(MAX_PAGE_BYTES // (int(limit) + 1)))
    sql = sql.replace("{node_filter}", NODE_FILTER if by_node else "")
    if limit in PREPARED_PAGE_SIZES:
        if by_node:
            return Prepared(
                f"list_node_jobs_{limit}", sql, statuses="text[]", max_id="bigint", node_id="text"
            )
        return Prepared(f"list_jobs_{limit}", sql, statuses="text[]", max_id="bigint")
    return sql


# The JSON of a page's jobs too large to come with the listing (LIST_JOBS).
JOBS_JSON = "SELECT id, job_json FROM jobs WHERE id = ANY(%(job_ids)s::bigint[])"


def jobs_json(cur, job_ids: list[int]) -> dict[int, str]:
    """The JSON of the jobs of ``job_ids`` that exist."""
    return dict(fetch_all(cur, JOBS_JSON, {"job_ids": job_ids}))


@dataclass(frozen=True)
class Page:
    jobs_json: list[str]
    next_cursor: int | None


def list_page(
    cur, statuses: tuple[str, ...], max_id: int, limit: int, node_id: str | None = None
) -> Page:
    """Jobs in ``statuses`` (of ``node_id``, if given) with id <= max_id, newest first,
    as many as ``limit`` and MAX_PAGE_BYTES of their JSON allow (always one, when any
    matches)."""
    params = {"statuses": list(statuses), "max_id": max_id, "node_id": node_id}
    rows = fetch_all(cur, list_statement(limit, node_id is not None), params)
    page, total, more = [], 0, False
    for job_id, size, job_json in rows:
        # A row after the page (the limit's extra one, or one past the budget)
        # tells that a next page exists.
        if len(page) == limit or (page and total + size > MAX_PAGE_BYTES):
            more = True
            break
        page.append((job_id, job_json))
        total += size
    del rows  # what came after the page, let go before the large jobs come
    cursor = page[-1][0] if more else None
    large = [job_id for job_id, job_json in page if job_json is None]
    if large:
        fetched = jobs_json(cur, large)
        # A job deleted in between is left out; the cursor stays where the page ended.
        page = [(i, fetched.get(i) if j is None else j) for i, j in page]
    return Page([job_json for _, job_json in page if job_json is not None], cursor)


# A repeated idempotency_key finds the existing job; the no-op update makes
# the racing loser wait for and return the winner's row in this one statement.
CREATE_JOB = """
WITH created AS (
    INSERT INTO jobs (node_id, descriptor, idempotency_key, max_attempts)
    VALUES (%(node_id)s, %(descriptor)s, %(idempotency_key)s, %(max_attempts)s)
    ON CONFLICT (idempotency_key) DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key
    RETURNING *, (xmax = 0) AS inserted
), event AS (
    INSERT INTO job_events (job_id, created_at, event_type, node_id)
    SELECT id, created_at, status, node_id FROM created WHERE inserted
)
SELECT inserted, id, job_json FROM created
"""


@dataclass(frozen=True)
class Created:
    job_id: int
    job_json: str
    new: bool  # False: the idempotency_key named an existing job


def create_job(
    cur, node_id: str, descriptor: dict, idempotency_key: str | None, max_attempts: int = 1
) -> Created:
    inserted, job_id, job_json = fetch_one(
        cur,
        CREATE_JOB,
        {
            "node_id": node_id,
            "descriptor": as_jsonb(descriptor),
            "idempotency_key": idempotency_key,
            "max_attempts": max_attempts,
        },
    )
    return Created(job_id, job_json, inserted)


# How long a job that failed on its attempt waits for the retry (domain.retry_delay_s):
# RETRY_BACKOFF_S x 2^(attempt - 1), at most RETRY_BACKOFF_MAX_S. ``{attempt}`` is
# the attempt that failed; the parameters come from Backoff.params().
RETRY_DELAY_SQL = (
    "make_interval(secs => least(%(backoff_max_s)s::float8,"
    " %(backoff_s)s::float8 * 2.0::float8 ^ ({attempt} - 1)))"
)


@dataclass(frozen=True)
class Backoff:
    """The retry settings a statement that can fail a job needs (settings.py)."""

    backoff_s: float
    backoff_max_s: float

    @classmethod
    def of(cls, config) -> Backoff:
        return cls(float(config["RETRY_BACKOFF_S"]), float(config["RETRY_BACKOFF_MAX_S"]))

    def params(self) -> dict:
        return {"backoff_s": self.backoff_s, "backoff_max_s": self.backoff_max_s}


DEFAULT_BACKOFF = Backoff(10.0, 3600.0)


# The state guard: lock the job, check the report is for the job's current
# worker and attempt (the fence), move it only from an allowed status, record
# the event, and tell "not found" / "stale" / "not allowed from X" / "moved"
# apart. A reschedule (a SCHEDULED job reported SCHEDULED with another
# node_id) is a move too: %(reassign)s is true only for such a report, and
# the job moves only when the node it names is not the job's node already.
#
# The fence and the status guard are one WHERE: a report from a worker whose
# job moved to another worker or another attempt can never slip in between.
# A move out of FAILED to SCHEDULED starts the next attempt; every move
# clears retry_at, and a move to FAILED below max_attempts (unless the report
# said "retryable": false) sets it: the failure time, the row's new
# updated_at, plus the backoff. One clock reading serves both, read when the
# row is updated (after its lock was granted), so retry_at - updated_at is
# exactly the backoff and updated_at never goes back past a change this
# statement waited for.
#
# Prepared (directly; plain SQL through a pooler): planning these CTEs cost
# more than running them (BENCHMARKS.md,
# "Design measurements: Preparing CHANGE_STATUS").
CHANGE_STATUS_SQL = f"""
WITH target AS (
    SELECT * FROM jobs WHERE id = %(job_id)s FOR UPDATE
), fence AS (
    SELECT (%(fence_node)s::text IS NOT NULL AND target.node_id <> %(fence_node)s::text)
        OR (%(fence_attempt)s::bigint IS NOT NULL AND target.attempt <> %(fence_attempt)s::bigint)
        AS stale
    FROM target
), moved AS (
    UPDATE jobs
    SET status = %(to)s,
        node_id = coalesce(%(node_id)s, jobs.node_id),
        attempt = jobs.attempt + CASE WHEN jobs.status = 'FAILED' AND %(to)s = 'SCHEDULED'
                                      THEN 1 ELSE 0 END,
        (updated_at, retry_at) = (
            SELECT now.t,
                   CASE WHEN %(to)s = 'FAILED' AND %(retryable)s
                             AND jobs.attempt < jobs.max_attempts
                        THEN now.t + {RETRY_DELAY_SQL.format(attempt="jobs.attempt")} END
            FROM (SELECT clock_timestamp() AS t) now)
    FROM target, fence
    WHERE jobs.id = target.id AND NOT fence.stale
      AND (target.status = ANY(%(from)s)
           OR (%(reassign)s AND target.status = %(to)s AND target.node_id <> %(node_id)s))
    RETURNING jobs.*
), event AS (
    INSERT INTO job_events (job_id, created_at, event_type, node_id, detail)
    SELECT id, updated_at, status, node_id, %(detail)s FROM moved
)
SELECT target.status, target.node_id, target.attempt, fence.stale,
       moved.id IS NOT NULL, moved.retry_at IS NOT NULL,
       coalesce(moved.job_json, target.job_json)
FROM target CROSS JOIN fence LEFT JOIN moved ON true
"""
CHANGE_STATUS = Prepared(
    "change_status",
    CHANGE_STATUS_SQL,
    job_id="bigint",
    fence_node="text",
    fence_attempt="bigint",
    to="text",
    node_id="text",
    retryable="boolean",
    backoff_max_s="float8",
    backoff_s="float8",
    reassign="boolean",
    detail="jsonb",
    **{"from": "text[]"},
)


@dataclass(frozen=True)
class Stale:
    """The report named another worker or attempt than the job's: nothing changed.

    ``node_id`` and ``attempt`` are the job's own, for the answer's message.
    """

    node_id: str
    attempt: int


@dataclass(frozen=True)
class RetryScheduled(Moved):
    """Moved to FAILED, and an automatic retry is due at the job's retry_at."""


@dataclass(frozen=True)
class RetryCancelled(Moved):
    """A stop on a job waiting for its retry: it stays FAILED and will not be retried."""


def change_status(
    cur,
    job_id: int,
    to: str,
    node_id: str | None = None,
    detail: dict | None = None,
    *,
    fence_node: str | None = None,
    fence_attempt: int | None = None,
    retryable: bool = True,
    backoff: Backoff = DEFAULT_BACKOFF,
) -> Moved | Refused | Stale | NotFound:
    """Apply one move of TRANSITIONS (or a reschedule) atomically, with its event.

    ``node_id`` is the node a SCHEDULED move goes to; ``fence_node`` and
    ``fence_attempt``, when given, must be the job's own or nothing changes (Stale).
    """
    row = fetch_one(
        cur,
        CHANGE_STATUS,
        {
            "job_id": job_id,
            "to": to,
            "from": sorted(TRANSITIONS[to]),
            "node_id": node_id,
            "reassign": node_id is not None and to in REASSIGNABLE_STATUSES,
            "detail": as_jsonb(detail),
            "fence_node": fence_node,
            "fence_attempt": fence_attempt,
            "retryable": retryable,
            **backoff.params(),
        },
    )
    if row is None:
        return NOT_FOUND
    before, job_node, job_attempt, stale, moved, retry, job_json = row
    if stale:
        return Stale(job_node, job_attempt)
    if not moved:
        return Refused(before, job_json)
    return RetryScheduled(job_json) if retry else Moved(job_json)


# PUT /jobs/{id}/stop, one statement: SCHEDULED and RUNNING become
# STOP_REQUESTED; a FAILED job waiting for its retry stays FAILED and loses
# the retry (retry_at back to null, a RETRY_CANCELLED event recording what
# was cancelled). Anything else is left alone, without an event.
REQUEST_STOP = f"""
WITH target AS (
    SELECT * FROM jobs WHERE id = %(job_id)s FOR UPDATE
), moved AS (
    UPDATE jobs
    SET status = CASE WHEN target.status = 'FAILED' THEN 'FAILED' ELSE 'STOP_REQUESTED' END,
        updated_at = clock_timestamp(), retry_at = NULL
    FROM target
    WHERE jobs.id = target.id
      AND (target.status = ANY(%(stoppable)s)
           OR (target.status = 'FAILED' AND target.retry_at IS NOT NULL))
    RETURNING jobs.*, target.status AS before, target.retry_at AS cancelled_retry_at
), event AS (
    INSERT INTO job_events (job_id, created_at, event_type, node_id, detail)
    SELECT id, updated_at,
           CASE WHEN before = 'FAILED' THEN '{RETRY_CANCELLED}' ELSE status END, node_id,
           CASE WHEN before = 'FAILED'
                THEN jsonb_build_object('retry_at', jobs_timestamp(cancelled_retry_at),
                                        'attempt', attempt) END
    FROM moved
)
SELECT target.status, moved.id IS NOT NULL, moved.before = 'FAILED',
       coalesce(moved.job_json, target.job_json)
FROM target LEFT JOIN moved ON true
"""


def request_stop(cur, job_id: int) -> Moved | RetryCancelled | Refused | NotFound:
    """The operators' stop: a stop request, a cancelled retry, or nothing to do."""
    row = fetch_one(
        cur, REQUEST_STOP, {"job_id": job_id, "stoppable": sorted(TRANSITIONS["STOP_REQUESTED"])}
    )
    if row is None:
        return NOT_FOUND
    before, moved, cancelled, job_json = row
    if not moved:
        return Refused(before, job_json)
    return RetryCancelled(job_json) if cancelled else Moved(job_json)


DELETE_JOB = """
WITH target AS (
    SELECT id, status FROM jobs WHERE id = %(job_id)s FOR UPDATE
), removed AS (
    DELETE FROM jobs USING target
    WHERE jobs.id = target.id AND target.status = ANY(%(terminal)s)
    RETURNING jobs.id
)
SELECT target.status, removed.id IS NOT NULL FROM target LEFT JOIN removed ON true
"""


def delete_job(cur, job_id: int) -> Deleted | Refused | NotFound:
    """Delete the job (its events, tables and files cascade) only if it is terminal."""
    row = fetch_one(cur, DELETE_JOB, {"job_id": job_id, "terminal": TERMINAL})
    if row is None:
        return NOT_FOUND
    status, removed = row
    return Deleted() if removed else Refused(status)


# Every bulk delete (by status, by IDs, retention, flask prune) runs under
# this lock, taken first in its transaction: two bulk deletes locking their
# rows in different orders (a batch in updated_at order, job_ids in id
# order) would deadlock. The lease sweep (store/workers.py) also locks
# several jobs, in id order, but only active ones, which no bulk delete
# wants; a cycle would need a job retried between the two statements'
# snapshots, and PostgreSQL would then cancel one of them (the sweep retries
# at its next interval). A batch holds the lock briefly (pruning.BatchSizer
# sizes batches by their time), so other bulk deletes take turns between batches.
BULK_DELETE_LOCK = "SELECT pg_advisory_xact_lock(hashtext('jobs-service bulk delete'))"
TRY_BULK_DELETE_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext('jobs-service bulk delete'))"


def lock_bulk_deletes(cur, wait: bool = True) -> bool:
    """Take the bulk delete lock for the transaction; False when busy and ``wait`` is False."""
    cur.execute(BULK_DELETE_LOCK if wait else TRY_BULK_DELETE_LOCK)
    return wait or cur.fetchone()[0]


# One batch of a delete by status (and age): up to ``limit`` candidates in
# the order of jobs_terminal_age, after the previous batch's last one, then
# the DELETE, which locks each row and, under READ COMMITTED, rechecks the
# status (and age) on the row's latest version: a job that turned active
# while the batch waited for its lock is left alone. Each job's events,
# tables and files go with it through the foreign keys' cascades, in the
# same statement, so a job goes whole or not at all.
#
# Most of the time is the cascades' per-row triggers. Deleting the children
# explicitly in this statement first does not help (the triggers still fire
# once per job), nor does locking the candidates FOR UPDATE first (each row
# written twice): BENCHMARKS.md, "Deleting history".
#
# The position comes from the candidates (the statement's snapshot), not
# from the deleted rows, so a row rechecked on a newer version can never
# move the next batch past jobs this one did not reach.
DELETE_BATCH = """
WITH candidates AS (
    SELECT id, updated_at FROM jobs
    WHERE status = ANY(%(statuses)s){age}
      AND (updated_at, id) > (%(after_at)s::timestamptz, %(after_id)s::bigint)
    ORDER BY updated_at, id
    LIMIT %(limit)s
), removed AS (
    DELETE FROM jobs USING candidates
    WHERE jobs.id = candidates.id AND jobs.status = ANY(%(statuses)s){age}
    RETURNING jobs.id
), last AS (
    SELECT updated_at, id FROM candidates ORDER BY updated_at DESC, id DESC LIMIT 1
)
SELECT (SELECT count(*) FROM removed), (SELECT count(*) FROM candidates), last.updated_at, last.id
FROM (SELECT) AS one LEFT JOIN last ON true
"""
# now(): the transaction's start, the same instant for the candidates and the recheck.
# A job waiting for its automatic retry is not history yet: deletes by age
# (retention, prune --older-than) leave it, whatever its age; deletes by
# status alone (DELETE /jobs?status=) take it like any terminal job.
OLDER_THAN = (
    " AND jobs.updated_at < now() - make_interval(secs => %(older_than_s)s)"
    " AND jobs.retry_at IS NULL"
)
DELETE_BATCH_ANY_AGE = DELETE_BATCH.format(age="")
DELETE_BATCH_OLDER = DELETE_BATCH.format(age=OLDER_THAN)


@dataclass(frozen=True)
class Position:
    """Where a delete by status has got to, in jobs_terminal_age order."""

    updated_at: object = "-infinity"  # a datetime once a batch has run
    job_id: int = 0


START = Position()


@dataclass(frozen=True)
class Batch:
    deleted: int  # jobs deleted
    scanned: int  # candidates looked at: fewer than the limit means none are left
    last: Position  # resume after this


def delete_batch(
    cur, statuses: tuple[str, ...], older_than_s: float | None, after: Position, limit: int
) -> Batch:
    """Delete up to ``limit`` jobs in ``statuses`` (older than ``older_than_s``) after ``after``.

    Runs on ``cur`` in the caller's transaction, which must hold lock_bulk_deletes.
    """
    cur.execute(
        DELETE_BATCH_ANY_AGE if older_than_s is None else DELETE_BATCH_OLDER,
        {
            "statuses": list(statuses),
            "older_than_s": older_than_s,
            "after_at": after.updated_at,
            "after_id": after.job_id,
            "limit": int(limit),
        },
    )
    deleted, scanned, last_at, last_id = cur.fetchone()
    return Batch(deleted, scanned, after if last_id is None else Position(last_at, last_id))


# All or nothing: lock every listed job, so none can turn active between the
# check and the delete, and delete only when none of them is active.
DELETE_JOBS_BY_ID = """
WITH target AS (
    SELECT id, status FROM jobs WHERE id = ANY(%(job_ids)s) ORDER BY id FOR UPDATE
), blocker AS (
    SELECT id, status FROM target WHERE status <> ALL(%(terminal)s) ORDER BY id LIMIT 1
), removed AS (
    DELETE FROM jobs USING target
    WHERE jobs.id = target.id AND NOT EXISTS (SELECT FROM blocker)
    RETURNING jobs.id
)
SELECT blocker.id, blocker.status, (SELECT count(*) FROM removed)
FROM (SELECT) AS one LEFT JOIN blocker ON true
"""


def delete_jobs_by_ids(cur, job_ids: list[int]) -> Deleted | Blocked:
    """Delete exactly ``job_ids``, all or nothing, in the caller's transaction."""
    lock_bulk_deletes(cur)
    cur.execute(DELETE_JOBS_BY_ID, {"job_ids": sorted(set(job_ids)), "terminal": TERMINAL})
    blocker_id, blocker_status, removed = cur.fetchone()
    if blocker_id is not None:
        return Blocked(blocker_id, blocker_status)
    return Deleted(removed)


# A page of a job's events after ``after``, oldest first: a walk along
# job_events_job_id, one index probe per event, that renders each event's
# JSON as it goes and stops at the first one that does not fit (``limit``
# events, or ``budget`` bytes of JSON once one is in). That one is rendered
# but not sent: it says that more follow. A window over LIMIT limit + 1 rows
# would render them all first, a gigabyte for 1,000 events of 1 MiB each.
# The job's row comes in the same snapshot: whether it exists (404 otherwise),
# and for a follow stream whether it has said its last word (its status is
# terminal and no automatic retry is pending).
EVENT_JSON = """json_build_object(
    'id', e.id, 'created_at', jobs_timestamp(e.created_at), 'event_type', e.event_type,
    'node_id', e.node_id, 'detail', e.detail)::text"""
# Whether a FAILED job waits for an automatic retry (retry_at is set only then).
RETRY_PENDING = "(j.retry_at IS NOT NULL)"
EVENTS_PAGE = Prepared(
    "events_page",
    f"""
WITH RECURSIVE walk AS (
    (SELECT first.id, first.event_type, first.event_json, 1 AS n,
            octet_length(first.event_json) + 1 AS bytes, true AS fits
     FROM (SELECT e.id, e.event_type, {EVENT_JSON} AS event_json
           FROM job_events e
           WHERE e.job_id = %(job_id)s AND e.id > %(after)s
           ORDER BY e.id
           LIMIT 1) first)
    UNION ALL
    (SELECT next.id, next.event_type, next.event_json, walk.n + 1,
            walk.bytes + octet_length(next.event_json) + 1,
            walk.n < %(limit)s AND walk.bytes + octet_length(next.event_json) + 1 <= %(budget)s
     FROM walk CROSS JOIN LATERAL (
         SELECT e.id, e.event_type, {EVENT_JSON} AS event_json
         FROM job_events e
         WHERE e.job_id = %(job_id)s AND e.id > walk.id
         ORDER BY e.id
         LIMIT 1
     ) next
     WHERE walk.fits)
)
SELECT job.found, job.ended, page.ids, page.types, page.events, page.more
FROM (SELECT count(*) > 0 AS found,
             coalesce(bool_or(j.status = ANY(%(terminal)s) AND NOT {RETRY_PENDING}), false)
                 AS ended
      FROM jobs j WHERE j.id = %(job_id)s) job,
     (SELECT coalesce(array_agg(id ORDER BY n) FILTER (WHERE fits), '{{}}') AS ids,
             coalesce(array_agg(event_type ORDER BY n) FILTER (WHERE fits), '{{}}') AS types,
             coalesce(array_agg(event_json ORDER BY n) FILTER (WHERE fits), '{{}}') AS events,
             coalesce(bool_or(NOT fits), false) AS more
      FROM walk) page
""",
    job_id="bigint",
    after="bigint",
    limit="integer",
    budget="integer",
    terminal="text[]",
)


@dataclass(frozen=True)
class EventsPage:
    events: list[tuple[int, str, str]]  # (id, event_type, the event's JSON), oldest first
    more: bool  # events after the last one exist (the page is full)
    ended: bool  # the job is terminal and no automatic retry is pending

    @property
    def last_id(self) -> int | None:
        return self.events[-1][0] if self.events else None

    @property
    def next_cursor(self) -> int | None:
        return self.last_id if self.more else None

    @property
    def events_json(self) -> str:
        return f"[{','.join(event for _, _, event in self.events)}]"


def events_page(
    cur, job_id: int, after: int, limit: int, budget: int = EVENTS_PAGE_BYTES
) -> EventsPage | NotFound:
    """The job's events with id > ``after``, oldest first, at most ``limit`` and about
    ``budget`` bytes of JSON (always at least one when there is one)."""
    found, ended, ids, types, events, more = fetch_one(
        cur,
        EVENTS_PAGE,
        {
            "job_id": job_id,
            "after": after,
            "limit": limit,
            "budget": budget,
            "terminal": TERMINAL,
        },
    )
    if not found:
        return NOT_FOUND
    return EventsPage(list(zip(ids, types, events, strict=True)), more, ended)


LATEST_EVENT = Prepared(
    "latest_event",
    """
SELECT (SELECT max(e.id) FROM job_events e WHERE e.job_id = j.id)
FROM jobs j WHERE j.id = %(job_id)s
""",
    job_id="bigint",
)


def latest_event_id(cur, job_id: int) -> int | NotFound:
    """The id of the job's latest event (0 if it has none)."""
    row = fetch_one(cur, LATEST_EVENT, {"job_id": job_id})
    return NOT_FOUND if row is None else (row[0] or 0)


GET_EVENT = """
SELECT (SELECT json_build_object(
            'id', e.id, 'job_id', e.job_id, 'created_at', jobs_timestamp(e.created_at),
            'node_id', e.node_id, 'event_type', e.event_type, 'detail', e.detail)::text
        FROM job_events e WHERE e.id = %(event_id)s AND e.job_id = j.id)
FROM jobs j
WHERE j.id = %(job_id)s
"""


@dataclass(frozen=True)
class Event:
    event_json: str


@dataclass(frozen=True)
class NoSuchEvent:
    """The job exists but has no event with that id (another job's event included)."""


def get_event(cur, job_id: int, event_id: int) -> Event | NoSuchEvent | NotFound:
    row = fetch_one(cur, GET_EVENT, {"job_id": job_id, "event_id": event_id})
    if row is None:
        return NOT_FOUND
    return NoSuchEvent() if row[0] is None else Event(row[0])


# ---- Upgrades --------------------------------------------------------------------
#
# A field added to the job's JSON (schema.sql, jobs_render_json) reaches a
# row when the row is next written. init-db renders the rows already there
# again (db.rerender_jobs), in batches of short transactions after the
# schema's own, when schema.sql left a row in schema_upgrades saying so.
RENDER_UPGRADE = "render jobs with attempts"
UPGRADE_PENDING = (
    "SELECT EXISTS (SELECT FROM schema_upgrades WHERE name = %(name)s AND done_at IS NULL)"
)
# Setting job_json to null makes the rendering trigger write it afresh.
RERENDER_BATCH = """
WITH batch AS (
    UPDATE jobs SET job_json = NULL
    WHERE id IN (SELECT id FROM jobs WHERE id > %(after)s ORDER BY id LIMIT %(limit)s)
    RETURNING id
)
SELECT max(id) FROM batch
"""
UPGRADE_DONE = "UPDATE schema_upgrades SET done_at = clock_timestamp() WHERE name = %(name)s"


def upgrade_pending(cur, name: str) -> bool:
    return fetch_one(cur, UPGRADE_PENDING, {"name": name})[0]


def rerender_batch(cur, after_id: int, limit: int) -> int | None:
    """Render the JSON of up to ``limit`` jobs after ``after_id`` again; the last id, or None."""
    return fetch_one(cur, RERENDER_BATCH, {"after": after_id, "limit": int(limit)})[0]


def upgrade_done(cur, name: str) -> None:
    cur.execute(UPGRADE_DONE, {"name": name})
