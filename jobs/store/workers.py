"""Workers: registration, heartbeats, and the expiry of a lost worker's leases.

A worker is LOST when its heartbeat_at is older than WORKER_LOST_AFTER_S
(the database's clock decides, never the worker's). Every statement that
shows a worker computes its status with the same expression (STATUS_SQL).
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.domain import ACTIVE_STATUSES, LEASE_EXPIRY, LEASED_STATUSES, MAX_BATCH
from jobs.store.outcomes import NOT_FOUND, NotFound
from jobs.store.sql import as_jsonb, fetch_all, fetch_one

LOST_BEFORE = "clock_timestamp() - make_interval(secs => %(lost_after_s)s)"
STATUS_SQL = f"CASE WHEN w.heartbeat_at < {LOST_BEFORE} THEN 'LOST' ELSE 'ALIVE' END"
WORKER_JSON = f"""json_build_object(
    'node_id', w.node_id, 'info', w.info,
    'created_at', jobs_timestamp(w.created_at),
    'registered_at', jobs_timestamp(w.registered_at),
    'heartbeat_at', jobs_timestamp(w.heartbeat_at),
    'status', {STATUS_SQL})::text"""

# One clock reading for all three times of a first registration.
REGISTER = f"""
INSERT INTO workers AS w (node_id, info, created_at, registered_at, heartbeat_at)
SELECT %(node_id)s, %(info)s, now.t, now.t, now.t FROM (SELECT clock_timestamp() AS t) now
ON CONFLICT (node_id) DO UPDATE
SET info = EXCLUDED.info, registered_at = EXCLUDED.registered_at,
    heartbeat_at = EXCLUDED.heartbeat_at
RETURNING {WORKER_JSON}
"""


def register(cur, node_id: str, info: dict, lost_after_s: float) -> str:
    """Register (or re-register) the worker; its JSON."""
    row = fetch_one(
        cur,
        REGISTER, {"node_id": node_id, "info": as_jsonb(info), "lost_after_s": lost_after_s}
    )
    return row[0]


# The lists come from jobs_node_status_newest (-id descending: oldest first),
# so a worker with a long history reads only its SCHEDULED / STOP_REQUESTED
# entries. They are read in the statement's snapshot, taken before the update.
HEARTBEAT = f"""
WITH beat AS (
    UPDATE workers SET heartbeat_at = clock_timestamp()
    WHERE node_id = %(node_id)s
    RETURNING node_id, heartbeat_at
)
SELECT jobs_timestamp(beat.heartbeat_at),
       ARRAY(SELECT id FROM jobs
             WHERE jobs.node_id = beat.node_id AND jobs.status = 'SCHEDULED'
             ORDER BY -jobs.id DESC LIMIT {MAX_BATCH}),
       ARRAY(SELECT id FROM jobs
             WHERE jobs.node_id = beat.node_id AND jobs.status = 'STOP_REQUESTED'
             ORDER BY -jobs.id DESC LIMIT {MAX_BATCH})
FROM beat
"""


@dataclass(frozen=True)
class Heartbeat:
    heartbeat_at: str
    scheduled: list[int]
    stop_requested: list[int]


def heartbeat(cur, node_id: str) -> Heartbeat | NotFound:
    row = fetch_one(cur, HEARTBEAT, {"node_id": node_id})
    return NOT_FOUND if row is None else Heartbeat(*row)


GET_WORKER = f"SELECT {WORKER_JSON} FROM workers w WHERE w.node_id = %(node_id)s"


def get_worker(cur, node_id: str, lost_after_s: float) -> str | NotFound:
    """The worker's JSON."""
    row = fetch_one(cur, GET_WORKER, {"node_id": node_id, "lost_after_s": lost_after_s})
    return NOT_FOUND if row is None else row[0]


# A page, most recently registered first, after the cursor's (registered_at,
# node_id): one range scan of workers_registered, backwards, reading at most
# (limit + 1) entries wherever the page starts. The extra row tells whether a
# next page exists. Without a cursor the start is ('infinity', '').
LIST_WORKERS = f"""
SELECT w.node_id, jobs_timestamp(w.registered_at), json_build_object(
           'node_id', w.node_id, 'heartbeat_at', jobs_timestamp(w.heartbeat_at),
           'status', {STATUS_SQL})::text
FROM workers w
WHERE (w.registered_at, w.node_id) < (%(after_at)s::timestamptz, %(after_node)s::text)
ORDER BY w.registered_at DESC, w.node_id DESC
LIMIT %(limit)s + 1
"""


@dataclass(frozen=True)
class WorkerPosition:
    """Where a page of workers ends: its last worker's registered_at and node_id."""

    registered_at: str = "infinity"  # a timestamp as the API writes it
    node_id: str = ""


@dataclass(frozen=True)
class WorkerPage:
    workers_json: list[str]
    next: WorkerPosition | None  # None on the last page


def list_workers(cur, after: WorkerPosition, limit: int, lost_after_s: float) -> WorkerPage:
    """Up to ``limit`` registered workers after ``after``, most recently registered first."""
    rows = fetch_all(
        cur,
        LIST_WORKERS,
        {
            "after_at": after.registered_at,
            "after_node": after.node_id,
            "limit": int(limit),
            "lost_after_s": lost_after_s,
        },
    )
    page = rows[:limit]
    more = len(rows) > limit
    return WorkerPage(
        [worker for _, _, worker in page],
        WorkerPosition(page[-1][1], page[-1][0]) if more else None,
    )


# Deregistration: the row goes, and with it the worker's leases (the sweep only
# looks at registered workers); its jobs stay as they are. The sweep locks the
# lost workers it moves jobs of, so a sweep under way finishes first.
DELETE_WORKER = "DELETE FROM workers WHERE node_id = %(node_id)s"


def delete_worker(cur, node_id: str) -> bool:
    """Forget the worker; whether it was registered."""
    cur.execute(DELETE_WORKER, {"node_id": node_id})
    return cur.rowcount > 0


# Retention (WORKER_RETENTION, chores/workers.py): up to ``batch`` workers
# LOST for longer than the retention that have no active job, oldest
# heartbeat first, among the ``scan`` longest lost: one range scan of
# workers_heartbeat (the cutoff comes from now(), the transaction's start;
# clock_timestamp() made it a filter over every worker) and, per candidate,
# one probe of jobs_node_status_newest (a subquery the planner cannot turn
# into a hash anti-join reading every active job). Each is locked, then
# deleted with its heartbeat rechecked on its newest version: a heartbeat or
# a registration committed meanwhile keeps the worker, and one arriving later
# waits for this statement (and then finds no worker: a heartbeat answers 404
# and the worker registers again). A job created for such a worker meanwhile
# is no different from a job of any node that is not registered. Workers a
# lease sweep holds are skipped (they have jobs).
FORGET_WORKERS = """
WITH candidate AS (
    SELECT w.node_id, w.heartbeat_at
    FROM workers w
    WHERE w.heartbeat_at < now() - make_interval(secs => %(lost_for_s)s)
    ORDER BY w.heartbeat_at
    LIMIT %(scan)s
), forgotten AS (
    SELECT w.node_id
    FROM candidate c JOIN workers w ON w.node_id = c.node_id
    WHERE (SELECT true FROM jobs
           WHERE jobs.node_id = c.node_id AND jobs.status = ANY(%(active)s)
           LIMIT 1) IS NULL
    ORDER BY c.heartbeat_at
    LIMIT %(batch)s
    FOR UPDATE OF w SKIP LOCKED
)
DELETE FROM workers USING forgotten
WHERE workers.node_id = forgotten.node_id
  AND workers.heartbeat_at < now() - make_interval(secs => %(lost_for_s)s)
"""


def forget_workers(
    cur, retention_s: float, lost_after_s: float, batch: int, scan: int
) -> int:
    """Delete up to ``batch`` workers LOST for over ``retention_s`` without active jobs,
    among the ``scan`` longest lost; how many."""
    cur.execute(
        FORGET_WORKERS,
        {
            # LOST, and for longer than the retention.
            "lost_for_s": max(retention_s, lost_after_s),
            "active": list(ACTIVE_STATUSES),
            "batch": int(batch),
            "scan": int(scan),
        },
    )
    return cur.rowcount


COUNT_WORKERS = f"""
SELECT count(*) FILTER (WHERE w.heartbeat_at >= {LOST_BEFORE}),
       count(*) FILTER (WHERE w.heartbeat_at < {LOST_BEFORE})
FROM workers w
"""


# ---- Leases ------------------------------------------------------------------
#
# The sweep, one statement (run by the lease chore, see leases.py):
# 1. lost: lock the LOST workers that still have jobs to expire. A heartbeat
#    committed meanwhile is seen when the row is locked (the WHERE is rechecked
#    on the newest row version), and the worker is skipped; a heartbeat that
#    comes after waits for this statement, so it cannot slip in between.
# 2. candidate: up to EXPIRY_BATCH of their jobs in a leased status, one
#    range scan of jobs_node_status_newest per (worker, status).
# 3. target: lock those jobs in id order (the order DELETE /jobs with job_ids
#    locks in, so the two cannot deadlock), rechecking status and node on
#    each job's newest version: a job completed, stopped, retried on another
#    node or deleted meanwhile is left alone.
# 4. moved + event: each locked job moves along LEASE_EXPIRY from the status
#    it has now, with exactly one event.
# Jobs of a node that never registered have no worker row and are never
# candidates; SCHEDULED is not a leased status.
EXPIRE_LEASES = f"""
WITH lost AS (
    SELECT w.node_id, w.heartbeat_at
    FROM workers w
    WHERE w.heartbeat_at < {LOST_BEFORE}
      AND EXISTS (SELECT FROM jobs
                  WHERE jobs.node_id = w.node_id AND jobs.status = ANY(%(leased)s))
    ORDER BY w.heartbeat_at
    LIMIT %(batch)s
    FOR UPDATE OF w
), candidate AS (
    SELECT j.id, lost.node_id, lost.heartbeat_at
    FROM lost
    CROSS JOIN LATERAL unnest(%(leased)s::text[]) AS leased(status)
    CROSS JOIN LATERAL (
        SELECT id FROM jobs
        WHERE jobs.node_id = lost.node_id AND jobs.status = leased.status
        ORDER BY -jobs.id
        LIMIT %(batch)s
    ) j
    LIMIT %(batch)s
), target AS (
    SELECT jobs.id, jobs.status, c.heartbeat_at
    FROM jobs JOIN candidate c ON c.id = jobs.id
    WHERE jobs.node_id = c.node_id AND jobs.status = ANY(%(leased)s)
    ORDER BY jobs.id
    FOR UPDATE OF jobs
), moved AS (
    UPDATE jobs
    SET status = expiry.to_status, updated_at = clock_timestamp()
    FROM target
    JOIN unnest(%(from)s::text[], %(to)s::text[]) AS expiry(from_status, to_status)
      ON expiry.from_status = target.status
    WHERE jobs.id = target.id
    RETURNING jobs.id, jobs.updated_at, jobs.status, jobs.node_id, target.heartbeat_at
), event AS (
    INSERT INTO job_events (job_id, created_at, event_type, node_id, detail)
    SELECT id, updated_at, status, node_id,
           jsonb_build_object('reason', 'worker_lost',
                              'heartbeat_at', jobs_timestamp(heartbeat_at))
    FROM moved
)
SELECT status, count(*) FROM moved GROUP BY status
"""

# Each from-status has exactly one expiry move.
_EXPIRY_MOVES = sorted((f, to) for to, froms in LEASE_EXPIRY.items() for f in froms)
assert len({f for f, _ in _EXPIRY_MOVES}) == len(_EXPIRY_MOVES) == len(LEASED_STATUSES)


def expire_leases(cur, lost_after_s: float, batch: int) -> dict[str, int]:
    """Expire up to ``batch`` jobs of LOST workers on ``cur``; the count per new status."""
    cur.execute(
        EXPIRE_LEASES,
        {
            "lost_after_s": lost_after_s,
            "batch": batch,
            "leased": list(LEASED_STATUSES),
            "from": [f for f, _ in _EXPIRY_MOVES],
            "to": [to for _, to in _EXPIRY_MOVES],
        },
    )
    return dict(cur.fetchall())
