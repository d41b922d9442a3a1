"""Housekeeping the service does by itself, between requests: no extra process.

A chore (expiring the leases of lost workers, pruning old history) is a
function of a database cursor. Each process runs a due chore after a response
has been sent (Werkzeug's ``call_on_close``), so the request that carried it
pays nothing and the chore runs as long as the service gets any traffic. A
claim row in ``service_chores``, taken with one conditional upsert, makes
each chore run at most once per interval across every replica and process.
A chore must be bounded (small batches) and must not mind being skipped: a
failure is logged and the next interval tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg2
from flask import current_app

import db

log = logging.getLogger("jobs")

# The claim: the row is created on first use; an existing one is taken only
# when its last run is at least the interval ago (the WHERE of ON CONFLICT is
# evaluated under the row's lock, so two replicas cannot both take it).
CLAIM = """
INSERT INTO service_chores AS c (name, ran_at) VALUES (%(name)s, clock_timestamp())
ON CONFLICT (name) DO UPDATE SET ran_at = EXCLUDED.ran_at
WHERE c.ran_at <= EXCLUDED.ran_at - make_interval(secs => %(interval_s)s)
RETURNING true
"""


@dataclass
class Chore:
    name: str
    interval_s: float | Callable  # seconds, or interval_s(config) -> seconds
    run: Callable  # run(cursor, config) -> None, inside one transaction
    enabled: Callable = lambda config: True
    next_check: float = 0.0  # this process's monotonic time of its next look

    def interval(self, config) -> float:
        return self.interval_s(config) if callable(self.interval_s) else self.interval_s


_chores: dict[str, Chore] = {}


def chore(name: str, interval_s: float | Callable, enabled: Callable | None = None):
    """Declare ``run(cursor, config)`` a chore taken every ``interval_s`` seconds
    (a number, or a function of the app's config that returns one)."""

    def register(run):
        _chores[name] = Chore(name, interval_s, run, enabled or (lambda config: True))
        return run

    return register


def named(name: str) -> Chore:
    """The chore declared as ``name`` (for run_claimed outside the after-response path)."""
    return _chores[name]


def due(now: float | None = None) -> list[Chore]:
    now = time.monotonic() if now is None else now
    if all(c.next_check > now for c in _chores.values()):
        return []  # the common case, without touching the app's config
    config = current_app.config
    ready = []
    for c in _chores.values():
        if c.next_check > now:
            continue
        if c.enabled(config):
            ready.append(c)
        else:  # look again later, so that the common case stays the fast one
            c.next_check = now + c.interval(config)
    return ready


def run_due() -> None:
    """Claim and run every due chore (in an app context, after the response)."""
    now = time.monotonic()
    for current in due(now):
        current.next_check = now + current.interval(current_app.config)
        run_claimed(current)


def run_claimed(current: Chore) -> bool:
    """Run ``current`` if this process wins its claim; True when it ran."""
    conn = None
    try:
        # Inside the try: no connection (the database away, frozen, or the pool
        # busy) is a failed run like any other, a warning and not a traceback.
        conn = db.get_pool().getconn()
        config = current_app.config
        # The claim commits on its own (autocommit), so the claim row is not
        # held while the chore runs: other processes find it taken and move on.
        with conn.cursor() as cur:
            cur.execute(CLAIM, {"name": current.name, "interval_s": current.interval(config)})
            if cur.fetchone() is None:
                return False
        with conn, conn.cursor() as cur:
            current.run(cur, config)
        return True
    except psycopg2.Error as exc:
        log.warning(
            "chore failed", extra={"fields": {"chore": current.name, "error": type(exc).__name__}}
        )
        return False
    finally:
        if conn is not None:
            # Only a connection psycopg2 found broken is dropped (a statement
            # timeout leaves it usable).
            db.get_pool().putconn(conn, broken=bool(conn.closed))


def init_app(app) -> None:
    def schedule(response):
        if due():
            response.call_on_close(lambda: _start(app))
        return response

    app.after_request(schedule)


def _start(app) -> None:
    # Its own greenlet (a thread outside gevent): the next request on this
    # keep-alive connection does not wait for the chore.
    threading.Thread(target=_run_in_context, args=(app,), daemon=True).start()


def _run_in_context(app) -> None:
    try:
        with app.app_context():
            run_due()
    except Exception:  # a chore must never break the server's handling of the connection
        log.exception("chores failed")
