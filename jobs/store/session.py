"""Statements about the connection rather than the data: its session settings,
time limits, init-db's lock, and the WAL positions the replica checks compare.

They run on the caller's cursor like the rest of store/, but their callers are
the connection machinery (pool.py, db.apply_schema, replicas.py), not the
routes. This module imports nothing of the package: pool.py imports it.
"""

from __future__ import annotations

from typing import NamedTuple

# Set session state only if this connection reaches PostgreSQL itself. The
# BackendKeyData that PostgreSQL sends at connect carries its backend's pid;
# PgBouncer (both pool modes, 1.18) sends a made-up key instead, as other
# poolers do, since the client is not tied to one backend (BENCHMARKS.md,
# "Design measurements: Pooler detection"). One round trip: the settings are
# applied (only) by the row that says "direct".
CONFIGURE = """
SELECT set_config('statement_timeout', %(timeout)s, false),
       set_config('plan_cache_mode', 'force_generic_plan', false)
WHERE pg_backend_pid() = %(backend_key_pid)s
"""


def configure(cur, statement_timeout_ms: int, backend_key_pid: int) -> bool:
    """Apply the session settings if the connection is direct; True when it is."""
    params = {"timeout": str(statement_timeout_ms), "backend_key_pid": backend_key_pid}
    cur.execute(CONFIGURE, params)
    return cur.fetchone() is not None


# PostgreSQL runs a message of several statements as one implicit
# transaction, so SET LOCAL holds for the query that follows it, and ends
# with it; in the same message it costs no round trip (BENCHMARKS.md,
# "Design measurements: SET LOCAL in front of a query").
def local_timeout_prefix(timeout_ms: int) -> str:
    """What goes in front of a transaction's first statement, in the same message,
    where session settings are not ours (through a pooler: Cursor.execute)."""
    return f"SET LOCAL statement_timeout = {int(timeout_ms)}; "


def set_local_timeout(cur, timeout_ms: int) -> None:
    """In a transaction: ``timeout_ms`` as the statement timeout for the rest of it."""
    cur.execute(local_timeout_prefix(timeout_ms))


# Replicas deploying at once must not race on CREATE ... IF NOT EXISTS.
INIT_DB_LOCK = "SELECT pg_advisory_xact_lock(hashtext('jobs-service init-db'))"


def lock_for_init_db(cur) -> None:
    """Wait for, then hold until the transaction ends, the lock of applying schema.sql."""
    cur.execute(INIT_DB_LOCK)


# The primary's insert position and its WAL page size, and a replica's replay
# position (a server that is not in recovery: its own insert position, as a
# primary's). In bytes from 0/0.
PRIMARY_POSITION = """
SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint,
       current_setting('wal_block_size')::int
"""
REPLICA_POSITION = """
SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
             ELSE pg_current_wal_insert_lsn() END - '0/0'::pg_lsn)::bigint
"""


class PrimaryPosition(NamedTuple):
    position: int  # the insert position, in bytes from 0/0
    page_size: int  # wal_block_size


def primary_wal_position(cur) -> PrimaryPosition:
    cur.execute(PRIMARY_POSITION)
    position, page_size = cur.fetchone()
    return PrimaryPosition(int(position), int(page_size))


def replica_wal_position(cur) -> int:
    """How far a replica has replayed, in bytes from 0/0 (a primary: its insert position)."""
    cur.execute(REPLICA_POSITION)
    return int(cur.fetchone()[0])
