"""Workers: registration, heartbeats, and the expiry of a lost worker's leases.

A worker is LOST when its heartbeat_at is older than WORKER_LOST_AFTER_S
(the database's clock decides, never the worker's), unless a heartbeat of it
is waiting (waiting_until, set by a long-polled heartbeat, is still ahead).
Every statement that shows, counts or expires a worker decides with the same
expression (LOST_SQL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from jobs.domain import ACTIVE_STATUSES, LEASE_EXPIRY, LEASED_STATUSES, MAX_BATCH
from jobs.store.jobs import DEFAULT_BACKOFF, RETRY_DELAY_SQL, Backoff
from jobs.store.outcomes import NOT_FOUND, NotFound
from jobs.store.sql import as_jsonb, fetch_all, fetch_one

ACTIVE = list(ACTIVE_STATUSES)

LOST_BEFORE = "clock_timestamp() - make_interval(secs => %(lost_after_s)s)"
# A worker waiting in a heartbeat is never LOST, whichever replica holds the
# wait: its mark is in its row (see HEARTBEAT).
LOST_SQL = (
    f"(w.heartbeat_at < {LOST_BEFORE}"
    " AND (w.waiting_until IS NULL OR w.waiting_until < clock_timestamp()))"
)
STATUS_SQL = f"CASE WHEN {LOST_SQL} THEN 'LOST' ELSE 'ALIVE' END"
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


# How long past the end of its wait a waiting heartbeat's mark lasts: room for
# the answering statement to wait for a pooled connection (DB_POOL_TIMEOUT_S)
# and run, so that its worker is never LOST in between.
WAIT_MARK_GRACE_S = 10

# The lists come from jobs_node_status_newest (-id descending: oldest first),
# so a worker with a long history reads only its active entries: one range
# scan per status, at most MAX_BATCH entries each, merged. They are read in
# the statement's snapshot, taken before the update. ``leases`` are the
# fencing tokens: every active job of the worker with its attempt, which the
# worker names in its reports (docs/API.md, "Writing a worker").
#
# A long-polled heartbeat (?wait=S, api/workers.py) runs this statement when it
# arrives, on each wake-up and when it answers. On arrival ({wait_s} set)
# with nothing to start or stop, it marks the worker as waiting until the end
# of its wait plus WAIT_MARK_GRACE_S: the later of its mark and any other, so
# two waiting heartbeats of one worker keep the longer. It gets its own mark
# back as "mine"; the statement that answers ({final}, or any that finds
# something to start or stop) clears the mark only if it is still that one.
# A replica that dies mid-wait leaves the mark, which then runs out.
_HEARTBEAT = f"""
WITH pending AS (
    SELECT ARRAY(SELECT id FROM jobs
                 WHERE jobs.node_id = %(node_id)s AND jobs.status = 'SCHEDULED'
                 ORDER BY -jobs.id DESC LIMIT {MAX_BATCH}) AS scheduled,
           ARRAY(SELECT id FROM jobs
                 WHERE jobs.node_id = %(node_id)s AND jobs.status = 'STOP_REQUESTED'
                 ORDER BY -jobs.id DESC LIMIT {MAX_BATCH}) AS stop_requested,
           clock_timestamp() + make_interval(secs => {{wait_s}} + {WAIT_MARK_GRACE_S}) AS mark
), facts AS (
    SELECT *, cardinality(scheduled) = 0 AND cardinality(stop_requested) = 0 AS idle
    FROM pending
), leased AS (
    SELECT l.id, l.attempt, l.status
    FROM unnest(%(active)s::text[]) AS wanted(status)
    CROSS JOIN LATERAL (
        SELECT id, attempt, status FROM jobs
        WHERE jobs.node_id = %(node_id)s AND jobs.status = wanted.status
        ORDER BY -jobs.id DESC LIMIT {MAX_BATCH}
    ) l
    ORDER BY l.id
    LIMIT {MAX_BATCH}
), beat AS (
    UPDATE workers w
    SET heartbeat_at = clock_timestamp(),
        waiting_until = CASE
            WHEN facts.idle AND facts.mark IS NOT NULL THEN greatest(w.waiting_until, facts.mark)
            WHEN w.waiting_until = {{mine}} AND ({{final}} OR NOT facts.idle) THEN NULL
            ELSE w.waiting_until
        END
    FROM facts
    WHERE w.node_id = %(node_id)s
    RETURNING w.heartbeat_at, CASE WHEN facts.idle THEN facts.mark END AS mine
)
SELECT jobs_timestamp(beat.heartbeat_at), facts.scheduled, facts.stop_requested,
       (SELECT coalesce(json_agg(json_build_object(
                    'job_id', leased.id, 'attempt', leased.attempt, 'status', leased.status)
                ORDER BY leased.id), '[]')
        FROM leased),
       beat.mine
FROM beat, facts
"""
# A heartbeat that does not wait, and one that does (its arrival, wake-ups, answer).
HEARTBEAT = _HEARTBEAT.format(wait_s="NULL::float8", mine="NULL::timestamptz", final="false")
WAITING_HEARTBEAT = _HEARTBEAT.format(
    wait_s="%(wait_s)s::float8", mine="%(mine)s::timestamptz", final="%(final)s"
)


@dataclass(frozen=True)
class Heartbeat:
    """What the heartbeat answers (api/workers.heartbeat_body), and the request's own mark."""

    heartbeat_at: str
    scheduled: list[int]
    stop_requested: list[int]
    leases: list[dict]  # {"job_id", "attempt", "status"} of each active job, oldest first
    # Not part of the answer: this request's waiting mark (see HEARTBEAT), or None.
    mine: datetime | None = field(default=None, compare=False, repr=False)

    @property
    def idle(self) -> bool:
        """Nothing to start or stop: a waiting heartbeat goes on waiting."""
        return not self.scheduled and not self.stop_requested


def heartbeat(
    cur, node_id: str, wait_s: float | None = None, mine=None, final: bool = False
) -> Heartbeat | NotFound:
    """Set heartbeat_at; the worker's SCHEDULED and STOP_REQUESTED jobs, and its leases.

    ``wait_s``: the request arrives and will wait that long if there is nothing
    (mark the worker waiting); ``mine``: the mark it got back then; ``final``:
    this statement answers the request whatever it finds (clear the mark).
    """
    if wait_s is None and mine is None and not final:
        row = fetch_one(cur, HEARTBEAT, {"node_id": node_id, "active": ACTIVE})
    else:
        row = fetch_one(
            cur,
            WAITING_HEARTBEAT,
            {"node_id": node_id, "active": ACTIVE, "wait_s": wait_s, "mine": mine, "final": final},
        )
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
SELECT count(*) FILTER (WHERE NOT {LOST_SQL}), count(*) FILTER (WHERE {LOST_SQL})
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
#    range scan of jobs_node_status_newest per (worker, status), with the
#    status and attempt the sweep saw.
# 3. target: lock those jobs in id order (the order DELETE /jobs with job_ids
#    locks in, so the two cannot deadlock), rechecking on each job's newest
#    version that it still has the node, status and attempt the sweep saw: a
#    job completed, stopped, moved on, retried (on any node: its attempt
#    grew) or deleted meanwhile is left alone, and a later sweep looks again.
# 4. moved + event: each locked job moves along LEASE_EXPIRY from the status
#    it has now, with exactly one event. A job that becomes FAILED below its
#    max_attempts gets its retry_at, as a worker's FAILED report would
#    (store/jobs.py CHANGE_STATUS, the same single clock reading).
# Jobs of a node that never registered have no worker row and are never
# candidates; SCHEDULED is not a leased status.
EXPIRE_LEASES = f"""
WITH lost AS (
    SELECT w.node_id, w.heartbeat_at
    FROM workers w
    WHERE {LOST_SQL}
      AND EXISTS (SELECT FROM jobs
                  WHERE jobs.node_id = w.node_id AND jobs.status = ANY(%(leased)s))
    ORDER BY w.heartbeat_at
    LIMIT %(batch)s
    FOR UPDATE OF w
), candidate AS (
    SELECT j.id, j.status, j.attempt, lost.node_id, lost.heartbeat_at
    FROM lost
    CROSS JOIN LATERAL unnest(%(leased)s::text[]) AS leased(status)
    CROSS JOIN LATERAL (
        SELECT id, status, attempt FROM jobs
        WHERE jobs.node_id = lost.node_id AND jobs.status = leased.status
        ORDER BY -jobs.id
        LIMIT %(batch)s
    ) j
    LIMIT %(batch)s
), target AS (
    SELECT jobs.id, jobs.status, c.heartbeat_at
    FROM jobs JOIN candidate c ON c.id = jobs.id
    WHERE jobs.node_id = c.node_id AND jobs.status = c.status AND jobs.attempt = c.attempt
    ORDER BY jobs.id
    FOR UPDATE OF jobs
), moved AS (
    UPDATE jobs
    SET status = expiry.to_status,
        (updated_at, retry_at) = (
            SELECT now.t,
                   CASE WHEN expiry.to_status = 'FAILED' AND jobs.attempt < jobs.max_attempts
                        THEN now.t + {RETRY_DELAY_SQL.format(attempt="jobs.attempt")} END
            FROM (SELECT clock_timestamp() AS t) now)
    FROM target
    JOIN unnest(%(from)s::text[], %(to)s::text[]) AS expiry(from_status, to_status)
      ON expiry.from_status = target.status
    WHERE jobs.id = target.id
    RETURNING jobs.id, jobs.updated_at, jobs.status, jobs.node_id, jobs.retry_at,
              target.heartbeat_at
), event AS (
    INSERT INTO job_events (job_id, created_at, event_type, node_id, detail)
    SELECT id, updated_at, status, node_id,
           jsonb_build_object('reason', 'worker_lost',
                              'heartbeat_at', jobs_timestamp(heartbeat_at))
    FROM moved
)
SELECT status, count(*), count(retry_at) FROM moved GROUP BY status
"""

# Each from-status has exactly one expiry move.
_EXPIRY_MOVES = sorted((f, to) for to, froms in LEASE_EXPIRY.items() for f in froms)
assert len({f for f, _ in _EXPIRY_MOVES}) == len(_EXPIRY_MOVES) == len(LEASED_STATUSES)


class Expired(dict):
    """The jobs a sweep moved, new status -> count, and how many of them wait for a retry."""

    def __init__(self, moved=(), retries_scheduled: int = 0):
        super().__init__(moved)
        self.retries_scheduled = retries_scheduled


def expire_leases(
    cur, lost_after_s: float, batch: int, backoff: Backoff = DEFAULT_BACKOFF
) -> Expired:
    """Expire up to ``batch`` jobs of LOST workers on ``cur``; the count per new status."""
    cur.execute(
        EXPIRE_LEASES,
        {
            "lost_after_s": lost_after_s,
            "batch": batch,
            "leased": list(LEASED_STATUSES),
            "from": [f for f, _ in _EXPIRY_MOVES],
            "to": [to for _, to in _EXPIRY_MOVES],
            **backoff.params(),
        },
    )
    rows = cur.fetchall()
    return Expired(
        {status: count for status, count, _ in rows}, sum(retries for _, _, retries in rows)
    )


# ---- Automatic retries ------------------------------------------------------------
#
# The retry sweep, one statement (run by the retry chore, chores/retries.py):
# 1. due: up to %(batch)s jobs whose retry_at has passed, oldest due first,
#    from the front of jobs_retry_due (the waiting jobs only). A job whose
#    worker is LOST cannot go anywhere while no worker is ALIVE: it is not
#    taken, so it cannot hold up the others, and waits for a later sweep.
# 2. picked: those jobs locked in id order, rechecking on each job's newest
#    version that it is still FAILED and due. A job retried by an operator,
#    stopped (its retry cancelled) or deleted meanwhile is left alone, and so
#    is one another sweep holds (SKIP LOCKED): with the chore's claim, each
#    retry is made once across every replica.
# 3. placement: a job stays on its node when that worker is ALIVE or never
#    registered. The jobs of LOST workers go to the ALIVE workers with the
#    fewest active jobs, as if placed one at a time: each ALIVE worker offers
#    slots at loads (its active jobs) + 0, 1, 2 ..., the slots are taken in
#    order of load, then node_id in byte order, and the n-th such job (by
#    retry_at) takes the n-th slot. Only the (number of such jobs) least
#    loaded workers can get one, so no more are counted.
# 4. moved + event: FAILED -> SCHEDULED with attempt + 1 and retry_at null,
#    and one SCHEDULED event {"reason": "retry", "attempt": n}, naming
#    "from_node_id" when the job changed worker.
# now(), not clock_timestamp(), decides what is due: a stable value is an
# index bound, so a sweep with nothing due reads one index entry.
RETRY_DUE = f"""
WITH alive AS (
    SELECT w.node_id FROM workers w WHERE NOT {LOST_SQL}
), due AS (
    SELECT j.id FROM jobs j
    WHERE j.status = 'FAILED' AND j.retry_at IS NOT NULL AND j.retry_at <= now()
      AND (EXISTS (SELECT FROM alive)
           OR NOT EXISTS (SELECT FROM workers w
                          WHERE w.node_id = j.node_id AND {LOST_SQL}))
    ORDER BY j.retry_at
    LIMIT %(batch)s
), picked AS (
    SELECT jobs.id, jobs.node_id, jobs.retry_at,
           EXISTS (SELECT FROM workers w
                   WHERE w.node_id = jobs.node_id AND {LOST_SQL}) AS lost
    FROM jobs JOIN due ON due.id = jobs.id
    WHERE jobs.status = 'FAILED' AND jobs.retry_at IS NOT NULL AND jobs.retry_at <= now()
    ORDER BY jobs.id
    FOR UPDATE OF jobs SKIP LOCKED
), movers AS (
    SELECT id, row_number() OVER (ORDER BY retry_at, id) AS n FROM picked WHERE lost
), candidates AS (
    SELECT a.node_id,
           (SELECT count(*) FROM jobs
            WHERE jobs.node_id = a.node_id AND jobs.status = ANY(%(active)s)) AS load
    FROM alive a
    ORDER BY load, a.node_id COLLATE "C"
    LIMIT (SELECT count(*) FROM movers)
), slots AS (
    SELECT c.node_id, row_number() OVER (ORDER BY c.load + s.k, c.node_id COLLATE "C") AS n
    FROM candidates c
    CROSS JOIN LATERAL generate_series(0, (SELECT count(*) FROM movers) - 1) AS s(k)
), placed AS (
    SELECT picked.id, picked.node_id AS from_node_id, picked.lost,
           coalesce(slots.node_id, picked.node_id) AS node_id
    FROM picked
    LEFT JOIN movers ON movers.id = picked.id
    LEFT JOIN slots ON slots.n = movers.n
    WHERE NOT picked.lost OR slots.node_id IS NOT NULL
), moved AS (
    UPDATE jobs
    SET status = 'SCHEDULED', attempt = jobs.attempt + 1, retry_at = NULL,
        node_id = placed.node_id, updated_at = clock_timestamp()
    FROM placed
    WHERE jobs.id = placed.id
    RETURNING jobs.id, jobs.updated_at, jobs.node_id, jobs.attempt,
              placed.from_node_id, placed.lost
), event AS (
    INSERT INTO job_events (job_id, created_at, event_type, node_id, detail)
    SELECT id, updated_at, 'SCHEDULED', node_id,
           jsonb_build_object('reason', 'retry', 'attempt', attempt)
           || CASE WHEN lost THEN jsonb_build_object('from_node_id', from_node_id)
                   ELSE '{{}}'::jsonb END
    FROM moved
)
SELECT count(*), count(*) FILTER (WHERE lost) FROM moved
"""


@dataclass(frozen=True)
class Retried:
    retried: int  # jobs scheduled again
    moved: int  # of which went to another worker (theirs was LOST)


def retry_due(cur, lost_after_s: float, batch: int) -> Retried:
    """Schedule again up to ``batch`` jobs whose retry is due, on ``cur``."""
    cur.execute(
        RETRY_DUE, {"lost_after_s": lost_after_s, "batch": int(batch), "active": ACTIVE}
    )
    return Retried(*cur.fetchone())
