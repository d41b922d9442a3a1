"""Files a job writes, and the per-table progress along their canonical chain."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.domain import ACTIVE_STATUSES
from jobs.store import chain
from jobs.store.outcomes import NOT_FOUND, NotFound, Refused
from jobs.store.sql import fetch_one

ACTIVE = list(ACTIVE_STATUSES)
FILE_FIELDS = ("file_name", "start_block", "end_block", "size_bytes", "block_hash", "prev_hash")

TABLE_PROGRESS_JSON = (
    "json_build_object('start_block', t.start_block, 'current_block', t.current_block, "
    "'files_count', t.files_count, 'total_size_bytes', t.total_size_bytes)"
)

GET_PROGRESS = f"""
SELECT j.status,
       coalesce(json_object_agg(t.table_name, {TABLE_PROGRESS_JSON} ORDER BY t.table_name)
                FILTER (WHERE t.table_name IS NOT NULL), '{{}}')::text
FROM jobs j LEFT JOIN job_tables t ON t.job_id = j.id
WHERE j.id = %(job_id)s
GROUP BY j.id
"""


@dataclass(frozen=True)
class Progress:
    job_status: str
    tables_json: str  # {"<table>": {start_block, current_block, files_count, total_size_bytes}}


def get_progress(cur, job_id: int) -> Progress | NotFound:
    row = fetch_one(cur, GET_PROGRESS, {"job_id": job_id})
    return NOT_FOUND if row is None else Progress(*row)


# File registration, one statement: the job is locked so it cannot turn
# terminal until this transaction ends (and is only written to while active);
# the table's summary row is locked so registrations to one table serialise.
# FOR NO KEY UPDATE, not FOR SHARE: new share lockers pass a waiting FOR UPDATE,
# so busy registrations could starve a stop or a transition past its timeout.
# The upsert locks an existing row by bumping chain_writes: this release keeps
# job_chain, so chain_ready stays as it was (schema.sql); a new table has no
# files yet, so its (empty) chain is ready.
INSERT_FILES = """
WITH job AS (
    SELECT id, status FROM jobs WHERE id = %(job_id)s FOR NO KEY UPDATE
), tbl AS (
    INSERT INTO job_tables (job_id, table_name, chain_ready)
    SELECT id, %(table)s, true FROM job WHERE status = ANY(%(active)s)
    ON CONFLICT (job_id, table_name) DO UPDATE SET chain_writes = job_tables.chain_writes + 1
    RETURNING start_block, current_block, tip_hash, files_count, total_size_bytes, chain_ready
), inserted AS (
    INSERT INTO job_files (job_id, table_name, file_name, start_block, end_block,
                           size_bytes, block_hash, prev_hash)
    SELECT %(job_id)s, %(table)s, f.*
    FROM (SELECT FROM tbl) AS locked,
         unnest(%(names)s::text[], %(starts)s::bigint[], %(ends)s::bigint[],
                %(sizes)s::bigint[], %(block_hashes)s::text[], %(prev_hashes)s::text[]) AS f
    ON CONFLICT (job_id, table_name, file_name) DO NOTHING
    RETURNING file_name, start_block
)
SELECT job.status,
       tbl.start_block, tbl.current_block, tbl.tip_hash, tbl.files_count, tbl.total_size_bytes,
       tbl.chain_ready,
       (SELECT coalesce(array_agg(file_name), '{}') FROM inserted),
       (SELECT coalesce(array_agg(DISTINCT start_block), '{}') FROM inserted)
FROM job LEFT JOIN tbl ON true
"""

EXISTING_FILES = """
SELECT file_name, start_block, end_block, size_bytes, block_hash, prev_hash
FROM job_files
WHERE job_id = %(job_id)s AND table_name = %(table)s AND file_name = ANY(%(names)s)
"""

TABLE_PROGRESS = f"""
SELECT {TABLE_PROGRESS_JSON}::text FROM job_tables t
WHERE t.job_id = %(job_id)s AND t.table_name = %(table)s
"""


@dataclass(frozen=True)
class Registered:
    registered: int  # files newly stored
    unchanged: int  # files already stored with identical fields (a worker's retry)
    progress_json: str  # the table's progress after this registration


@dataclass(frozen=True)
class FileConflict:
    """``file_name`` is already registered with other fields; nothing was stored."""

    file_name: str


def register_files(
    cur, job_id: int, table: str, files: list[dict]
) -> Registered | FileConflict | Refused | NotFound:
    """Store a batch of files and bring the table's chain summary up to date.

    All or nothing: the caller's transaction must be rolled back unless the
    outcome is Registered.
    """
    params = {"job_id": job_id, "table": table, "active": ACTIVE}
    for column, field in zip(
        ("names", "starts", "ends", "sizes", "block_hashes", "prev_hashes"),
        FILE_FIELDS,
        strict=True,
    ):
        params[column] = [f[field] for f in files]
    cur.execute(INSERT_FILES, params)
    row = cur.fetchone()
    if row is None:
        return NOT_FOUND
    status, start, current, tip_hash, count, size, ready, inserted_names, new_starts = row
    if status not in ACTIVE_STATUSES:
        return Refused(status)
    inserted = set(inserted_names)
    retried = [f for f in files if f["file_name"] not in inserted]
    if retried:
        conflict = _first_conflict(cur, job_id, table, retried)
        if conflict is not None:
            return conflict
    if inserted:
        stored = None if start is None else chain.Chain(start, current, tip_hash, count, int(size))
        chain.refresh_table(cur, job_id, table, stored, new_starts, ready)
    cur.execute(TABLE_PROGRESS, {"job_id": job_id, "table": table})
    return Registered(len(inserted), len(retried), cur.fetchone()[0])


def _first_conflict(cur, job_id: int, table: str, retried: list[dict]) -> FileConflict | None:
    cur.execute(
        EXISTING_FILES,
        {"job_id": job_id, "table": table, "names": [f["file_name"] for f in retried]},
    )
    existing = {row[0]: row for row in cur.fetchall()}
    for f in retried:
        if existing.get(f["file_name"]) != tuple(f[k] for k in FILE_FIELDS):
            return FileConflict(f["file_name"])
    return None
