"""The service behind PgBouncer (transaction and session pooling) and directly.

A stock PgBouncer (Debian's, stock settings: see dev/pgbouncer.py) sits
between the app and the session's PostgreSQL. Each test runs once per way in:
``direct``, ``session``, ``transaction``. What is checked: every route and
init-db work; many concurrent requests over few server connections do too
(session state such as prepared statements would leak between clients in
transaction mode); STATEMENT_TIMEOUT_MS and the bulk-delete budget are
enforced by the server in every mode; and nothing the service sets outlives
its own transaction on a server connection that PgBouncer shares.

`make test` also runs the API and race suites through PgBouncer in
transaction mode (JOBS_TEST_DATABASE_VIA, see conftest.py).
"""

from __future__ import annotations

import logging
import threading

import psycopg2
import psycopg2.errors
import pytest

from jobs import db

from support.databases import table_locked
from support.service import flask_caller, route_plan, seed_two_jobs

# Under pytest-xdist, on one worker: its PgBouncers are the module's.
pytestmark = pytest.mark.xdist_group("pgbouncer")

MODES = ["direct", "session", "transaction"]


@pytest.fixture(scope="module", params=MODES)
def via(request, postgres_url, _schema, pgbouncer_factory):
    """(mode, URL the app connects to): PostgreSQL itself or a PgBouncer in front of it."""
    if request.param == "direct":
        return request.param, postgres_url
    return request.param, pgbouncer_factory(postgres_url, request.param).url


@pytest.fixture
def app_via(via, apps):
    """``app_via(**config)``: apps on ``via``'s URL, on an emptied database (conftest's
    ``apps``: their pools are closed afterwards)."""
    return lambda **config: apps(DATABASE_URL=via[1], **config)


def check_every_route(call, a, b):
    for method, path, body, expected, _ in route_plan(a, b):
        status, parsed = call(method, path, body)
        assert status == expected, (method, path, status, parsed)
    assert call("GET", "/readyz") == (200, {"status": "ok"})


def test_init_db_is_idempotent_through_every_mode(app_via):
    runner = app_via().test_cli_runner()
    for _ in range(2):
        result = runner.invoke(args=["init-db"])
        assert result.exit_code == 0, result.output


def test_every_route(app_via):
    call = flask_caller(app_via())
    a, b = seed_two_jobs(call)
    for _ in range(3):  # the hot reads are prepared on first use where allowed
        check_every_route(call, a, b)
    assert call("GET", f"/jobs/{a}")[1]["status"] == "STOP_REQUESTED"
    assert call("GET", f"/jobs/{b}")[1]["status"] == "RUNNING"


def test_many_concurrent_requests(via, app_via):
    """In transaction mode PgBouncer's stock pool (20 server connections) serves 40 clients.

    In session mode each client connection holds its server connection until
    it closes, and the service's pools keep theirs open: the sum of
    DB_POOL_SIZE over all processes must stay within PgBouncer's pool size.
    """
    threads_count = 16 if via[0] == "session" else 40
    app = app_via(DB_POOL_SIZE=threads_count)
    a, b = seed_two_jobs(flask_caller(app))
    barrier = threading.Barrier(threads_count)
    failures = []

    def run(i):
        call = flask_caller(app)
        barrier.wait()
        for _ in range(5):
            for path in (f"/jobs/{a}", "/jobs?status=all", f"/jobs/{b}/progress"):
                status, parsed = call("GET", path)
                if status != 200:
                    failures.append((i, path, status, parsed))
            status, parsed = call("POST", "/jobs", {"node_id": f"many-{i}"})
            if status != 201:
                failures.append((i, "POST /jobs", status, parsed))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures[:5]
    listed = flask_caller(app)("GET", "/jobs?status=all&limit=500")[1]["jobs"]
    assert len(listed) == 2 + threads_count * 5


def test_nothing_outlives_the_services_transactions(via, app_via):
    """Through PgBouncer the server connections are shared: no session settings, no PREPARE."""
    mode, url = via
    call = flask_caller(app_via(STATEMENT_TIMEOUT_MS=1234))
    a, b = seed_two_jobs(call)
    check_every_route(call, a, b)
    if mode == "direct":
        return
    # A plain client of the same PgBouncer lands on the server connections the
    # app just used: they carry none of its settings or statements.
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone() == ("0",)
            cur.execute("SHOW plan_cache_mode")
            assert cur.fetchone() == ("auto",)
            cur.execute("SELECT count(*) FROM pg_prepared_statements")
            assert cur.fetchone() == (0,)
    finally:
        conn.close()


# ---- Time limits: the server's statement_timeout in every mode -----------------------


def test_statement_timeout_bounds_every_route(app_via, postgres_url, caplog):
    """Blocked by a lock, every route fails with the server's QueryCanceled: its own timeout."""
    app = app_via(STATEMENT_TIMEOUT_MS=150, BULK_DELETE_BUDGET_MS=400)
    call = flask_caller(app)
    a, b = seed_two_jobs(call)
    with (
        table_locked(postgres_url, "jobs", "workers"),
        caplog.at_level(logging.ERROR, logger="jobs"),
    ):
        for method, path, body, _, code in route_plan(a, b):
            caplog.clear()
            status, parsed = call(method, path, body)
            assert (status, parsed["error_code"]) == (500, code), (method, path, parsed)
            errors = [r.fields["error"] for r in caplog.records if hasattr(r, "fields")]
            assert errors == ["QueryCanceled"], (method, path, errors)
    check_every_route(call, a, b)


def test_statement_timeout_and_bulk_budget_bound_queries(app_via):
    """Measured on the app's own connection: each query, and a bulk transaction's, in any mode."""
    app = app_via(STATEMENT_TIMEOUT_MS=200, BULK_DELETE_BUDGET_MS=1000)

    def fetch(sql):
        with db.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()

    with app.app_context():
        for _ in range(2):  # once on a new connection, once on the pooled one
            with pytest.raises(psycopg2.errors.QueryCanceled):
                fetch("SELECT pg_sleep(0.6)")
            assert fetch("SELECT 1") == (1,)
        with db.transaction(1000) as cur:
            cur.execute("SELECT pg_sleep(0.5)")  # beyond the statement timeout, within the budget
            cur.execute("SELECT pg_sleep(0.5)")  # each statement has the whole budget
        with pytest.raises(psycopg2.errors.QueryCanceled), db.transaction(1000) as cur:
            cur.execute("SELECT pg_sleep(1.6)")
        # A transaction without a limit of its own has the usual one.
        with pytest.raises(psycopg2.errors.QueryCanceled), db.transaction() as cur:
            cur.execute("SELECT pg_sleep(0.6)")
        # And the budget ended with its transaction.
        with pytest.raises(psycopg2.errors.QueryCanceled):
            fetch("SELECT pg_sleep(0.6)")
        assert fetch("SELECT 1") == (1,)
