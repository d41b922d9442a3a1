"""Readiness: the database answers, and has the tables and columns the service uses.

One statement, on a connection of its own (jobs/readiness.py): the round trip
that proves the database answers also reads the catalog for every column in
``REQUIRED``. The catalog, not the tables: it takes no lock on them, so a
long transaction holding a table does not make every replica unready, and it
costs the same on an empty database and a full one.
"""

from __future__ import annotations

# Every table the service reads or writes, and every column its statements
# name (schema.sql makes them; tests/test_bounds_ops.py holds the two together).
REQUIRED: dict[str, tuple[str, ...]] = {
    "jobs": (
        "id",
        "created_at",
        "updated_at",
        "node_id",
        "status",
        "descriptor",
        "idempotency_key",
        "job_json",
        "attempt",
        "max_attempts",
        "retry_at",
    ),
    "job_events": ("id", "job_id", "created_at", "event_type", "node_id", "detail"),
    "job_tables": (
        "job_id",
        "table_name",
        "start_block",
        "current_block",
        "tip_hash",
        "files_count",
        "total_size_bytes",
        "chain_ready",
        "chain_writes",
    ),
    "job_chain": ("job_id", "table_name", "start_block", "file_id", "size_bytes"),
    "job_files": (
        "id",
        "job_id",
        "table_name",
        "file_name",
        "start_block",
        "end_block",
        "size_bytes",
        "block_hash",
        "prev_hash",
        "created_at",
        "attempt",
    ),
    "service_chores": ("name", "ran_at"),
    "schema_upgrades": ("name", "done_at"),
    "workers": ("node_id", "info", "created_at", "registered_at", "heartbeat_at", "waiting_until"),
}

# NULL when every required column exists; else the missing ones, "table.column, ...".
# to_regclass resolves a name as the service's statements do (search_path) and
# is NULL for a table that does not exist.
MISSING_COLUMNS = """
SELECT string_agg(need.tbl || '.' || need.col, ', ' ORDER BY need.tbl, need.col)
FROM unnest(%(tables)s::text[], %(columns)s::text[]) AS need (tbl, col)
WHERE NOT EXISTS (
    SELECT FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = to_regclass(need.tbl) AND a.attname = need.col
      AND a.attnum > 0 AND NOT a.attisdropped
)
"""

MISSING_COLUMNS_PARAMS = {
    "tables": [table for table, columns in REQUIRED.items() for _ in columns],
    "columns": [column for columns in REQUIRED.values() for column in columns],
}
