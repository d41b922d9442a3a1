"""Fixtures in the style of Flask's tutorial: app, client, runner.

The database is real PostgreSQL: DATABASE_URL when it is set, otherwise a
throwaway server started here for the session and removed afterwards.
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
from devdb import LocalPostgres  # noqa: E402

TABLES = "jobs, job_events, job_tables, job_files"


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
def database_url(pg_factory):
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    return pg_factory().url


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
