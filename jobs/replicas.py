"""Reads from standbys: which replica, if any, may answer an operator's read.

DATABASE_REPLICA_URL names one or several standbys (each a libpq URL: a hot
standby, or a PgBouncer in front of one). Each gets a pool of its own
(pool.ConnectionPool: the primary's size and time limits, and its own pooler
detection, per connection). A route declared ``replica=True`` (api/registry.py)
runs on a replica known to be at most REPLICA_MAX_LAG_S behind, and on the
primary otherwise (db.read_on_replica); a read that fails on a replica is run
again on the primary. So a replica outage never fails a read, and everything
else (writes, the workers' routes) never leaves the primary.

How far behind: WAL positions, not timestamps. A check reads the primary's
position (pg_current_wal_insert_lsn: every commit acknowledged so far is
before it, with synchronous_commit off too) at time t, then the replica's
replay position: once the replica has replayed at least that far, it holds
every commit the primary had made by t, so at any later moment its data is at
most (now - t) old. Each check remembers the primary's last few positions, and a replica is
fresh as of the latest one it has replayed. An idle primary keeps its position,
so a caught-up replica stays fresh however long ago the last write was (a replay
timestamp, pg_last_xact_replay_timestamp, would grow and call it stale). Between
checks the age grows with the clock, so a replica that cannot be checked
(down, or the primary down) ages out by itself.

Checks cost two short queries (store/session.py) on pooled connections, at most once per
REPLICA_CHECK_S per replica per process, and only while reads come in. They
run in a thread of their own (a greenlet under gunicorn's gevent workers):
no request waits for one, whatever the replica does.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg2

from jobs import observability
from jobs.pool import ConnectionPool, PoolExhausted
from jobs.store import session

log = logging.getLogger("jobs")

T = TypeVar("T")

# The insert position points past a page's header when the last record ended
# at the page's end, where replay stops: within a header of a page's start
# (SizeOfXLogLongPHD, the longer), the page's start is the position to reach.
# No record ends inside a header, so nothing is skipped.
PAGE_HEADER_MAX = 40
# The longest a check's query may take (its connection is closed past it). A
# connection being opened has DB_CONNECT_TIMEOUT_S, as any other.
CHECK_BUDGET_S = 1.0
# A replica behind the position just read from the primary is asked again,
# up to this many times this far apart.
CATCH_UP_TRIES, CATCH_UP_WAIT_S = 3, 0.01
# The primary's positions a replica is compared with: the last this many checks.
# A replica further behind keeps the freshness it had, which only ages.
SAMPLES = 64


class Replica:
    """One standby: its pool, and what the last checks found."""

    def __init__(self, number: int, pool: ConnectionPool):
        self.number = number  # 1-based, its name in metrics and logs (a URL may hold a password)
        self.pool = pool
        # Monotonic time as of which this replica holds every commit of the
        # primary; None until a check has found one.
        self.fresh_as_of: float | None = None
        self.down = False  # its last check, or a read on it, could not reach it
        self.primary_unknown = False  # its last check could not ask the primary (logged once)
        self.samples: deque[tuple[float, int]] = deque(maxlen=SAMPLES)
        self.checked_at = float("-inf")
        self.checking = threading.Lock()

    def age(self, now: float) -> float | None:
        """How old its data is known to be at most, in seconds; None if unknown."""
        return None if self.fresh_as_of is None else now - self.fresh_as_of


class ReplicaSet:
    """The replicas of one process, their freshness, and the choice for each read."""

    def __init__(self, primary: ConnectionPool, replicas: list[ConnectionPool], max_lag_s, check_s):
        self.primary = primary
        self.replicas = [Replica(n, p) for n, p in enumerate(replicas, start=1)]
        self.max_lag_s = max_lag_s
        self.check_s = check_s
        self.pid = os.getpid()
        self._turns = itertools.count()  # round robin over the usable replicas

    def pick(self) -> tuple[Replica | None, str | None]:
        """A replica fresh enough for a read, or (None, why not: "lag" or "down")."""
        now = time.monotonic()
        usable = []
        for replica in self.replicas:
            if now - replica.checked_at >= self.check_s:
                self._check_soon(replica, now)
            age = replica.age(now)
            if not replica.down and age is not None and age <= self.max_lag_s:
                usable.append(replica)
        if usable:
            return usable[next(self._turns) % len(usable)], None
        return None, "down" if all(r.down for r in self.replicas) else "lag"

    def failed(self, replica: Replica, exc: BaseException) -> None:
        """A read on ``replica`` failed (it is run again on the primary)."""
        # A query the replica refused (a conflict with its replay) leaves it
        # usable; a connection that failed or none free, not until a check says so.
        if isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError | PoolExhausted):
            replica.down = True
        log.warning(
            "replica read failed; answered by the primary",
            extra={"fields": {"replica": replica.number, "error": type(exc).__name__}},
        )

    def check_all(self) -> None:
        """Check every replica now, in this thread (tests; the service checks in the background)."""
        for replica in self.replicas:
            with replica.checking:
                replica.checked_at = time.monotonic()
                self._check(replica)

    def close(self) -> None:
        for replica in self.replicas:
            replica.pool.drop_idle()

    # -- internals

    def _check_soon(self, replica: Replica, now: float) -> None:
        if not replica.checking.acquire(blocking=False):
            return  # another request started it
        replica.checked_at = now

        def run():
            try:
                self._check(replica)
            finally:
                replica.checking.release()

        threading.Thread(target=run, name=f"jobs-replica-{replica.number}", daemon=True).start()

    def _check(self, replica: Replica) -> None:
        asked_at = time.monotonic()
        try:
            primary = _ask(self.primary, session.primary_wal_position)
            position, page = primary.position, primary.page_size
            if position % page <= PAGE_HEADER_MAX:
                position -= position % page
            replica.samples.append((asked_at, position))
        except (psycopg2.Error, PoolExhausted) as exc:
            # The primary away: the replica's freshness stays what it was, and ages.
            if not replica.primary_unknown:
                log.warning(
                    "replica check: the primary's position is unknown",
                    extra={"fields": {"replica": replica.number, "error": type(exc).__name__}},
                )
            replica.primary_unknown = True
        else:
            replica.primary_unknown = False
        try:
            position = _ask(replica.pool, session.replica_wal_position)
            # Replay usually trails by milliseconds: a moment later it has the
            # primary's position of this check, fresh as of now rather than of
            # the previous check (or unknown, at the first).
            for _ in range(CATCH_UP_TRIES):
                if not replica.samples or position >= replica.samples[-1][1]:
                    break
                time.sleep(CATCH_UP_WAIT_S)
                position = _ask(replica.pool, session.replica_wal_position)
        except (psycopg2.Error, PoolExhausted) as exc:
            if not replica.down:
                log.warning(
                    "replica down: reads go to the primary",
                    extra={"fields": {"replica": replica.number, "error": type(exc).__name__}},
                )
            replica.down = True
            observability.replica_age(replica.number, None)
            return
        if replica.down:
            log.info("replica back", extra={"fields": {"replica": replica.number}})
        replica.down = False
        replayed = [at for at, primary in replica.samples if primary <= position]
        if replayed and (replica.fresh_as_of is None or max(replayed) > replica.fresh_as_of):
            replica.fresh_as_of = max(replayed)
        observability.replica_age(replica.number, replica.age(time.monotonic()))


def _ask(pool: ConnectionPool, question: Callable[[Any], T]) -> T:
    """``question(cursor)`` (a store.session statement), on a pooled connection, within
    CHECK_BUDGET_S once connected."""
    conn = pool.getconn()
    broken = True
    try:
        saved, conn.budget_s = conn.budget_s, CHECK_BUDGET_S
        with conn.cursor() as cur:
            answer = question(cur)
        conn.budget_s = saved
        broken = False
        return answer
    finally:
        with contextlib.suppress(psycopg2.Error):
            pool.putconn(conn, broken=broken)
