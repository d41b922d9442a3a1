"""Jobs: create, read, list, move through the status machine, delete."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from jobs import pool
from jobs.domain import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_BYTES,
    MAX_PAGE_SIZE,
    REASSIGNABLE_STATUSES,
    TERMINAL_STATUSES,
    TRANSITIONS,
)
from jobs.store.outcomes import NOT_FOUND, Blocked, Deleted, Moved, NotFound, Refused
from jobs.store.sql import as_jsonb, fetch_all, fetch_one

TERMINAL = list(TERMINAL_STATUSES)

GET_JOB = pool.Prepared(
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
# 10 active jobs among a million finished ones reads 10 index entries:
# 0.03 ms (generic plan) to 0.06 ms (custom plan), against 0.10 ms for the
# unfiltered active listing of the same 1.4M-job table (EXPLAIN ANALYZE).
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
-- value) and list_page fetches those that fit (JOBS_JSON). A running sum
-- here instead (a window over the rows) cost the hot page 0.044 ms of 0.200
-- in execution, this CASE 0.006 ms (BENCHMARKS.md, "Bounded everywhere").
SELECT page.id, octet_length(jobs.job_json),
       CASE WHEN octet_length(jobs.job_json) <= {inline_max} THEN jobs.job_json END
FROM page JOIN jobs ON jobs.id = page.id ORDER BY page.id DESC
"""
NODE_FILTER = "jobs.node_id = %(node_id)s AND "

# Prepared once per page size, so that its generic plan knows the LIMIT: with
# the limit as a parameter the planner assumes a tenth of the rows and scans
# whole statuses (6.6 ms a page instead of 0.28 ms). Other page sizes run
# the same SQL unprepared, planned on every request.
PREPARED_PAGE_SIZES = frozenset(
    {1, 10, 20, 25, 50, 100, 200, 250, 500, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE}
)


@functools.cache
def list_statement(limit: int, by_node: bool = False) -> pool.Prepared | str:
    sql = LIST_JOBS.replace("%(limit)s", str(int(limit)))
    sql = sql.replace("{inline_max}", str(MAX_PAGE_BYTES // (int(limit) + 1)))
    sql = sql.replace("{node_filter}", NODE_FILTER if by_node else "")
    if limit in PREPARED_PAGE_SIZES:
        if by_node:
            return pool.Prepared(
                f"list_node_jobs_{limit}", sql, statuses="text[]", max_id="bigint", node_id="text"
            )
        return pool.Prepared(f"list_jobs_{limit}", sql, statuses="text[]", max_id="bigint")
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
    INSERT INTO jobs (node_id, descriptor, idempotency_key)
    VALUES (%(node_id)s, %(descriptor)s, %(idempotency_key)s)
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


def create_job(cur, node_id: str, descriptor: dict, idempotency_key: str | None) -> Created:
    inserted, job_id, job_json = fetch_one(
        cur,
        CREATE_JOB,
        {
            "node_id": node_id,
            "descriptor": as_jsonb(descriptor),
            "idempotency_key": idempotency_key,
        },
    )
    return Created(job_id, job_json, inserted)


# The state guard: lock the job, move it only from an allowed status, record
# the event, and tell "not found" / "not allowed from X" / "moved" apart.
# A reschedule (a SCHEDULED job reported SCHEDULED with another node_id) is
# a move too: %(reassign)s is true only for such a report, and the job moves
# only when the node it names is not the job's node already.
CHANGE_STATUS = """
WITH target AS (
    SELECT * FROM jobs WHERE id = %(job_id)s FOR UPDATE
), moved AS (
    UPDATE jobs
    SET status = %(to)s, updated_at = clock_timestamp(),
        node_id = coalesce(%(node_id)s, jobs.node_id)
    FROM target
    WHERE jobs.id = target.id
      AND (target.status = ANY(%(from)s)
           OR (%(reassign)s AND target.status = %(to)s AND target.node_id <> %(node_id)s))
    RETURNING jobs.*
), event AS (
    INSERT INTO job_events (job_id, created_at, event_type, node_id, detail)
    SELECT id, updated_at, status, node_id, %(detail)s FROM moved
)
SELECT target.status, moved.id IS NOT NULL, coalesce(moved.job_json, target.job_json)
FROM target LEFT JOIN moved ON true
"""


def change_status(
    cur,
    job_id: int, to: str, node_id: str | None = None, detail: dict | None = None
) -> Moved | Refused | NotFound:
    """Apply one move of TRANSITIONS (or a reschedule) atomically, with its event."""
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
        },
    )
    if row is None:
        return NOT_FOUND
    before, moved, job_json = row
    return Moved(job_json) if moved else Refused(before, job_json)


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
# at its next interval). A batch holds the lock for ~10-100 ms, so other bulk
# deletes take turns between batches.
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
# Measured on 500k jobs (2 events each, 20 files for one job in 500),
# PostgreSQL 15: ~85% of the time is the cascades' per-row triggers (2.1 s
# for job_events, 1.3 s for job_tables that mostly finds nothing, of 3.9 s).
# Deleting the children explicitly in this statement first does not help:
# the triggers still fire once per job and cost 2.3-2.9 us each when they
# find nothing, and the batch got slower (46-82k jobs/s vs 67-112k). Locking
# the candidates FOR UPDATE before deleting them wrote each row twice (+37%
# WAL, 238 vs 174 bytes a job) for no gain. See BENCHMARKS.md, "Deleting history".
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
OLDER_THAN = " AND jobs.updated_at < now() - make_interval(secs => %(older_than_s)s)"
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


GET_EVENTS = """
SELECT coalesce(json_agg(json_build_object(
           'id', e.id, 'created_at', jobs_timestamp(e.created_at), 'event_type', e.event_type,
           'node_id', e.node_id, 'detail', e.detail) ORDER BY e.id), '[]')::text
FROM jobs j LEFT JOIN job_events e ON e.job_id = j.id
WHERE j.id = %(job_id)s
GROUP BY j.id
"""


def get_events(cur, job_id: int) -> str | NotFound:
    """The job's events as a JSON array, oldest first."""
    row = fetch_one(cur, GET_EVENTS, {"job_id": job_id})
    return NOT_FOUND if row is None else row[0]


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
