"""Database outages (docs/API.md, Database failures): every route answers its JSON *_ERROR in
seconds while PostgreSQL is down, /readyz says 503 and /healthz 200; when it
comes back the service recovers by itself, with the same gunicorn workers.
And a query blocked by a lock fails at STATEMENT_TIMEOUT_MS instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psycopg2
import pytest

from app import create_app
from dev.gunicorn import serving, wait_for_workers, worker_pids
from jobs.domain import JOB_ID_RULE

from support.databases import Blackhole, table_locked
from support.service import flask_caller, route_plan, seed_two_jobs

# Under pytest-xdist, on one worker: its PostgreSQL and gunicorn are the module's.
pytestmark = pytest.mark.xdist_group("outage")

SLOW = 3.0  # seconds: "within a few seconds"


OPEN_UP = [("/healthz", 200), ("/readyz", 200), ("/metrics", 200), ("/openapi.json", 200)]
OPEN_DOWN = [("/healthz", 200), ("/readyz", 503), ("/metrics", 200), ("/openapi.json", 200)]


def timed(call, method, path, body=None):
    started = time.monotonic()
    status, parsed = call(method, path, body)
    return status, parsed, time.monotonic() - started


def open_answer(call, path, expected):
    """GET ``path``; /readyz may answer from a result up to a second old (docs/API.md,
    GET /readyz), so a change of the database's state shows there within about two."""
    deadline = time.monotonic() + 2.5
    while True:
        status, parsed, elapsed = timed(call, "GET", path)
        assert elapsed < SLOW, (path, elapsed)
        if status == expected or path != "/readyz" or time.monotonic() > deadline:
            return status, parsed
        time.sleep(0.1)


def check_up(call, a, b, rounds=1):
    for _ in range(rounds):
        for method, path, body, up, _ in route_plan(a, b):
            status, parsed, elapsed = timed(call, method, path, body)
            assert status == up, (method, path, status, parsed)
            assert elapsed < SLOW, (method, path, elapsed)
        for path, up in OPEN_UP:
            status, parsed = open_answer(call, path, up)
            assert status == up, (path, parsed)
    assert call("GET", f"/jobs/{a}")[1]["status"] == "STOP_REQUESTED"
    assert call("GET", f"/jobs/{b}")[1]["status"] == "RUNNING"


def check_down(call, a, b, rounds=1):
    for _ in range(rounds):
        for method, path, body, _, code in route_plan(a, b):
            status, parsed, elapsed = timed(call, method, path, body)
            assert status == 500, (method, path, status, parsed)
            assert parsed == {
                "error_code": code,
                "error_message": "database error; the request was not completed",
            }, (method, path)
            assert elapsed < SLOW, (method, path, elapsed)
        for path, expected in OPEN_DOWN:
            status, parsed = open_answer(call, path, expected)
            assert status == expected, (path, parsed)
        status, parsed = open_answer(call, "/readyz", 503)  # each worker keeps its own
        assert parsed["status"] == "unavailable"
        assert call("GET", "/healthz")[1] == {"status": "ok"}
        # Invalid input is still refused as such.
        assert call("GET", "/jobs/abc") == (
            400,
            {
                "error_code": "INVALID_JOB_ID",
                "error_message": f"job id must be {JOB_ID_RULE}",
            },
        )


@pytest.fixture(scope="module")
def server(pg):
    with serving(pg.url, workers=2, env={"STATEMENT_TIMEOUT_MS": "250"}) as server:
        yield server


def assert_clean_log(server) -> None:
    log = server.log()
    for bad in ("WORKER TIMEOUT", "Traceback", "Worker exiting", "was sent SIGKILL", "Booting"):
        if bad == "Booting":
            # Exactly the two workers of the start, none booted as a replacement.
            assert log.count("Booting worker") == 2, log
        else:
            assert bad not in log, log
    # The detail of each failure is in the log (and only there).
    assert '"msg":"database error"' in log


def test_outage_and_recovery_under_gunicorn(restart_pg, server):
    pg = restart_pg
    call = server.caller(timeout=15)
    master = server.process.pid
    workers = wait_for_workers(master, 2)
    a, b = seed_two_jobs(call)
    # Several rounds, so both workers hold pooled connections.
    check_up(call, a, b, rounds=3)

    pg.stop()
    check_down(call, a, b, rounds=3)

    pg.start()
    # Recovers by itself: the very first requests succeed, in every worker.
    check_up(call, a, b, rounds=3)
    assert worker_pids(master) == workers, "a worker died or was replaced"
    assert server.process.poll() is None
    assert_clean_log(server)

    # And once more: a second outage is survived the same way.
    pg.stop()
    check_down(call, a, b)
    pg.start()
    check_up(call, a, b)
    assert worker_pids(master) == workers


def test_outage_and_recovery_in_process(restart_pg):
    pg = restart_pg
    app = create_app({"TESTING": True, "DATABASE_URL": pg.url, "DB_POOL_SIZE": 4})
    call = flask_caller(app)
    a, b = seed_two_jobs(call)
    check_up(call, a, b, rounds=2)
    pool = app.extensions["jobs_db_pool"]
    assert pool._idle, "the pool keeps connections between requests"
    pg.stop()
    check_down(call, a, b, rounds=2)
    pg.start()
    check_up(call, a, b, rounds=2)
    pool.drop_idle()


def test_a_blackholed_database_never_hangs_a_route():
    """A database that accepts and never answers: each route fails at the connect timeout."""
    hole = Blackhole()
    try:
        app = create_app({"TESTING": True, "DATABASE_URL": hole.url(), "DB_CONNECT_TIMEOUT_S": 2})
        call = flask_caller(app)
        for method, path, body, _, code in route_plan(1, 2)[:1]:
            status, parsed, elapsed = timed(call, method, path, body)
            assert (status, parsed["error_code"]) == (500, code)
            assert elapsed < 5, (method, path, elapsed)
        assert hole.accepted >= 1
    finally:
        hole.close()


# ---- statement_timeout ---------------------------------------------------------


BULK_DELETE_CODES = {"DELETE_JOBS_BY_STATUS_ERROR", "DELETE_JOBS_ERROR"}


def check_blocked(call, a, b, timeout_s: float, only=None, bulk_timeout_s=None):
    """Each route fails at its time limit: the bulk deletes have their own, longer one."""
    for method, path, body, _, code in route_plan(a, b)[:only]:
        status, parsed, elapsed = timed(call, method, path, body)
        assert (status, parsed) == (
            500,
            {"error_code": code, "error_message": "database error; the request was not completed"},
        ), (method, path)
        limit = bulk_timeout_s if code in BULK_DELETE_CODES else timeout_s
        assert limit * 0.8 <= elapsed < limit + 1.5, (method, path, elapsed)
    # Readiness does not touch the jobs table: the database itself is fine.
    assert call("GET", "/readyz")[0] == 200


@pytest.mark.alone  # each route fails between 0.8x and its limit + 1.5 s
def test_statement_timeout_under_gunicorn(server, pg):
    call = server.caller(timeout=15)
    master = server.process.pid
    workers = wait_for_workers(master, 2)
    a, b = seed_two_jobs(call)
    check_up(call, a, b)
    with table_locked(pg.url):
        check_blocked(call, a, b, timeout_s=0.25, only=5)
    check_up(call, a, b, rounds=2)
    assert worker_pids(master) == workers


@pytest.mark.alone  # each route fails between 0.8x and its limit + 1.5 s
def test_statement_timeout_in_process(app):
    url = app.config["DATABASE_URL"]
    timed_app = create_app(
        {
            "TESTING": True,
            "DATABASE_URL": url,
            "STATEMENT_TIMEOUT_MS": 150,
            "BULK_DELETE_BUDGET_MS": 600,
        }
    )
    call = flask_caller(timed_app)
    a, b = seed_two_jobs(call)
    check_up(call, a, b)
    # The worker routes read and write workers; every other route reads jobs.
    for tables in (("jobs", "workers"), ("job_files",)):
        with table_locked(url, *tables) as holder:
            if "jobs" in tables:
                # A bulk delete's statements each get half its budget.
                check_blocked(call, a, b, timeout_s=0.15, bulk_timeout_s=0.3)
            else:
                # Only the file registration writes job_files.
                method, path, body, _, code = route_plan(a, b)[8]
                status, parsed, elapsed = timed(call, method, path, body)
                assert (status, parsed["error_code"]) == (500, code)
                assert elapsed < 1.8
                assert call("GET", f"/jobs/{a}")[0] == 200
            # The holder still holds its lock: nothing we did released it.
            assert holder.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
        check_up(call, a, b)
    timed_app.extensions["jobs_db_pool"].drop_idle()


@pytest.mark.alone  # answers within 0.5 s once the database is back
def test_no_connection_leaks_after_failures(restart_pg):
    """Failed requests hand their connections back: a pool of 2 never runs dry."""
    pg = restart_pg
    app = create_app(
        {
            "TESTING": True,
            "DATABASE_URL": pg.url,
            "DB_POOL_SIZE": 2,
            "DB_POOL_TIMEOUT_S": 1,
            "STATEMENT_TIMEOUT_MS": 100,
        }
    )
    call = flask_caller(app)
    a, _ = seed_two_jobs(call)
    with table_locked(pg.url):
        for _ in range(4):
            assert call("GET", f"/jobs/{a}")[1]["error_code"] == "GET_JOB_ERROR"
    pg.stop()
    for _ in range(4):
        assert call("GET", f"/jobs/{a}")[1]["error_code"] == "GET_JOB_ERROR"
    pg.start()
    for _ in range(4):
        status, parsed, elapsed = timed(call, "GET", f"/jobs/{a}")
        assert status == 200 and elapsed < 0.5, (status, parsed, elapsed)
    app.extensions["jobs_db_pool"].drop_idle()


# ---- A frozen (not vanished) database ----------------------------------------------


def postgres_pids(pg) -> list[int]:
    postmaster = int((pg.datadir / "postmaster.pid").read_text().split()[0])
    return [postmaster, *sorted(worker_pids(postmaster))]


@contextlib.contextmanager
def frozen(pg):
    """Every process of ``pg`` stopped (SIGSTOP): connections are accepted, nothing answers."""
    pids = postgres_pids(pg)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_a_frozen_database_fails_a_pooled_request_in_seconds(restart_pg):
    pg = restart_pg
    app = create_app({"TESTING": True, "DATABASE_URL": pg.url, "STATEMENT_TIMEOUT_MS": 1000})
    call = flask_caller(app)
    assert call("GET", "/jobs")[0] == 200  # a pooled connection now exists
    answer = {}

    def request():
        answer["it"] = timed(call, "GET", "/jobs")

    thread = threading.Thread(target=request, daemon=True)
    with frozen(pg):
        thread.start()
        thread.join(6)
    thread.join(10)
    status, parsed, elapsed = answer["it"]
    assert (status, parsed["error_code"]) == (500, "LIST_JOBS_ERROR")
    assert elapsed < 1 + 3, f"hung for {elapsed:.1f}s"  # STATEMENT_TIMEOUT_MS + a few s
    assert call("GET", "/jobs")[0] == 200
    app.extensions["jobs_db_pool"].drop_idle()


@pytest.mark.alone  # each of 18 requests answers within STATEMENT_TIMEOUT_MS + 3 s
@pytest.mark.parametrize("via", ["direct", "pgbouncer-transaction"])
def test_a_frozen_database_under_gunicorn(restart_pg, pgbouncer_factory, via):
    """Frozen: every API request answers its *_ERROR in seconds, and no worker dies.

    A pooled connection's query gives up at STATEMENT_TIMEOUT_MS plus a
    second, a new connection at DB_CONNECT_TIMEOUT_S; then the service
    recovers by itself when the database thaws.
    """
    pg = restart_pg
    url = pg.url if via == "direct" else pgbouncer_factory(pg.url, "transaction").url
    timeout_s = 1.0
    plan_size = len(route_plan(0, 0))
    # A pool as large as the plan in each worker: however the requests spread over
    # the workers, none waits for a connection (that would be a 503, not the outage).
    env = {
        "STATEMENT_TIMEOUT_MS": str(int(timeout_s * 1000)),
        "DB_CONNECT_TIMEOUT_S": "2",
        "DB_POOL_SIZE": str(plan_size),
    }
    with serving(url, workers=2, env=env) as server:
        call = server.caller(timeout=30)
        master = server.process.pid
        workers = wait_for_workers(master, 2)
        a, b = seed_two_jobs(call)
        check_up(call, a, b, rounds=2)  # both workers hold pooled connections
        answers = []

        def ask(plan):
            for method, path, body, _, code in plan:
                answers.append((method, path, code, timed(call, method, path, body)))

        plan = route_plan(a, b)
        # A client for each request, all at once: each request's time is its own
        # (no queue behind another request's wait), and the frozen phase lasts
        # one request's wait (it was 9 s with three requests each).
        askers = [threading.Thread(target=ask, args=([step],)) for step in plan]
        with frozen(pg):
            for asker in askers:
                asker.start()
            for asker in askers:
                asker.join(60)
            assert len(answers) == len(plan)
            for method, path, code, (status, parsed, elapsed) in answers:
                assert (status, parsed) == (
                    500,
                    {
                        "error_code": code,
                        "error_message": "database error; the request was not completed",
                    },
                ), (method, path)
                assert elapsed < timeout_s + 3, (method, path, elapsed)
            status, parsed = open_answer(call, "/readyz", 503)
            assert (status, parsed["status"]) == (503, "unavailable")
            status, parsed, elapsed = timed(call, "GET", "/jobs/abc")
            assert (status, parsed["error_code"]) == (400, "INVALID_JOB_ID")
            assert elapsed < SLOW, elapsed
            assert call("GET", "/healthz") == (200, {"status": "ok"})
        # Recovery by itself: through PgBouncer its server connections, stuck
        # in the frozen backends or in logins to them, take a moment to clear
        # after the thaw (PgBouncer's own pool), during which a request may
        # still fail with its *_ERROR; then every route is back.
        deadline = time.monotonic() + 30
        while call("GET", "/jobs?status=all")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        check_up(call, a, b, rounds=2)
        assert worker_pids(master) == workers, "a worker died or was replaced"
        assert_clean_log(server)
