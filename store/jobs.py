"""Jobs: create, read, list, move through the status machine, delete."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import db
import pool
from schemas import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, TERMINAL_STATUSES, TRANSITIONS
from store.outcomes import NOT_FOUND, Blocked, Deleted, Moved, NotFound, Refused
from store.sql import as_jsonb, fetch_all, fetch_one

TERMINAL = list(TERMINAL_STATUSES)

GET_JOB = pool.Prepared(
    "get_job", "SELECT j.job_json FROM jobs j WHERE j.id = %(job_id)s", job_id="bigint"
)


def get_job(job_id: int) -> str | None:
    """The job's JSON, or None."""
    row = fetch_one(GET_JOB, {"job_id": job_id})
    return None if row is None else row[0]


# One range scan of jobs_status_newest per wanted status, merged: at most
# (limit + 1) index entries per status whatever the table's skew. The extra
# row tells whether a next page exists.
LIST_JOBS = """
WITH page AS (
    SELECT j.id
    FROM unnest(%(statuses)s::text[]) AS wanted(status)
    CROSS JOIN LATERAL (
        SELECT id FROM jobs
        WHERE jobs.status = wanted.status AND -jobs.id >= -%(max_id)s
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
SELECT page.id, jobs.job_json FROM page JOIN jobs ON jobs.id = page.id ORDER BY page.id DESC
"""

# Prepared once per page size, so that its generic plan knows the LIMIT: with
# the limit as a parameter the planner assumes a tenth of the rows and scans
# whole statuses (6.6 ms a page instead of 0.28 ms). Other page sizes run
# the same SQL unprepared, planned on every request.
PREPARED_PAGE_SIZES = frozenset(
    {1, 10, 20, 25, 50, 100, 200, 250, 500, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE}
)


@functools.cache
def list_statement(limit: int) -> pool.Prepared | str:
    sql = LIST_JOBS.replace("%(limit)s", str(int(limit)))
    if limit in PREPARED_PAGE_SIZES:
        return pool.Prepared(f"list_jobs_{limit}", sql, statuses="text[]", max_id="bigint")
    return sql


@dataclass(frozen=True)
class Page:
    jobs_json: list[str]
    next_cursor: int | None


def list_page(statuses: tuple[str, ...], max_id: int, limit: int) -> Page:
    """Jobs in ``statuses`` with id <= max_id, newest first, ``limit`` of them."""
    rows = fetch_all(list_statement(limit), {"statuses": list(statuses), "max_id": max_id})
    page = rows[:limit]
    # One row more than the page tells whether there is a next page.
    cursor = page[-1][0] if len(rows) > limit else None
    return Page([job for _, job in page], cursor)


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


def create_job(node_id: str, descriptor: dict, idempotency_key: str | None) -> Created:
    inserted, job_id, job_json = fetch_one(
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
# A reschedule (SCHEDULED -> SCHEDULED with another node_id) is a move too.
CHANGE_STATUS = """
WITH target AS (
    SELECT * FROM jobs WHERE id = %(job_id)s FOR UPDATE
), moved AS (
    UPDATE jobs
    SET status = %(to)s, updated_at = clock_timestamp(),
        node_id = coalesce(%(node_id)s, jobs.node_id)
    FROM target
    WHERE jobs.id = target.id AND target.status = ANY(%(from)s)
    RETURNING jobs.*
), event AS (
    INSERT INTO job_events (job_id, created_at, event_type, node_id, detail)
    SELECT id, updated_at, status, node_id, %(detail)s FROM moved
)
SELECT target.status, moved.id IS NOT NULL, coalesce(moved.job_json, target.job_json)
FROM target LEFT JOIN moved ON true
"""


def change_status(
    job_id: int, to: str, node_id: str | None = None, detail: dict | None = None
) -> Moved | Refused | NotFound:
    """Apply one move of TRANSITIONS atomically, with its event."""
    row = fetch_one(
        CHANGE_STATUS,
        {
            "job_id": job_id,
            "to": to,
            "from": sorted(TRANSITIONS[to]),
            "node_id": node_id,
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


def delete_job(job_id: int) -> Deleted | Refused | NotFound:
    """Delete the job (its events, tables and files cascade) only if it is terminal."""
    row = fetch_one(DELETE_JOB, {"job_id": job_id, "terminal": TERMINAL})
    if row is None:
        return NOT_FOUND
    status, removed = row
    return Deleted() if removed else Refused(status)


# Both bulk deletes run under this lock, taken first in their transaction: a
# delete by status locks its rows in scan order, and two bulk deletes locking
# in different orders would deadlock; nothing else locks more than one job.
# Cheaper than locking every row in id order before deleting it, which
# dirtied each row twice (700k jobs: 6.8 s instead of 11-13 s).
BULK_DELETE_LOCK = "SELECT pg_advisory_xact_lock(hashtext('jobs-service bulk delete'))"

# A row that turns active while the delete waits for its lock is rechecked
# against the WHERE clause (READ COMMITTED) and left alone.
DELETE_JOBS_BY_STATUS = "DELETE FROM jobs WHERE status = ANY(%(statuses)s)"


def delete_jobs_by_status(statuses: tuple[str, ...], timeout_ms: int) -> Deleted:
    with db.transaction(timeout_ms) as cur:
        cur.execute(BULK_DELETE_LOCK)
        cur.execute(DELETE_JOBS_BY_STATUS, {"statuses": list(statuses)})
        return Deleted(cur.rowcount)


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


def delete_jobs_by_ids(job_ids: list[int], timeout_ms: int) -> Deleted | Blocked:
    with db.transaction(timeout_ms) as cur:
        cur.execute(BULK_DELETE_LOCK)
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


def get_events(job_id: int) -> str | None:
    """The job's events as a JSON array (oldest first), or None when there is no job."""
    row = fetch_one(GET_EVENTS, {"job_id": job_id})
    return None if row is None else row[0]
