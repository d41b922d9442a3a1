"""PostgreSQL connections: a small per-process pool that survives outages.

Why not psycopg2's ThreadedConnectionPool: it opens ``minconn`` connections
eagerly and closes every connection returned above ``minconn``, so under
threads a bounded-but-lazy pool opens a backend on nearly every request. This
one opens connections only when needed, keeps every returned healthy one, and
bounds how many exist at once.

Outages: a pooled connection whose server went away (restart, failover) has a
readable socket while idle (the server's goodbye or EOF), so it is dropped at
checkout without a round trip; a connection that fails during a request is
closed instead of returned, and the idle ones are dropped with it. The service
therefore recovers by itself when PostgreSQL comes back. So is one whose
server refused a write (DISCARD_SQLSTATES: a standby, or a primary demoted
behind the same name): after a failover the next connection goes, through
libpq's target_session_attrs, to the server that accepts writes.

A server that stops answering without closing (frozen: a storage stall, a
paused VM) is caught by the client-side deadline of ``wait``: every connect
and every query of a pooled connection gives up after its time limit plus
DEADLINE_GRACE_S, and the connection is closed.

Behind a connection pooler (PgBouncer, any pool mode) the service cannot use
session state: no startup ``options`` (stock PgBouncer refuses them), no
session-level SET, no PREPARE (in transaction mode the next transaction may run
on another server connection, or the same one may serve another client). Each
connection finds out whether it reaches PostgreSQL directly (see
Connection.configure) and only then uses prepared statements and session
settings; otherwise the statement timeout is set per transaction.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import threading
import time

import psycopg2
import psycopg2.extensions

from jobs.store import session

# How far past its time limit a query may go unanswered before the client
# gives up on its connection. The server cancels at the limit itself (a
# QueryCanceled, the connection stays usable); this fires only when it
# cannot: frozen, wedged, or a peer gone without a word.
DEADLINE_GRACE_S = 1.0


class DeadlineExceeded(psycopg2.OperationalError):
    """The database did not answer in time; the connection was closed."""


class Cursor(psycopg2.extensions.cursor):
    """A cursor that starts each transaction with the connection's time limit, if told to."""

    def execute(self, query, vars=None):
        conn = self.connection
        # The first statement of a transaction (psycopg2 sends BEGIN before
        # it) or an autocommit statement: the prefix, in the same message,
        # holds for it and ends with it (session.local_timeout_prefix).
        if (
            conn.transaction_prefix
            and conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        ):
            if not isinstance(query, str):  # psycopg2.sql.Composable, bytes
                query = query.as_string(conn) if hasattr(query, "as_string") else query.decode()
            query = conn.transaction_prefix + query
        try:
            return super().execute(query, vars)
        except psycopg2.Error as exc:
            if exc.pgcode in DISCARD_SQLSTATES:
                conn.discard = True
            raise


# Errors after which a connection is closed rather than pooled again, though
# psycopg2 still finds it usable. 25006 read_only_sql_transaction: the server
# behind it refuses writes (a standby, or a primary demoted behind the same
# name): a new connection lets libpq pick a host again (target_session_attrs).
DISCARD_SQLSTATES = frozenset({"25006"})


class Connection(psycopg2.extensions.connection):
    """A pooled connection: how it reaches PostgreSQL decides what it may keep in its session.

    ``direct``: prepared statements (``prepared`` names those of this session)
    and session settings. Through a pooler: neither, and each transaction
    starts with SET LOCAL statement_timeout (``transaction_prefix``).
    ``budget_s`` is how long ``wait`` lets each query of it take.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prepared: set[str] = set()
        self.direct = False
        self.transaction_prefix = ""
        self.statement_timeout_ms: int | None = None
        self.budget_s: float | None = None
        self.discard = False  # set by Cursor.execute: closed, not pooled, when given back
        self.cursor_factory = Cursor

    def configure(self, statement_timeout_ms: int) -> None:
        """Detect a pooler and apply the statement timeout accordingly (autocommit on)."""
        self.autocommit = True
        self.statement_timeout_ms = int(statement_timeout_ms)
        self.budget_s = self.statement_timeout_ms / 1000 + DEADLINE_GRACE_S
        with self.cursor() as cur:
            # Direct or not, from the backend pid PostgreSQL sent at connect.
            self.direct = session.configure(cur, self.statement_timeout_ms, self.info.backend_pid)
        if not self.direct:
            self.transaction_prefix = session.local_timeout_prefix(self.statement_timeout_ms)

    @contextlib.contextmanager
    def time_limit(self, cur, timeout_ms: int):
        """In a transaction: ``timeout_ms`` for the rest of it, on the server and in ``wait``."""
        session.set_local_timeout(cur, timeout_ms)
        saved = self.budget_s
        self.budget_s = int(timeout_ms) / 1000 + DEADLINE_GRACE_S
        try:
            yield cur
        finally:
            self.budget_s = saved


class PoolExhausted(Exception):
    """Every connection is in use and none came back in time: the service is
    overloaded, not the database broken (errors.py answers 503 SERVICE_BUSY), so
    this is deliberately not a psycopg2.Error."""

    def __init__(self, waited_s: float):
        super().__init__(f"no database connection free within {waited_s:g} s")
        self.waited_s = waited_s


class ConnectionPool:
    def __init__(
        self,
        dsn: str,
        max_size: int,
        wait_timeout: float,
        statement_timeout_ms: int,
        **connect_kwargs,
    ):
        install_wait_callback()
        self._dsn = dsn
        self._statement_timeout_ms = statement_timeout_ms
        self._connect_kwargs = connect_kwargs
        self._wait_timeout = wait_timeout
        self._idle: list[psycopg2.extensions.connection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_size)
        self.pid = os.getpid()

    def getconn(self) -> psycopg2.extensions.connection:
        if not self._slots.acquire(timeout=self._wait_timeout):
            raise PoolExhausted(self._wait_timeout)
        try:
            while True:
                with self._lock:
                    conn = self._idle.pop() if self._idle else None
                if conn is None:
                    return self._connect()
                if _alive(conn):
                    return conn
                _close_quietly(conn)
        except BaseException:
            self._slots.release()
            raise

    def putconn(self, conn: psycopg2.extensions.connection, broken: bool = False) -> None:
        try:
            if not broken and not conn.closed and not getattr(conn, "discard", False):
                if conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                    conn.rollback()
                with self._lock:
                    self._idle.append(conn)
                return
            _close_quietly(conn)
            # A connection broke: the others most likely share its fate.
            self.drop_idle()
        except psycopg2.Error:
            _close_quietly(conn)
            self.drop_idle()
        finally:
            self._slots.release()

    def drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            _close_quietly(conn)

    def _connect(self) -> psycopg2.extensions.connection:
        conn = psycopg2.connect(self._dsn, connection_factory=Connection, **self._connect_kwargs)
        try:
            conn.configure(self._statement_timeout_ms)
        except BaseException:
            _close_quietly(conn)
            raise
        return conn


def _alive(conn) -> bool:
    if conn.closed:
        return False
    # An idle connection has nothing to read; anything readable is the server
    # closing it (or an error for us), so it is no longer usable.
    # The unpatched poll: a zero timeout never waits, and under gevent the
    # patched one costs far more per checkout (BENCHMARKS.md, "How the service gets there").
    poller = _blocking_poll()()
    poller.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    return not poller.poll(0)


def _close_quietly(conn) -> None:
    with contextlib.suppress(psycopg2.Error):
        conn.close()


def query_once(dsn: str, timeout: float, sql: str, params=None, **connect_kwargs) -> list[tuple]:
    """Run one query on a connection of its own within ``timeout`` seconds, or raise
    (for what must answer fast whatever the database does: /metrics).

    Uses psycopg2's asynchronous mode so the deadline holds even against an
    address that drops packets (libpq's own connect_timeout cannot go below 2 s).
    """
    deadline = time.monotonic() + timeout
    conn = psycopg2.connect(dsn, async_=True, **connect_kwargs)
    try:
        _wait(conn, deadline)
        return _query(conn, sql, params, deadline)
    finally:
        _close_quietly(conn)


class KeptConnection:
    """One connection of its own, kept between queries, each within a deadline (readiness).

    Like ``query_once``, whatever the database does the answer comes within
    the deadline; unlike it, a check costs one round trip, not a connection
    set-up (a new backend process on the server, and the several round trips
    of the start-up, each a trip through gevent's hub on a busy worker). One
    connection at most, per process: a caller must not run two queries at once
    (readiness.py runs one check at a time). A connection the server closed
    (a restart, an idle timeout) is noticed without a round trip and replaced
    within the same deadline; one that fails or times out is closed.
    """

    def __init__(self, dsn: str, **connect_kwargs):
        self.dsn = dsn
        self._connect_kwargs = connect_kwargs
        self._conn = None
        self._pid = os.getpid()

    def query(self, timeout: float, sql: str, params=None) -> list[tuple]:
        deadline = time.monotonic() + timeout
        if self._pid != os.getpid():
            # A forked copy: the parent's session, not to be used nor closed here.
            self._conn, self._pid = None, os.getpid()
        conn = self._conn
        if conn is not None and _alive(conn):
            try:
                return _query(conn, sql, params, deadline)
            except psycopg2.Error:
                self.close()
                if time.monotonic() >= deadline:
                    raise
                # Gone between the look and the query: once more, on a new one.
            except BaseException:
                self.close()
                raise
        self.close()
        conn = self._conn = psycopg2.connect(self.dsn, async_=True, **self._connect_kwargs)
        try:
            _wait(conn, deadline)
            return _query(conn, sql, params, deadline)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            _close_quietly(conn)


def _query(conn, sql: str, params, deadline: float) -> list[tuple]:
    cur = conn.cursor()
    cur.execute(sql, params)
    _wait(conn, deadline)
    return cur.fetchall()


def _wait(conn, deadline: float) -> None:
    """An asynchronous connection's wait, to the deadline: up to SPIN_S without a
    switch through gevent's hub (a local server answers within it), then cooperatively."""
    spin_until = time.monotonic() + SPIN_S
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        readable = state == psycopg2.extensions.POLL_READ
        now = time.monotonic()
        remaining = deadline - now
        if remaining <= 0:
            raise psycopg2.OperationalError("timed out")
        fd = conn.fileno()
        if now < spin_until and _ready_now(fd, readable, min(spin_until - now, remaining)):
            continue
        if readable:
            ready = select.select([fd], [], [], remaining)[0]
        else:
            ready = select.select([], [fd], [], remaining)[1]
        if not ready:
            raise psycopg2.OperationalError("timed out")


# ---- The client-side deadline ------------------------------------------------


def install_wait_callback() -> None:
    """Route every blocking psycopg2 call of this process through ``wait`` (idempotent)."""
    if psycopg2.extensions.get_wait_callback() is not wait:
        psycopg2.extensions.set_wait_callback(wait)


def wait(conn) -> None:
    """psycopg2's wait callback: libpq's I/O, with a deadline.

    Once installed, every blocking call of every (non-async) connection in the
    process comes here: connect, each query, BEGIN/COMMIT/ROLLBACK. A
    connection being set up gets its dsn's connect_timeout (libpq does not
    enforce it on this path); a pooled Connection its ``budget_s``; any other
    connection (init-db's, the tests') waits as long as it takes, as without.

    ``select`` is looked up at each call, not imported by name: under gevent's
    monkey-patching the wait then yields to the other greenlets instead of
    blocking the worker. It costs about what psycopg2.extras.wait_select costs
    (BENCHMARKS.md, "The client-side deadline and the PgBouncer path").
    """
    if conn.status == psycopg2.extensions.STATUS_SETUP:
        budget = _connect_timeout(conn.dsn)
    else:
        budget = getattr(conn, "budget_s", None)
    now = time.monotonic()
    deadline = None if budget is None else now + budget
    # A hot read is answered within a millisecond: wait for that much
    # without handing the worker to gevent's hub, whose switch there and back
    # costs more than the wait itself; a slower answer is then awaited
    # cooperatively, so other requests go on meanwhile.
    spin_until = now + SPIN_S
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        readable = state == psycopg2.extensions.POLL_READ
        now = time.monotonic()
        if now < spin_until and _ready_now(conn.fileno(), readable, spin_until - now):
            continue
        timeout = None
        if deadline is not None:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
        if not _wait_fd(conn.fileno(), readable, timeout):
            break
    # psycopg2 closes the connection when this raises (its query may still be
    # running: it cannot be reused), and the request fails as a database error.
    raise DeadlineExceeded(f"the database did not answer within {budget:g} s")


# How long a query's answer is awaited blocking the worker before yielding
# (see wait). Measured under the gevent worker, GET /jobs/{id} with wrk -c4:
# BENCHMARKS.md, "How the service gets there".
SPIN_S = 0.001


def _ready_now(fd: int, readable: bool, timeout: float) -> bool:
    """Wait up to ``timeout`` for ``fd`` with the unpatched poll: no greenlet switch."""
    poller = _blocking_poll()()
    poller.register(fd, select.POLLIN if readable else select.POLLOUT)
    return bool(poller.poll(timeout * 1000))


@functools.cache
def _blocking_poll():
    """select.poll as the interpreter made it, also once gevent has patched it."""
    try:
        from gevent import monkey
    except ImportError:
        return select.poll
    return monkey.get_original("select", "poll")


def _wait_fd(fd: int, readable: bool, timeout: float | None) -> bool:
    """Wait until ``fd`` is readable (or writable); False if ``timeout`` passed first."""
    poll = getattr(select, "poll", None)  # no FD_SETSIZE limit, unlike select()
    if poll is None:
        ready = select.select([fd] if readable else [], [] if readable else [fd], [], timeout)
        return bool(ready[0] or ready[1])
    poller = poll()
    poller.register(fd, select.POLLIN if readable else select.POLLOUT)
    return bool(poller.poll(None if timeout is None else timeout * 1000))


def _connect_timeout(dsn: str) -> float | None:
    value = psycopg2.extensions.parse_dsn(dsn).get("connect_timeout")
    try:
        seconds = int(value)
    except (TypeError, ValueError):
        return None
    # As libpq reads it: 0 (or less) is no limit, and 1 counts as 2.
    return None if seconds <= 0 else float(max(seconds, 2))
