"""/readyz: whether this process can serve, checked cheaply enough to be flooded.

/readyz is open (no token) and load balancers call it often: a check that
opened a database connection per probe let 150 keep-alive clients looping on
it exhaust PostgreSQL's max_connections ("too many clients", and 13% of the
probes answered 503). So, per process:

- one check at a time: a probe that arrives while a check runs waits for that
  check's result (under gevent the others wait on an event, one greenlet
  checks), so readiness never holds more than one database connection;
- a result is reused for ``TTL_S`` (a second) after its check ended: however
  many probes arrive, the database sees at most one connection per second per
  process;
- the check is bounded: READY_TIMEOUT_S (1 s) for connect and query together,
  and a waiting probe gives up after ``WAIT_S``; so every probe is answered
  within about 2 s, whatever the database does.

Not ready (503) when the service could not actually serve: its settings are not
allowed (settings.problems: only reachable by changing a running app's config,
since a bad value stops the start-up), the database does not answer, or it
lacks a table or column the service uses (store/readiness.py, in the same
round trip as the SELECT).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import psycopg2

from jobs import pool, settings
from jobs.store import readiness as readiness_store

log = logging.getLogger("jobs")

READY = b'{"status":"ok"}'


@dataclass(frozen=True)
class Outcome:
    ready: bool
    error_code: str | None = None
    error_message: str | None = None

    def body(self) -> dict | bytes:
        if self.ready:
            return READY
        return {
            "status": "unavailable",
            "error_code": self.error_code,
            "error_message": self.error_message,
        }


class _Check:
    """One check in flight: the probes that arrive meanwhile wait for its outcome."""

    def __init__(self):
        self.done = threading.Event()
        self.outcome: Outcome | None = None


class Readiness:
    """A process's readiness, checked by at most one probe at a time and kept ``TTL_S``."""

    TTL_S = 1.0
    # A probe waiting for another's check: the check ends within READY_TIMEOUT_S
    # (plus scheduling); this only bounds the wait if something went wrong.
    WAIT_S = 1.5

    def __init__(self):
        # Made in the worker after gevent patched threading: greenlet-aware.
        self._lock = threading.Lock()  # guards the fields below; never held across I/O
        self._last: Outcome | None = None
        self._expires = 0.0
        self._running: _Check | None = None
        self._db: pool.KeptConnection | None = None  # used by one check at a time
        self.checks = 0  # how many checks ran (tests)

    def outcome(self, config) -> Outcome:
        with self._lock:
            if self._last is not None and time.monotonic() < self._expires:
                return self._last
            running = self._running
            leader = running is None
            if leader:
                running = self._running = _Check()
        if not leader:
            if running.done.wait(self.WAIT_S) and running.outcome is not None:
                return running.outcome
            return Outcome(
                False, "DATABASE_UNAVAILABLE", "the readiness check did not finish in time"
            )
        outcome = Outcome(False, "INTERNAL_ERROR", "the readiness check failed")
        try:
            outcome = self._check(config)
        except Exception:
            log.exception("readiness check failed")
        finally:
            with self._lock:
                self.checks += 1
                self._last = outcome
                self._expires = time.monotonic() + self.TTL_S
                self._running = None
            running.outcome = outcome
            running.done.set()
        return outcome

    def _check(self, config) -> Outcome:
        bad = settings.problems(config)
        if bad:
            log.warning("readiness: settings not allowed", extra={"fields": {"problems": bad}})
            return Outcome(
                False,
                "SETTINGS_INVALID",
                "settings out of range: " + ", ".join(p.split(":", 1)[0] for p in bad),
            )
        if self._db is None or self._db.dsn != config["DATABASE_URL"]:
            if self._db is not None:
                self._db.close()
            self._db = pool.KeptConnection(config["DATABASE_URL"], application_name="jobs-readyz")
        try:
            ((missing,),) = self._db.query(
                config["READY_TIMEOUT_S"],
                readiness_store.MISSING_COLUMNS,
                readiness_store.MISSING_COLUMNS_PARAMS,
            )
        except psycopg2.Error as exc:
            log.warning("readiness check failed", extra={"fields": {"error": type(exc).__name__}})
            return Outcome(
                False, "DATABASE_UNAVAILABLE", "the database did not answer SELECT 1 in time"
            )
        if missing:
            log.warning("readiness: schema incomplete", extra={"fields": {"missing": missing}})
            return Outcome(
                False,
                "SCHEMA_MISSING",
                "the database lacks tables or columns the service uses: "
                "run `flask --app app init-db`",
            )
        return Outcome(True)
