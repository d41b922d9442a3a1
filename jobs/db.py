"""The database handle of a request, as in Flask's tutorial (flaskr/db.py).

``get_db`` lends the request a connection from the process's pool (pool.py),
``close_db`` gives it back when the app context ends, and ``init-db`` applies
schema.sql. ``init_app`` registers both with the app.

With DATABASE_REPLICA_URL, ``read_on_replica`` runs a read view (a route
declared ``replica=True``) with ``cursor`` lending from a replica's pool
instead (replicas.py says which replica, if any); everything else is on the
primary (DATABASE_URL).
"""

from __future__ import annotations

import contextlib
import os
import threading

import click
import psycopg2
import psycopg2.errors
from flask import current_app, g
from flask.cli import with_appcontext

from jobs import observability, pool, replicas
from jobs.store import jobs as job_store
from jobs.store import session

# Requests on threads (the chores', a threaded server's) may be first at once: one
# makes the pool while the others wait, or a connection could go back to a pool that
# did not lend it.
_making = threading.Lock()


def get_pool() -> pool.ConnectionPool:
    """The process's pool, created on first use: after gunicorn forks, never before."""
    current = current_app.extensions.get("jobs_db_pool")
    if current is None or current.pid != os.getpid():
        with _making:
            current = current_app.extensions.get("jobs_db_pool")
            if current is None or current.pid != os.getpid():
                current = _new_pool(current_app.config, current_app.config["DATABASE_URL"])
                current_app.extensions["jobs_db_pool"] = current
    return current


def get_replicas() -> replicas.ReplicaSet | None:
    """The process's replicas (DATABASE_REPLICA_URL), each with a pool; None when unset."""
    cfg = current_app.config
    if not cfg["DATABASE_REPLICA_URL"]:
        return None
    current = current_app.extensions.get("jobs_db_replicas")
    if current is None or current.pid != os.getpid():
        primary = get_pool()  # before the lock, which it takes too
        with _making:
            current = current_app.extensions.get("jobs_db_replicas")
            if current is None or current.pid != os.getpid():
                current = replicas.ReplicaSet(
                    primary,
                    [_new_pool(cfg, url) for url in cfg["DATABASE_REPLICA_URL"]],
                    max_lag_s=cfg["REPLICA_MAX_LAG_S"],
                    check_s=cfg["REPLICA_CHECK_S"],
                )
                current_app.extensions["jobs_db_replicas"] = current
    return current


def _new_pool(cfg, url: str) -> pool.ConnectionPool:
    return pool.ConnectionPool(
        url,
        max_size=cfg["DB_POOL_SIZE"],
        wait_timeout=cfg["DB_POOL_TIMEOUT_S"],
        statement_timeout_ms=cfg["STATEMENT_TIMEOUT_MS"],
        **connect_options(cfg),
    )


def connect_options(cfg) -> dict:
    return {
        "connect_timeout": cfg["DB_CONNECT_TIMEOUT_S"],
        "application_name": "jobs-service",
        # No startup `options`: PgBouncer refuses them. The statement timeout
        # (and, directly, plan_cache_mode) is set by pool.Connection.configure.
        # A peer that vanishes (no RST) must fail requests in seconds, not minutes.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": int(cfg["STATEMENT_TIMEOUT_MS"]) + 5000,
    }


def get_db():
    """The request's connection to the primary (autocommit: each statement is its own
    transaction)."""
    if "db" not in g:
        g.db = get_pool().getconn()
    return g.db


def close_db(exc=None) -> None:
    _give_back_replica(broken=exc is not None)
    conn = g.pop("db", None)
    if conn is not None:
        get_pool().putconn(conn, broken=isinstance(exc, psycopg2.InterfaceError))


def _connection():
    """The primary's connection, or inside ``read_on_replica`` the replica's."""
    replica = g.get("db_replica")
    if replica is None:
        return get_db()
    if "db_replica_conn" not in g:
        g.db_replica_conn = replica.pool.getconn()
    return g.db_replica_conn


def _give_back_replica(broken: bool) -> None:
    replica = g.pop("db_replica", None)
    conn = g.pop("db_replica_conn", None)
    if conn is not None:
        replica.pool.putconn(conn, broken=broken)


def read_on_replica(run):
    """``run()`` (a read view) on a fresh enough replica if there is one, else on the primary.

    A database error on the replica runs it once more on the primary (a read
    changes nothing, so running it twice is safe), unless it was the statement
    timeout: the read's time is spent, and the primary would be as slow.
    """
    replica_set = get_replicas()
    if replica_set is None:
        observability.count_read("primary")
        return run()
    replica, reason = replica_set.pick()
    if replica is not None:
        g.db_replica = replica
        failure = None
        try:
            return run()  # an answer, or an ApiError (a 404 is the replica's answer too)
        except (psycopg2.Error, pool.PoolExhausted) as exc:
            if isinstance(exc, psycopg2.errors.QueryCanceled):
                raise
            failure = exc
        finally:
            _give_back_replica(broken=failure is not None)
            if failure is None:
                observability.count_read("replica")
        replica_set.failed(replica, failure)
        reason = "down"
    observability.count_fallback(reason)
    observability.count_read("primary")
    return run()


def cursor():
    """A cursor on the request's connection, for one statement."""
    return _connection().cursor()


def release() -> None:
    """Give the request's connection back now: it is about to wait (waiting.py) and
    holds none meanwhile; the next ``cursor()`` borrows one again."""
    close_db()


@contextlib.contextmanager
def borrowed_cursor(connections: pool.ConnectionPool):
    """A cursor on a connection borrowed for the block, outside any request's app
    context (a follow stream between its events)."""
    conn = connections.getconn()
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        # Only a connection psycopg2 found broken is dropped (as chores do).
        connections.putconn(conn, broken=bool(conn.closed))


@contextlib.contextmanager
def transaction(timeout_ms: int | None = None):
    """A cursor in one transaction, committed when the block ends without error.

    ``timeout_ms`` replaces the statement timeout for this transaction only
    (bulk work that may take longer than a request's usual budget).
    """
    conn = _connection()
    with conn, conn.cursor() as cur:
        if timeout_ms is None:
            yield cur
        else:
            with conn.time_limit(cur, timeout_ms):
                yield cur


def apply_schema(database_url: str, connect_timeout: int) -> None:
    """Create missing tables and indexes. Idempotent; never drops anything."""
    with current_app.open_resource("schema.sql") as f:
        schema = f.read().decode()
    conn = psycopg2.connect(database_url, connect_timeout=connect_timeout)
    try:
        with conn, conn.cursor() as cur:
            session.lock_for_init_db(cur)  # one deploying replica at a time
            cur.execute(schema)
        rerender_jobs(conn)
    finally:
        conn.close()


# Jobs per transaction when rendering existing jobs again: a batch holds its
# rows' locks while it runs, so the version still serving during a deploy
# waits at most that long to write one of them. 5,000 took ~1 s each on the
# 2-core box under a load of ~10 (1M jobs in 197 s, BENCHMARKS.md "Upgrading
# a live database"); 1,000 keep that wait near 0.2 s.
RERENDER_BATCH = 1000


def rerender_jobs(conn) -> None:
    """Render existing jobs' JSON again when schema.sql asked for it, batch by batch, once."""
    with conn, conn.cursor() as cur:
        if not job_store.upgrade_pending(cur, job_store.RENDER_UPGRADE):
            return
    after = 0
    while True:
        with conn, conn.cursor() as cur:
            last = job_store.rerender_batch(cur, after, RERENDER_BATCH)
        if last is None:
            break
        after = last
    with conn, conn.cursor() as cur:
        job_store.upgrade_done(cur, job_store.RENDER_UPGRADE)


@click.command("init-db")
@with_appcontext
def init_db_command():
    """Create missing tables and indexes. Idempotent; never drops anything."""
    cfg = current_app.config
    apply_schema(cfg["DATABASE_URL"], cfg["DB_CONNECT_TIMEOUT_S"])
    click.echo("Initialized the database.")


def init_app(app) -> None:
    app.teardown_appcontext(close_db)
    app.cli.add_command(init_db_command)
