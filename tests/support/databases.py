"""Databases for the tests: emptied, of a test's own, or failing on purpose.

- The session's database: ``TABLES``, ``truncate`` (what the ``app`` fixture
  does before each test), ``kept_connection`` and ``give_back`` (one connection
  per database and purpose for the process: the emptier's, ``db_conn``),
  ``built_once`` (rows a fixture built through the API, copied back instead of
  built again), ``init_db`` (``flask init-db`` in process, on a database of a
  test's own), ``database_of_worker`` (one database per pytest-xdist worker on a
  server given by DATABASE_URL).
- Looking at it from outside the service: ``query`` (one statement, its first
  row), ``query_rows`` (all of them), ``count_job_rows`` (a job's rows in one
  table, on a connection such as ``db_conn``).
- Holding it from outside the service: ``table_locked`` (an ACCESS EXCLUSIVE
  lock), ``lose_worker`` (a registered worker's heartbeat pushed into the past).
- Databases that fail on purpose, on 127.0.0.1: ``closed_database_url``
  (nothing listens: connection refused), ``Refuser`` (accepts and hangs up at
  once, counting the connections, so a test can tell whether the database was
  touched at all) and ``Blackhole`` (accepts and never says a word: to libpq,
  a server that vanished without a RST).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit, urlunsplit

import psycopg2
from psycopg2 import sql

from app import create_app
from dev.gunicorn import free_port

TABLES = "jobs, job_events, job_tables, job_files, job_chain, workers"

# Before almost every test the tables hold a few rows: DELETE empties them in a
# few milliseconds where TRUNCATE (new files for every table and index) takes
# tens, which summed to a sixth of the suite's time. A test that filled them
# (100,000 rows) gets TRUNCATE, which leaves no dead rows for the next tests to
# wade through. Either way the identities restart at 1, as RESTART IDENTITY does.
EMPTY_TABLES = f"""
DO $$
BEGIN
    IF (SELECT count(*) FROM (SELECT FROM jobs LIMIT 1000) AS j)
       + (SELECT count(*) FROM (SELECT FROM job_events LIMIT 1000) AS e)
       + (SELECT count(*) FROM (SELECT FROM job_files LIMIT 1000) AS f) >= 1000 THEN
        TRUNCATE {TABLES} RESTART IDENTITY CASCADE;
    ELSE
        DELETE FROM job_chain;
        DELETE FROM job_files;
        DELETE FROM job_tables;
        DELETE FROM job_events;
        DELETE FROM jobs;
        DELETE FROM workers;
        PERFORM setval(pg_get_serial_sequence(t, 'id'), 1, false)
        FROM unnest(ARRAY['jobs', 'job_events', 'job_files']) AS t;
    END IF;
END $$;
"""


# Kept connections: one per database and purpose for the process. A new one for
# each test cost the server a backend start and the test a connect, 15 ms of CPU
# per test between them (BENCHMARKS.md, "The test suite").
_kept: dict[tuple[str, str], psycopg2.extensions.connection] = {}


def kept_connection(database_url: str, purpose: str) -> psycopg2.extensions.connection:
    """The process's autocommit connection to ``database_url`` for ``purpose``, lent as a
    new one would be (no transaction, no session state: DISCARD ALL), opened again if
    a test closed it or the server ended it."""
    key = (database_url, purpose)
    conn = _kept.get(key)
    if conn is not None and not conn.closed:
        try:
            return _as_new(conn)
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            conn.close()  # a test restarted the server or ended its connections
    conn = _kept[key] = psycopg2.connect(database_url)
    return _as_new(conn)


def _as_new(conn: psycopg2.extensions.connection) -> psycopg2.extensions.connection:
    if not conn.autocommit:
        conn.rollback()
        conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DISCARD ALL")
    return conn


def give_back(conn: psycopg2.extensions.connection) -> None:
    """What a test left open on a kept connection ends with it (a lock, a transaction)."""
    if not conn.closed and not conn.autocommit:
        try:
            conn.rollback()
        except psycopg2.Error:  # its server went away: the next lend opens another
            conn.close()


def truncate(database_url: str) -> None:
    """Every table of the service emptied, its identities restarted at 1."""
    with kept_connection(database_url, "emptier").cursor() as cur:
        cur.execute(EMPTY_TABLES)


# Rows built through the API once per database, kept in a schema of their own:
# {(database_url, name): (what the build returned, the identities' positions)}.
SAVED_SCHEMA = "test_saved_rows"
IDENTITIES = (("jobs", "id"), ("job_events", "id"), ("job_files", "id"))
_built: dict[tuple[str, str], tuple[object, list[tuple[int, bool]]]] = {}


def built_once(database_url: str, name: str, build):
    """``build()``'s rows on the (emptied) database, built through the API only the
    first time in this process; later, the same rows copied back, identities included.

    A fixture that builds a dozen jobs through the API before each of hundreds of
    tests spent most of their time doing so (BENCHMARKS.md, "The test suite").
    The copy is every row as written, with triggers off (``session_replication_role``:
    the rows already hold what the triggers wrote), in one statement on a kept
    connection; where that is not allowed (not a superuser), ``build()`` runs every time.
    """
    key = (database_url, name)
    if key not in _built:
        result = build()
        _built[key] = (result, _save_rows(database_url, name))
        return result
    result, copy_back = _built[key]
    if copy_back is None:
        return build()
    conn = kept_connection(database_url, "builder")
    with conn.cursor() as cur:
        try:
            cur.execute(copy_back)
        except psycopg2.Error as exc:
            cur.execute("ROLLBACK")  # the kept connection is lent again
            if not isinstance(exc, psycopg2.errors.InsufficientPrivilege):
                raise
            _built[key] = (result, None)
            return build()
    return result


def _save_rows(database_url: str, name: str) -> sql.Composed:
    """The tables' rows kept in ``SAVED_SCHEMA``; the statement that copies them back."""
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SAVED_SCHEMA))
            )
            copies = []
            for table in TABLES.split(", "):
                saved = sql.Identifier(SAVED_SCHEMA, f"{name}_{table}")
                cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(saved))
                cur.execute(
                    sql.SQL("CREATE TABLE {} AS SELECT * FROM {}").format(
                        saved, sql.Identifier(table)
                    )
                )
                copies.append(
                    sql.SQL("INSERT INTO {} OVERRIDING SYSTEM VALUE SELECT * FROM {}").format(
                        sql.Identifier(table), saved
                    )
                )
            for table, column in IDENTITIES:
                cur.execute("SELECT pg_get_serial_sequence(%s, %s)", (table, column))
                (sequence,) = cur.fetchone()
                cur.execute(
                    sql.SQL("SELECT last_value, is_called FROM {}").format(sql.SQL(sequence))
                )
                last_value, is_called = cur.fetchone()
                copies.append(
                    sql.SQL("SELECT setval({}, {}, {})").format(
                        sql.Literal(sequence), sql.Literal(last_value), sql.Literal(is_called)
                    )
                )
    finally:
        conn.close()
    return sql.SQL("; ").join(
        [
            sql.SQL("BEGIN"),
            sql.SQL("SET LOCAL session_replication_role = replica"),
            *copies,
            sql.SQL("COMMIT"),
        ]
    )


def init_db(database_url: str) -> None:
    """``flask init-db`` in process: the schema, on a database of a test's own."""
    app = create_app({"TESTING": True, "DATABASE_URL": database_url})
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output


def database_of_worker(database_url: str, worker: str) -> str:
    """``database_url`` with its database renamed ``<name>_<worker>``, created when missing.

    pytest-xdist's workers run at once, and each truncates the tables before
    every test: on one server each needs a database of its own.
    """
    parts = urlsplit(database_url)
    name = f"{parts.path.lstrip('/') or 'postgres'}_{worker}"
    conn = psycopg2.connect(database_url)
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()
    return urlunsplit(parts._replace(path=f"/{name}"))


def query_rows(url: str, statement: str, params=None, **connect_kwargs) -> list[tuple]:
    """Run ``statement`` on a connection of its own (autocommit): its rows ([] if none)."""
    conn = psycopg2.connect(url, connect_timeout=5, **connect_kwargs)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def query(url: str, statement: str, params=None, **connect_kwargs) -> tuple | None:
    """``query_rows``' first row, or None."""
    rows = query_rows(url, statement, params, **connect_kwargs)
    return rows[0] if rows else None


def count_job_rows(db_conn, table: str, job_id: int) -> int:
    """How many rows of ``table`` (job_events, job_files, ...) belong to the job."""
    with db_conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table} WHERE job_id = %s", (job_id,))
        return cur.fetchone()[0]


@contextlib.contextmanager
def table_locked(url: str, *tables: str):
    """Hold an ACCESS EXCLUSIVE lock on ``tables`` (default: jobs) from another
    connection inside the block."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"LOCK TABLE {', '.join(tables or ('jobs',))} IN ACCESS EXCLUSIVE MODE")
        yield conn
    finally:
        conn.rollback()
        conn.close()


def lose_worker(database_url: str, node_id: str, seconds: float = 3600) -> None:
    """Make a registered worker LOST at once: its last heartbeat ``seconds`` earlier."""
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE workers SET heartbeat_at = heartbeat_at - make_interval(secs => %s)"
                " WHERE node_id = %s",
                (seconds, node_id),
            )
            assert cur.rowcount == 1, f"worker {node_id} is not registered"
    finally:
        conn.close()


# ---- Databases that fail on purpose ---------------------------------------------------


def closed_database_url() -> str:
    """A PostgreSQL URL where nothing listens: connection refused."""
    return f"postgresql://postgres@127.0.0.1:{free_port()}/jobs"


class _Listener:
    """A TCP server on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.held: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def url(self, dbname: str = "jobs") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _serve(self):
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()
        for conn in self.held:
            with contextlib.suppress(OSError):
                conn.close()


class Refuser(_Listener):
    """Accepts, then hangs up at once: libpq fails immediately (``accepted`` counts tries)."""

    def handle(self, conn):
        conn.close()


class Blackhole(_Listener):
    """Accepts and never answers nor closes: to libpq, a server that vanished without a RST."""

    def handle(self, conn):
        self.held.append(conn)
