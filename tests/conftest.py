"""Fixtures in the style of Flask's tutorial: app, client, runner.

The database is real PostgreSQL: DATABASE_URL when it is set, otherwise a
throwaway server started here for the session and removed afterwards.

JOBS_TEST_DATABASE_VIA=pgbouncer-transaction (or pgbouncer-session) puts a
stock PgBouncer in that pool mode between every test's app and that database
(``database_url``); `make test` runs the API and race tests that way too.
``postgres_url`` is always the database itself.
"""

import os
import sys
import tempfile
from pathlib import Path

import psycopg2
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import create_app  # noqa: E402
from dev import pgbouncer as devpgbouncer  # noqa: E402
from dev.pgbouncer import LocalPgBouncer  # noqa: E402
from dev.postgres import LocalPostgres  # noqa: E402

TABLES = "jobs, job_events, job_tables, job_files, job_chain, workers"


@pytest.fixture(scope="session")
def pg_factory():
    """Make extra throwaway PostgreSQL servers (tests of outages stop and start them)."""
    servers = []

    def make():
        server = LocalPostgres(tempfile.mkdtemp(prefix="jobs-test-pg-"), durable=False)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.destroy()


@pytest.fixture(scope="session")
def postgres_url(pg_factory):
    """The session's PostgreSQL, reached directly."""
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    return pg_factory().url


VIA_POOL_MODES = {
    "direct": None,
    "pgbouncer-transaction": "transaction",
    "pgbouncer-session": "session",
}


@pytest.fixture(scope="session")
def database_url(postgres_url, pgbouncer_factory):
    """What the apps under test connect to: see JOBS_TEST_DATABASE_VIA above."""
    via = os.environ.get("JOBS_TEST_DATABASE_VIA") or "direct"
    if via not in VIA_POOL_MODES:
        raise pytest.UsageError(f"JOBS_TEST_DATABASE_VIA must be one of {sorted(VIA_POOL_MODES)}")
    pool_mode = VIA_POOL_MODES[via]
    return postgres_url if pool_mode is None else pgbouncer_factory(postgres_url, pool_mode).url


@pytest.fixture(scope="session")
def _schema(database_url):
    app = create_app({"TESTING": True, "DATABASE_URL": database_url})
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
    return database_url


def truncate_all(database_url):
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    finally:
        conn.close()


@pytest.fixture
def app(_schema):
    truncate_all(_schema)
    app = create_app({"TESTING": True, "DATABASE_URL": _schema})
    yield app
    pool = app.extensions.get("jobs_db_pool")
    if pool is not None:
        pool.drop_idle()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def db_conn(_schema):
    """A plain connection for looking at (or locking) the database from outside the app."""
    conn = psycopg2.connect(_schema)
    conn.autocommit = True
    yield conn
    conn.close()


# ---- PgBouncer in front of the session's PostgreSQL ----------------------------


def require_pgbouncer() -> None:
    """Skip (fail under CI=true) when Debian's pgbouncer is not installed."""
    if devpgbouncer.available():
        return
    reason = (
        f"PgBouncer is not installed ({devpgbouncer.BINARY}): `make test` installs it "
        "as root (apt-get install pgbouncer); the tests through PgBouncer did not run"
    )
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pgbouncer_factory():
    """Start PgBouncers (stock settings, a pool mode each) in front of a PostgreSQL URL."""
    bouncers = []

    def make(upstream_url: str, pool_mode: str = "transaction") -> LocalPgBouncer:
        require_pgbouncer()
        workdir = tempfile.mkdtemp(prefix=f"jobs-test-pgbouncer-{pool_mode}-")
        bouncer = LocalPgBouncer(upstream_url, workdir, pool_mode)
        bouncers.append(bouncer)
        bouncer.start()
        return bouncer

    yield make
    for bouncer in bouncers:
        bouncer.destroy()
