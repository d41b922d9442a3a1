"""A job's follow stream: GET /jobs/{id}/events?follow=true as text/event-stream.

Every event so far, then each new one as it commits (``id:`` the event id,
``event:`` its event_type, ``data:`` its JSON as in the list), a comment at
least every FOLLOW_KEEPALIVE_S while nothing happens, until the job has said
its last word: it is terminal and no automatic retry is pending (the job's
row says so in the same snapshot as the events, store/jobs.EVENTS_PAGE), it
is deleted, the stream has lasted FOLLOW_MAX_S, or the process shuts down.
A client resumes with ``Last-Event-ID``.

Between its events the stream holds no database connection: each look
borrows one from the pool for one statement. Its waiter (waiting.py) is
registered by the view before the first look and released by ``close``,
which the server calls however the response ends (a client gone included).
"""

from __future__ import annotations

import logging
import time

import psycopg2

from jobs import db, pool, waiting
from jobs.domain import MAX_EVENTS_PAGE
from jobs.store import jobs as job_store
from jobs.store.outcomes import NotFound

log = logging.getLogger("jobs")

HEADERS = {
    "Cache-Control": "no-store",
    # nginx and friends: pass each event on as it comes.
    "X-Accel-Buffering": "no",
}


def event_frame(event_id: int, event_type: str, event_json: str) -> bytes:
    """One event as the event-stream format spells it (a line per line of data)."""
    kind = " ".join(event_type.splitlines())
    data = "".join(f"data: {line}\n" for line in event_json.splitlines() or [""])
    return f"id: {event_id}\nevent: {kind}\n{data}\n".encode()


class EventStream:
    """The response body: an iterable of frames, with a ``close`` the server always calls."""

    def __init__(
        self,
        job_id: int,
        first: job_store.EventsPage,
        after: int,
        hub: waiting.Hub,
        waiter: waiting.Waiter,
        connections: pool.ConnectionPool,
        config,
    ):
        self.job_id, self.first, self.after = job_id, first, after
        self.hub, self.waiter, self.connections = hub, waiter, connections
        self.keepalive_s = config["FOLLOW_KEEPALIVE_S"]
        self.max_s = config["FOLLOW_MAX_S"]
        self._frames = self._run()

    def __iter__(self):
        return self._frames

    def close(self) -> None:
        self._frames.close()
        self.hub.unregister(self.waiter)

    def _look(self) -> job_store.EventsPage | NotFound:
        with db.borrowed_cursor(self.connections) as cur:
            return job_store.events_page(cur, self.job_id, self.after, MAX_EVENTS_PAGE)

    def _run(self):
        # A first line at once: headers and a sign of life reach the client now.
        yield f": events of job {self.job_id}\n\n".encode()
        page = self.first
        ends_at = time.monotonic() + self.max_s
        while True:
            for event_id, event_type, event_json in page.events:
                yield event_frame(event_id, event_type, event_json)
            if page.last_id is not None:
                self.after = page.last_id
            if not page.more:
                if page.ended or self.hub.stopping:
                    return
                remaining = ends_at - time.monotonic()
                if remaining <= 0:
                    return
                if not self.waiter.sleep(min(self.keepalive_s, remaining)):
                    yield b": keep-alive\n\n"
                if self.hub.stopping:
                    return
            try:
                page = self._look()
            except psycopg2.Error as exc:
                # The status is sent: the stream ends, and the client resumes.
                log.warning(
                    "follow stream ended by a database error",
                    extra={"fields": {"job_id": self.job_id, "error": type(exc).__name__}},
                )
                return
            if isinstance(page, NotFound):
                return  # deleted: a reconnection gets its 404
