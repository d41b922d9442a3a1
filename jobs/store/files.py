"""Files a job writes, and the per-table progress along their canonical chain."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.domain import ACTIVE_STATUSES
from jobs.store import chain
from jobs.store.jobs import Stale
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
# terminal (or move to another worker or attempt) until this transaction
# ends, and is only written to while active and when the registration is
# not stale: a ?node_id= or ?attempt= that is not the job's own (the fence)
# stores nothing, in the same WHERE as the status guard. The table's summary
# row is locked so registrations to one table serialise. FOR NO KEY UPDATE,
# not FOR SHARE: new share lockers pass a waiting FOR UPDATE, so busy
# registrations could starve a stop or a transition past its timeout.
# The upsert locks an existing row by bumping chain_writes: this release keeps
# job_chain, so chain_ready stays as it was (schema.sql); a new table has no
# files yet, so its (empty) chain is ready.
# Each new file is stamped with the job's attempt (a later one may replace it).
INSERT_FILES = """
WITH job AS (
    SELECT id, status, node_id, attempt,
           (%(fence_node)s::text IS NOT NULL AND node_id <> %(fence_node)s::text)
           OR (%(fence_attempt)s::bigint IS NOT NULL AND attempt <> %(fence_attempt)s::bigint)
           AS stale
    FROM jobs WHERE id = %(job_id)s FOR NO KEY UPDATE
), tbl AS (
    INSERT INTO job_tables (job_id, table_name, chain_ready)
    SELECT id, %(table)s, true FROM job WHERE status = ANY(%(active)s) AND NOT stale
    ON CONFLICT (job_id, table_name) DO UPDATE SET chain_writes = job_tables.chain_writes + 1
    RETURNING start_block, current_block, tip_hash, files_count, total_size_bytes, chain_ready
), inserted AS (
    INSERT INTO job_files (job_id, table_name, file_name, start_block, end_block,
                           size_bytes, block_hash, prev_hash, attempt)
    SELECT %(job_id)s, %(table)s, f.*, job.attempt
    FROM job, (SELECT FROM tbl) AS locked,
         unnest(%(names)s::text[], %(starts)s::bigint[], %(ends)s::bigint[],
                %(sizes)s::bigint[], %(block_hashes)s::text[], %(prev_hashes)s::text[]) AS f
    ON CONFLICT (job_id, table_name, file_name) DO NOTHING
    RETURNING file_name, start_block
)
SELECT job.status, job.node_id, job.attempt, job.stale,
       tbl.start_block, tbl.current_block, tbl.tip_hash, tbl.files_count, tbl.total_size_bytes,
       tbl.chain_ready,
       (SELECT coalesce(array_agg(file_name), '{}') FROM inserted),
       (SELECT coalesce(array_agg(DISTINCT start_block), '{}') FROM inserted)
FROM job LEFT JOIN tbl ON true
"""

# The stored files of the names a registration did not insert, with the
# attempt that registered each (under the job's lock, taken by INSERT_FILES).
EXISTING_FILES = """
SELECT file_name, start_block, end_block, size_bytes, block_hash, prev_hash, attempt
FROM job_files
WHERE job_id = %(job_id)s AND table_name = %(table)s AND file_name = ANY(%(names)s)
"""

# A later attempt rewrote files an earlier one registered: the earlier
# entries go, and the new ones come in as newly registered (a new id: the
# most recently registered among files of one start_block). The chain is
# then refreshed from the lowest start that changed, removed files included.
REMOVE_FILES = """
DELETE FROM job_files
WHERE job_id = %(job_id)s AND table_name = %(table)s AND file_name = ANY(%(names)s)
RETURNING start_block
"""

ADD_FILES = """
INSERT INTO job_files (job_id, table_name, file_name, start_block, end_block,
                       size_bytes, block_hash, prev_hash, attempt)
SELECT %(job_id)s, %(table)s, f.*, %(attempt)s
FROM unnest(%(names)s::text[], %(starts)s::bigint[], %(ends)s::bigint[],
            %(sizes)s::bigint[], %(block_hashes)s::text[], %(prev_hashes)s::text[]) AS f
RETURNING start_block
"""

# A later attempt registered an earlier attempt's file again, identically:
# the file is now that attempt's, so that a change to it within this attempt
# is a conflict like any other.
ADOPT_FILES = """
UPDATE job_files SET attempt = %(attempt)s
WHERE job_id = %(job_id)s AND table_name = %(table)s AND file_name = ANY(%(names)s)
  AND attempt < %(attempt)s
"""

TABLE_PROGRESS = f"""
SELECT {TABLE_PROGRESS_JSON}::text FROM job_tables t
WHERE t.job_id = %(job_id)s AND t.table_name = %(table)s
"""


@dataclass(frozen=True)
class Registered:
    registered: int  # files newly stored (replacements of an earlier attempt's included)
    unchanged: int  # files already stored with identical fields (a worker's retry)
    progress_json: str  # the table's progress after this registration


@dataclass(frozen=True)
class FileConflict:
    """``file_name`` is already registered by this attempt with other fields; nothing was stored."""

    file_name: str


def _columns(files: list[dict]) -> dict:
    columns = ("names", "starts", "ends", "sizes", "block_hashes", "prev_hashes")
    return {
        column: [f[field] for f in files]
        for column, field in zip(columns, FILE_FIELDS, strict=True)
    }


def register_files(
    cur,
    job_id: int,
    table: str,
    files: list[dict],
    fence_node: str | None = None,
    fence_attempt: int | None = None,
) -> Registered | FileConflict | Stale | Refused | NotFound:
    """Store a batch of files and bring the table's chain summary up to date.

    All or nothing: the caller's transaction must be rolled back unless the
    outcome is Registered. ``fence_node`` / ``fence_attempt``, when given,
    must be the job's own (else Stale, and nothing is stored).
    """
    params = {
        "job_id": job_id,
        "table": table,
        "active": ACTIVE,
        "fence_node": fence_node,
        "fence_attempt": fence_attempt,
        **_columns(files),
    }
    cur.execute(INSERT_FILES, params)
    row = cur.fetchone()
    if row is None:
        return NOT_FOUND
    status, job_node, attempt, stale, *summary, ready, inserted_names, new_starts = row
    if stale:
        return Stale(job_node, attempt)
    if status not in ACTIVE_STATUSES:
        return Refused(status)
    start, current, tip_hash, count, size = summary
    inserted = set(inserted_names)
    retried = [f for f in files if f["file_name"] not in inserted]
    changed_starts = list(new_starts)
    replaced = 0
    if retried:
        outcome = _replace_or_adopt(cur, job_id, table, attempt, retried)
        if isinstance(outcome, FileConflict):
            return outcome
        replaced, removed_starts = outcome
        changed_starts += removed_starts
    if changed_starts:
        stored = None if start is None else chain.Chain(start, current, tip_hash, count, int(size))
        # A replaced file may have been a link of the stored chain: rebuild the
        # chain from the table's files (rare: only a later attempt rewriting a file).
        chain.refresh_table(
            cur, job_id, table, stored, sorted(set(changed_starts)), ready and not replaced
        )
    cur.execute(TABLE_PROGRESS, {"job_id": job_id, "table": table})
    return Registered(len(inserted) + replaced, len(retried) - replaced, cur.fetchone()[0])


def _replace_or_adopt(
    cur, job_id: int, table: str, attempt: int, retried: list[dict]
) -> FileConflict | tuple[int, list[int]]:
    """Files already stored under these names: identical ones stay (this attempt's
    now), an earlier attempt's different ones are replaced, this attempt's
    different ones conflict. (replaced, the starts of every file removed or added)."""
    names = {"job_id": job_id, "table": table}
    cur.execute(EXISTING_FILES, {**names, "names": [f["file_name"] for f in retried]})
    existing = {row[0]: row for row in cur.fetchall()}
    same, replace = [], []
    for f in retried:
        stored = existing[f["file_name"]]
        if stored[:-1] == tuple(f[k] for k in FILE_FIELDS):
            same.append(f["file_name"])
        elif stored[-1] < attempt:
            replace.append(f)
        else:
            return FileConflict(f["file_name"])
    if same:
        cur.execute(ADOPT_FILES, {**names, "attempt": attempt, "names": same})
    if not replace:
        return 0, []
    replaced_names = [f["file_name"] for f in replace]
    cur.execute(REMOVE_FILES, {**names, "names": replaced_names})
    starts = [r[0] for r in cur.fetchall()]
    cur.execute(ADD_FILES, {**names, "attempt": attempt, **_columns(replace)})
    starts += [r[0] for r in cur.fetchall()]
    return len(replace), starts
