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
therefore recovers by itself when PostgreSQL comes back.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import threading
import time

import psycopg2
import psycopg2.extensions


class Connection(psycopg2.extensions.connection):
    """A connection that remembers the statements prepared in its session."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prepared: set[str] = set()


class Prepared:
    """A statement prepared once per session, then only EXECUTEd.

    psycopg2 sends every query as text for the server to parse and plan anew;
    for the hot reads that planning costs as much as running them (pgbench on
    the list query: ~4,700 tps as simple queries, ~7,700 prepared). ``sql``
    uses psycopg2's %(name)s placeholders; ``types`` names each parameter's
    SQL type, in order. Prepared statements outlive transactions, not the
    session: a new connection (Connection.prepared empty) prepares again.
    """

    def __init__(self, name: str, sql: str, **types: str):
        numbers = {param: f"${n}" for n, param in enumerate(types, start=1)}
        body = re.sub(r"%\((\w+)\)s", lambda m: numbers[m.group(1)], sql)
        self.name = name
        self.prepare_sql = f"PREPARE {name} ({', '.join(types.values())}) AS {body}"
        self.execute_sql = f"EXECUTE {name} ({', '.join(f'%({p})s' for p in types)})"

    def execute(self, cur, params) -> None:
        prepared = cur.connection.prepared
        if self.name not in prepared:
            cur.execute(self.prepare_sql)
            prepared.add(self.name)
        cur.execute(self.execute_sql, params)


class PoolExhausted(psycopg2.OperationalError):
    """Every connection is in use and none came back in time."""


class ConnectionPool:
    def __init__(self, dsn: str, max_size: int, wait_timeout: float, **connect_kwargs):
        self._dsn = dsn
        self._connect_kwargs = connect_kwargs
        self._wait_timeout = wait_timeout
        self._idle: list[psycopg2.extensions.connection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_size)
        self.pid = os.getpid()

    def getconn(self) -> psycopg2.extensions.connection:
        if not self._slots.acquire(timeout=self._wait_timeout):
            raise PoolExhausted("no database connection free")
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
            if not broken and not conn.closed:
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
        conn.autocommit = True
        return conn


def _alive(conn) -> bool:
    if conn.closed:
        return False
    # An idle connection has nothing to read; anything readable is the server
    # closing it (or an error for us), so it is no longer usable.
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    return not poller.poll(0)


def _close_quietly(conn) -> None:
    with contextlib.suppress(psycopg2.Error):
        conn.close()


def ping(dsn: str, timeout: float, **connect_kwargs) -> None:
    """Connect and run SELECT 1 within ``timeout`` seconds, or raise.

    Uses psycopg2's asynchronous mode so the deadline holds even against an
    address that drops packets (libpq's own connect_timeout cannot go below 2 s).
    """
    deadline = time.monotonic() + timeout
    conn = psycopg2.connect(dsn, async_=True, **connect_kwargs)
    try:
        _wait(conn, deadline)
        cur = conn.cursor()
        cur.execute("SELECT 1")
        _wait(conn, deadline)
        cur.fetchone()
    finally:
        _close_quietly(conn)


def _wait(conn, deadline: float) -> None:
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise psycopg2.OperationalError("timed out")
        fd = conn.fileno()
        if state == psycopg2.extensions.POLL_READ:
            ready = select.select([fd], [], [], remaining)[0]
        else:
            ready = select.select([], [fd], [], remaining)[1]
        if not ready:
            raise psycopg2.OperationalError("timed out")
