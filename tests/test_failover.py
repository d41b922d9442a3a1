"""Losing the primary (docs/API.md, Production topology, Failover).

A primary and a synchronous hot standby on this box (tests/support/replication.py).
The service, under gunicorn, has both in its DATABASE_URL
(target_session_attrs=read-write): the primary is killed under a stream of
writes and the standby promoted. Writes come back within 10 s of the
promotion without a restart, every answer in between is the route's JSON
error within the usual bounds, /readyz goes 503 and back, and no write that
was acknowledged is missing afterwards.

And a server that starts refusing writes behind the same name (a demoted
primary): the connection that met the refusal is closed, never pooled again,
and later requests reconnect.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from app import create_app
from dev.gunicorn import Server, wait_for_workers, worker_pids

from support.databases import query_rows
from support.replication import primary_and_standby
from support.service import assert_error, route_plan, seed_two_jobs
from support.waiting import until

# Under pytest-xdist, on one worker: its primary and standby are the module's.
pytestmark = pytest.mark.xdist_group("failover")

STATEMENT_TIMEOUT_MS = 1000
# The usual bound on any answer while the database is away: the statement
# timeout plus a few seconds (docs/API.md, Database failures).
SLOW_S = STATEMENT_TIMEOUT_MS / 1000 + 3
WRITERS = 3
DATABASE_ERROR = "database error; the request was not completed"


@pytest.fixture(scope="module")
def pair():
    with primary_and_standby(synchronous=True) as pair:
        yield pair


def test_a_connection_refused_a_write_is_dropped_and_later_requests_reconnect(pair):
    primary = pair.primary
    app = create_app({"TESTING": True, "DATABASE_URL": primary.url})
    pool = None
    client = app.test_client()
    try:
        assert client.post("/jobs", json={"node_id": "ro-1"}).status_code == 201
        pool = app.extensions["jobs_db_pool"]
        (pooled,) = pool._idle
        before = pooled.info.backend_pid

        primary.sql("ALTER SYSTEM SET default_transaction_read_only = on")
        primary.sql("SELECT pg_reload_conf()")
        # Each backend rereads the configuration at its next statement once
        # signalled; the postmaster's signal takes a moment.
        response = until(
            lambda: (r := client.post("/jobs", json={"node_id": "ro-2"})).status_code == 500 and r,
            what="a write refused",
        )
        assert_error(response, 500, "CREATE_JOB_ERROR")
        # The connection that was refused is closed, not given back to the pool.
        assert pooled.closed
        assert pool._idle == []
        alive = {pid for (pid,) in query_rows(primary.url, "SELECT pid FROM pg_stat_activity")}
        assert before not in alive
        # Each later request takes a new connection; reads still work on it.
        assert client.get("/jobs/1").status_code == 200
        assert_error(client.put("/jobs/1/stop"), 500, "STOP_JOB_ERROR")
        assert pool._idle == []

        primary.sql("ALTER SYSTEM RESET default_transaction_read_only")
        primary.sql("SELECT pg_reload_conf()")
        until(
            lambda: client.post("/jobs", json={"node_id": "ro-3"}).status_code == 201,
            what="writes back",
        )
        assert client.put("/jobs/1/stop").status_code == 200
        (pooled,) = pool._idle
        assert pooled.info.backend_pid != before
    finally:
        primary.sql("ALTER SYSTEM RESET default_transaction_read_only")
        primary.sql("SELECT pg_reload_conf()")
        if pool is not None:
            pool.drop_idle()


class Stream:
    """Threads sending requests until stopped, recording (sent at, method, path, status,
    body, seconds) for every answer."""

    def __init__(self, call):
        self.call = call
        self.records: list[tuple] = []
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.keys = itertools.count()
        self.lock = threading.Lock()

    def run(self, target) -> None:
        thread = threading.Thread(target=self._loop, args=(target,), daemon=True)
        self.threads.append(thread)
        thread.start()

    def _loop(self, target) -> None:
        while not self.stopping.is_set():
            for method, path, body in target():
                started = time.monotonic()
                status, answer = self.call(method, path, body)
                with self.lock:
                    self.records.append(
                        (started, method, path, body, status, answer, time.monotonic() - started)
                    )

    def stop(self) -> list[tuple]:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self.threads), "a request hung"
        return sorted(self.records)


def test_failover_under_writes(pair):
    server = Server(
        pair.failover_url,
        workers=2,
        env={"STATEMENT_TIMEOUT_MS": str(STATEMENT_TIMEOUT_MS), "DB_CONNECT_TIMEOUT_S": "2"},
    ).start()
    try:
        workers = wait_for_workers(server.process.pid, 2)
        call = server.caller(timeout=30)
        a, b = seed_two_jobs(call)
        # The plan's worker exists before the kill: a plan whose PUT failed in the
        # outage and whose GET came after the promotion would otherwise meet a 404.
        assert call("PUT", "/workers/plan-w")[0] == 200
        stream = Stream(call)
        keys = itertools.count()

        def write():
            key = f"failover-{next(keys)}"
            return [("POST", "/jobs", {"node_id": "w", "idempotency_key": key})]

        def every_route():
            return [(method, path, body) for method, path, body, _, _ in route_plan(a, b)]

        for _ in range(WRITERS):
            stream.run(write)
        stream.run(every_route)
        stream.run(lambda: [("GET", "/readyz", None)])
        time.sleep(0.5)
        pair.primary.kill()
        killed_at = time.monotonic()  # dead: from now on no write can succeed until...
        time.sleep(1.0)
        promoted_at = time.monotonic()  # ...the promotion, asked now
        pair.standby.promote()
        until(
            lambda: any(
                r[0] > killed_at and r[2] == "/jobs" and r[4] == 201 for r in stream.records
            ),
            timeout=15,
            what="a write after the promotion",
        )
        time.sleep(0.5)
        records = stream.stop()

        # Every answer came within the usual bounds, and was a success or the
        # route's JSON error.
        plan = {(m, p): (up, code) for m, p, _, up, code in route_plan(a, b)}
        for _, method, path, _, status, answer, seconds in records:
            assert seconds < SLOW_S, (method, path, status, seconds)
            if path == "/readyz":
                assert (status, answer["status"]) in ((200, "ok"), (503, "unavailable")), answer
                continue
            up, code = plan[(method, path)]
            if status != up:
                assert status == 500, (method, path, status, answer)
                assert answer == {"error_code": code, "error_message": DATABASE_ERROR}, answer

        # Writes failed between the kill and the promotion and resumed within
        # 10 s of the promotion, without a restart.
        writes = [r for r in records if r[2] == "/jobs" and "idempotency_key" in (r[3] or {})]
        assert any(killed_at < r[0] < promoted_at and r[4] == 500 for r in writes)
        first = min(r[0] + r[6] for r in writes if r[0] > killed_at and r[4] == 201)
        assert 0 < first - promoted_at < 10, first - promoted_at
        assert writes[-1][4] == 201
        # /readyz: ok, then 503 while nothing accepts writes, then ok again (each
        # worker keeps its readiness for a second).
        ready = [(r[0], r[4]) for r in records if r[2] == "/readyz"]
        assert ready[0][1] == 200
        assert any(killed_at < t < promoted_at and s == 503 for t, s in ready)
        until(lambda: call("GET", "/readyz")[0] == 200, timeout=10, what="ready again")
        assert time.monotonic() - promoted_at < 10
        # No acknowledged write is missing from the new primary.
        acknowledged = {r[5]["id"] for r in writes if r[4] == 201}
        stored = {i for (i,) in query_rows(pair.standby.url, "SELECT id FROM jobs")}
        assert len(acknowledged) > 10
        assert acknowledged <= stored, sorted(acknowledged - stored)
        # Every route answers as before, in both workers (several rounds).
        for _ in range(4):
            for method, path, body, expected, _ in route_plan(a, b):
                status, answer = call(method, path, body)
                assert status == expected, (method, path, status, answer)
        assert call("GET", "/readyz") == (200, {"status": "ok"})
        # Without a restart: the same gunicorn workers throughout.
        assert worker_pids(server.process.pid) == workers
        log = server.log()
        assert "Traceback" not in log and "WORKER TIMEOUT" not in log, log
    finally:
        server.stop()
        server.cleanup()
