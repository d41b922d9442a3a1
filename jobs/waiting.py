"""Waiting without polling: what wakes a long-polled heartbeat, events request or follow stream.

A waiting request holds no database connection: it registers a ``Waiter``
under a key (``("node", node_id)`` for a heartbeat, ``("job", job_id)`` for
events), gives its pooled connection back, and sleeps on the waiter's event
(a greenlet under gunicorn's gevent workers). It checks the database once
when it registers, and again each time it is woken: a wake-up only says
"look again", so a spurious one costs a query and a lost one is impossible as
long as something wakes it.

Each process has one ``Hub`` (on the app, made lazily after gunicorn forks,
like the pool) and in it one greenlet with a connection of its own, started
by the first waiter:

- **listen** (DATABASE_URL reaches PostgreSQL itself, or DATABASE_LISTEN_URL
  is set): ``LISTEN jobs_events``; schema.sql's triggers NOTIFY every
  committed event and every deleted job, from whichever replica, and each
  notification wakes the waiters of its keys. A ping every PING_S finds a
  connection that died silently.
- **poll** (a pooler: a LISTEN through PgBouncer in transaction mode would sit
  on a server connection that other clients' transactions get, and hear
  nothing): one query per WAIT_POLL_INTERVAL_MS for all the process's waiters
  (store/waiting.NEW_EVENTS), only while there are any.

Whenever the connection is lost or (re)made, every waiter is woken to check
again: with the database away that check fails and the request answers its
route's JSON error; once it is back, nothing that happened meanwhile is
missed. The greenlet ends, closing its connection, after IDLE_CLOSE_S without
waiters. On SIGTERM (gunicorn.conf.py) ``stop_all`` wakes every waiter to
answer at once with what it has, so shutdown never waits out a long poll.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Iterator

import psycopg2

from jobs import observability, pool
from jobs.domain import HEARTBEAT_WAKE_EVENTS
from jobs.store import waiting as wait_store

log = logging.getLogger("jobs")

# Seconds without a word from the listening connection after which it is pinged
# (and how long the ping may take): a server gone without a FIN is noticed.
PING_S = 5.0
PING_BUDGET_S = 2.0
# Reconnecting: after RECONNECT_MIN_S, doubling up to RECONNECT_MAX_S while it fails.
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 1.0
IDLE_CLOSE_S = 30.0
# Polling: events that commit out of id order (an id is taken at INSERT, the
# row seen at COMMIT) are caught by reading again from where the events seen
# LOOKBACK_S ago ended; BATCH events per query.
LOOKBACK_S = 2.0
POLL_BATCH = 5000


class Busy(Exception):
    """The process holds WAITERS_PER_PROCESS waiting requests already."""


class Waiter:
    """One waiting request: woken by its key's news, a (re)connection, or shutdown."""

    __slots__ = ("_event", "counted", "key", "kind")

    def __init__(self, key: tuple, kind: str):
        self.key, self.kind = key, kind
        self._event = threading.Event()
        # In jobs_waiting_requests from its first sleep: after the request's first look
        # at the database, so a waiting request seen there has taken its starting point
        # (a wait without ``after`` fixes "the latest event at arrival" in that look).
        self.counted = False

    def wake(self) -> None:
        self._event.set()

    def sleep(self, timeout: float) -> bool:
        """Up to ``timeout`` seconds; True when woken. A wake-up that comes while the
        caller then checks the database is kept for the next sleep."""
        if not self.counted:
            self.counted = True
            observability.WAITING.labels(self.kind).inc()
        woken = self._event.wait(max(0.0, timeout))
        self._event.clear()
        return woken


_hubs: weakref.WeakSet[Hub] = weakref.WeakSet()
_hubs_lock = threading.Lock()


def of(app) -> Hub:
    """The process's hub for ``app``, made on first use: after gunicorn forks, never before."""
    hub = app.extensions.get("jobs_waiting")
    if hub is None or hub.pid != os.getpid():
        with _hubs_lock:
            hub = app.extensions.get("jobs_waiting")
            if hub is None or hub.pid != os.getpid():
                hub = app.extensions["jobs_waiting"] = Hub(app.config)
                _hubs.add(hub)
    return hub


def stop_all() -> None:
    """Shutdown (SIGTERM): every waiting request of this process answers now."""
    for hub in list(_hubs):
        if hub.pid == os.getpid():
            hub.stop()


class Hub:
    """One process's waiters, and the greenlet that wakes them."""

    def __init__(self, config):
        self.pid = os.getpid()
        self.capacity = int(config["WAITERS_PER_PROCESS"])
        self.poll_interval_s = config["WAIT_POLL_INTERVAL_MS"] / 1000
        self._listen_url = config["DATABASE_LISTEN_URL"]
        self._url = config["DATABASE_URL"]
        self._statement_timeout_ms = config["STATEMENT_TIMEOUT_MS"]
        from jobs.db import connect_options  # db imports Flask; this module need not

        self._connect_options = {
            **connect_options(config),
            "application_name": "jobs-service-waiting",
        }
        self._lock = threading.Lock()
        self._waiters: dict[tuple, set[Waiter]] = collections.defaultdict(set)
        self._count = 0
        self._thread: threading.Thread | None = None
        self._some_waiting = threading.Event()  # wakes an idle poller
        self._idle_times = 0  # how often the last waiter left
        self.stopping = False
        self._closed = False
        self.mode: str | None = None  # "listen" or "poll", once connected
        self.connected = False
        self._last_busy = 0.0  # monotonic time the greenlet last saw a waiter

    # -- waiters

    @contextlib.contextmanager
    def waiting(self, key: tuple, kind: str) -> Iterator[Waiter]:
        """Register a waiter for the block (Busy when the process holds its capacity)."""
        waiter = self.register(key, kind)
        try:
            yield waiter
        finally:
            self.unregister(waiter)

    def register(self, key: tuple, kind: str) -> Waiter:
        waiter = Waiter(key, kind)
        with self._lock:
            if self._count >= self.capacity:
                raise Busy()
            self._waiters[key].add(waiter)
            self._count += 1
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="jobs-waiting", daemon=True)
                self._thread.start()
        self._some_waiting.set()
        return waiter

    def unregister(self, waiter: Waiter) -> None:
        with self._lock:
            held = self._waiters.get(waiter.key)
            if held is None or waiter not in held:
                return
            held.discard(waiter)
            if not held:
                del self._waiters[waiter.key]
            self._count -= 1
            if not self._count:
                self._some_waiting.clear()
                self._idle_times += 1
        if waiter.counted:
            observability.WAITING.labels(waiter.kind).dec()

    @property
    def count(self) -> int:
        return self._count

    def sleep(self, waiter: Waiter, deadline: float) -> bool:
        """Sleep until woken (True: check again) or ``deadline`` (monotonic) or shutdown
        (False: answer now)."""
        if self.stopping:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        return waiter.sleep(remaining) and not self.stopping

    def wake(self, key: tuple) -> None:
        with self._lock:
            woken = list(self._waiters.get(key, ()))
        for waiter in woken:
            waiter.wake()

    def wake_all(self) -> None:
        with self._lock:
            woken = [w for held in self._waiters.values() for w in held]
        for waiter in woken:
            waiter.wake()

    def stop(self) -> None:
        """Shutdown: every waiter answers now, and new ones do not wait."""
        self.stopping = True
        self.wake_all()

    def close(self) -> None:
        """Stop waiting for good: the greenlet ends and closes its connection within
        PING_S (tests; a process about to exit)."""
        self._closed = True
        self.stop()
        self._some_waiting.set()

    # -- what wakes them

    def dispatch(self, payload: str) -> None:
        """Wake the waiters a notification (schema.sql's format) concerns."""
        kind, _, items = payload.partition(" ")
        try:
            if kind == "e":
                for item in items.split(" "):
                    fields = item.split(",")
                    if len(fields) not in (3, 4):
                        raise ValueError(item)
                    self._event(int(fields[0]), fields[2], fields[3] if len(fields) == 4 else None)
            elif kind == "d":
                for item in items.split(" "):
                    self.wake(("job", int(item)))
            else:
                raise ValueError(kind)
        except ValueError:
            # Not ours to read (a hand-made row?): whoever it concerns checks again.
            self.wake_all()

    def _event(self, job_id: int, event_type: str, node_id: str | None) -> None:
        """An event committed: its job's waiters look, and its worker's if it concerns them."""
        self.wake(("job", job_id))
        if node_id is not None and event_type in HEARTBEAT_WAKE_EVENTS:
            self.wake(("node", node_id))

    # -- the greenlet

    def _run(self) -> None:
        delay = RECONNECT_MIN_S
        while True:
            try:
                self._session()
                delay = RECONNECT_MIN_S
            except (psycopg2.Error, OSError) as exc:
                if self.connected or delay == RECONNECT_MIN_S:
                    log.warning(
                        "waiting: lost the database",
                        extra={"fields": {"mode": self.mode, "error": type(exc).__name__}},
                    )
            except Exception:
                log.exception("waiting: unexpected failure")
            if self.connected:
                self.connected = False
                self.wake_all()  # each checks again: its answer, or its route's error
            with self._lock:
                if self._closed or (self._count == 0 and self._idle_for_long()):
                    self._thread = None
                    return
            time.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    def _idle_for_long(self) -> bool:
        return time.monotonic() - self._last_busy >= IDLE_CLOSE_S

    def _session(self) -> None:
        url = self._listen_url or self._url
        conn = psycopg2.connect(url, connection_factory=pool.Connection, **self._connect_options)
        try:
            conn.configure(self._statement_timeout_ms)  # finds out whether it is direct
            if conn.direct:
                self._listen(conn)
            else:
                if self._listen_url:
                    log.warning(
                        "waiting: DATABASE_LISTEN_URL does not reach PostgreSQL directly;"
                        " polling instead"
                    )
                self._poll(conn)
        finally:
            with contextlib.suppress(psycopg2.Error):
                conn.close()

    def _connected(self, mode: str) -> None:
        self.mode, self.connected = mode, True
        observability.WAIT_CONNECTS.labels(mode).inc()
        # Whatever happened before this connection could hear it, every waiter checks.
        self.wake_all()

    def _still_wanted(self) -> bool:
        """False once the greenlet should end: closed, or no waiter for IDLE_CLOSE_S."""
        if self._closed:
            return False
        if self._count:
            self._last_busy = time.monotonic()
            return True
        return not self._idle_for_long()

    def _listen(self, conn) -> None:
        with conn.cursor() as cur:
            wait_store.listen(cur)
        self._last_busy = time.monotonic()
        self._connected("listen")
        fd = conn.fileno()
        while self._still_wanted():
            if conn.notifies:
                notes = list(conn.notifies)
                conn.notifies.clear()
                for note in notes:
                    self.dispatch(note.payload)
                continue
            if _readable(fd, PING_S):
                conn.poll()  # reads what arrived; raises when the server is gone
                continue
            saved, conn.budget_s = conn.budget_s, PING_BUDGET_S
            try:
                with conn.cursor() as cur:
                    wait_store.ping(cur)
            finally:
                conn.budget_s = saved

    def _poll(self, conn) -> None:
        cur = conn.cursor()
        self._last_busy = time.monotonic()
        after = wait_store.latest_event_id(cur)
        self._connected("poll")
        marks: collections.deque[tuple[float, int]] = collections.deque()
        seen: set[int] = set()
        idle_times = self._idle_times
        while self._still_wanted():
            if not self._count:
                # Nobody waits: no queries. The next waiter starts afresh (below).
                self._some_waiting.wait(PING_S)
                after = None
                continue
            if idle_times != self._idle_times:  # nobody waited for a moment: afresh too
                idle_times, after = self._idle_times, None
            if after is None:
                # From the latest event on; whatever came before, every waiter checks.
                after = wait_store.latest_event_id(cur)
                marks.clear()
                seen.clear()
                self.wake_all()
            started = time.monotonic()
            # From where the events seen LOOKBACK_S ago ended (see LOOKBACK_S).
            while marks and started - marks[0][0] > LOOKBACK_S and len(marks) > 1:
                marks.popleft()
            floor = marks[0][1] if marks else after
            highest = self._poll_once(cur, floor, seen)
            if highest is None:  # event ids went back (a TRUNCATE, a restore): start afresh
                after = None
                continue
            after = max(after, highest)
            marks.append((started, after))
            seen.difference_update([i for i in seen if i <= marks[0][1]])
            time.sleep(max(0.0, self.poll_interval_s - (time.monotonic() - started)))

    def _poll_once(self, cur, floor: int, seen: set[int]) -> int | None:
        with self._lock:
            watched = [key[1] for key in self._waiters if key[0] == "job"]
        highest = floor
        gone_checked = False
        while True:
            polled = wait_store.new_events(
                cur, highest, [] if gone_checked else watched, POLL_BATCH
            )
            gone_checked = True
            if polled.latest < floor:
                return None
            for job_id in polled.gone:
                self.wake(("job", job_id))
            for event_id, job_id, event_type, node_id in polled.events:
                if event_id not in seen:
                    seen.add(event_id)
                    self._event(job_id, event_type, node_id)
            if polled.events:
                highest = polled.events[-1][0]
            if len(polled.events) < POLL_BATCH:
                return highest


def _readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` has something to read within ``timeout`` (cooperative under gevent:
    ``select`` is looked up now, after monkey-patching)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(timeout * 1000))
