"""Housekeeping the service does by itself, between requests: no extra process.

A chore (expiring the leases of lost workers, pruning old history) is a
function of a database cursor. The factory registers an app's chores
explicitly (``init_app``); their timers live on the app. Each process runs a
due chore after a response has been sent (Werkzeug's ``call_on_close``), so
the request that carried it pays nothing and the chore runs as long as the
service gets any traffic. A claim row in ``service_chores`` (store/chores.py)
makes each chore run at most once per interval across every replica and
process. A chore must be bounded (small batches) and must not mind being
skipped: a failure is logged and the next interval tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg2

from jobs import db
from jobs.pool import PoolExhausted
from jobs.store import chores as chore_store

log = logging.getLogger("jobs")


def always(config) -> bool:
    return True


@dataclass
class Chore:
    name: str
    interval_s: float | Callable  # seconds, or interval_s(config) -> seconds
    run: Callable  # run(cursor, config) -> None, inside one transaction
    enabled: Callable = always
    next_check: float = 0.0  # this process's monotonic time of its next look

    def interval(self, config) -> float:
        return self.interval_s(config) if callable(self.interval_s) else self.interval_s


class Chores:
    """One app's chores and their timers."""

    def __init__(self, app, chores: list[Chore]):
        self.app = app
        self.by_name = {c.name: c for c in chores}

    def named(self, name: str) -> Chore:
        return self.by_name[name]

    def due(self, now: float | None = None) -> list[Chore]:
        now = time.monotonic() if now is None else now
        if all(c.next_check > now for c in self.by_name.values()):
            return []  # the common case, without touching the app's config
        config = self.app.config
        ready = []
        for c in self.by_name.values():
            if c.next_check > now:
                continue
            if c.enabled(config):
                ready.append(c)
            else:  # look again later, so that the common case stays the fast one
                c.next_check = now + c.interval(config)
        return ready

    def run_due(self) -> None:
        """Claim and run every due chore (in an app context, after the response)."""
        now = time.monotonic()
        for current in self.due(now):
            current.next_check = now + current.interval(self.app.config)
            self.run_claimed(current)

    def run_claimed(self, current: Chore) -> bool:
        """Run ``current`` if this process wins its claim; True when it ran."""
        conn = None
        pool = db.get_pool()
        try:
            # Inside the try: no connection (the database away, frozen, or the pool
            # busy) is a failed run like any other, a warning and not a traceback.
            conn = pool.getconn()
            config = self.app.config
            # The claim commits on its own (autocommit), so the claim row is not
            # held while the chore runs: other processes find it taken and move on.
            with conn.cursor() as cur:
                if not chore_store.claim(cur, current.name, current.interval(config)):
                    return False
            with conn, conn.cursor() as cur:
                current.run(cur, config)
            return True
        except (psycopg2.Error, PoolExhausted) as exc:
            log.warning(
                "chore failed",
                extra={"fields": {"chore": current.name, "error": type(exc).__name__}},
            )
            return False
        finally:
            if conn is not None:
                # Only a connection psycopg2 found broken is dropped (a statement
                # timeout leaves it usable).
                pool.putconn(conn, broken=bool(conn.closed))


def of(app) -> Chores:
    return app.extensions["jobs_chores"]


def init_app(app, *chores: Chore) -> None:
    """Run ``chores`` for ``app`` after its responses."""
    registry = app.extensions["jobs_chores"] = Chores(app, list(chores))

    def schedule(response):
        if registry.due():
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
            of(app).run_due()
    except Exception:  # a chore must never break the server's handling of the connection
        log.exception("chores failed")
