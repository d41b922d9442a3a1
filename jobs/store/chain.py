"""The canonical chain of a table's files, and how it is kept up to date.

Progress counts only the canonical chain (docs/API.md, "Progress and the
canonical chain"): walk the files by ``start_block`` ascending, the most
recently registered first among equal starts; the first file starts the
chain, and a file extends it when it starts right after the chain's last
block and, when both hashes are given, its ``prev_hash`` is the chain's last
``block_hash``. Everything else (overlaps, losing forks, anything past a gap)
is skipped.

The walk is a pure function (:func:`walk`) so it can be checked against a
brute-force reference. :func:`refresh_table` keeps a table's summary in
``job_tables`` current inside the registering transaction, resuming the walk
from the chain's tip when the new files all lie beyond it (the common case of a
worker writing forward) and walking the whole table otherwise (a reorg, or a
file before the tip).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ChainFile:
    start_block: int
    end_block: int
    size_bytes: int
    block_hash: str | None = None
    prev_hash: str | None = None


@dataclass(frozen=True)
class Chain:
    start_block: int
    current_block: int
    tip_hash: str | None
    files_count: int
    total_size_bytes: int


def links(chain: Chain, file: ChainFile) -> bool:
    if file.start_block != chain.current_block + 1:
        return False
    if chain.tip_hash is not None and file.prev_hash is not None:
        return file.prev_hash == chain.tip_hash
    return True


def walk(files: Iterable[ChainFile], chain: Chain | None = None) -> Chain | None:
    """Continue ``chain`` (or start one) over ``files`` given in walk order."""
    for file in files:
        if chain is None:
            chain = Chain(file.start_block, file.end_block, file.block_hash, 1, file.size_bytes)
        elif links(chain, file):
            chain = Chain(
                chain.start_block,
                file.end_block,
                file.block_hash,
                chain.files_count + 1,
                chain.total_size_bytes + file.size_bytes,
            )
    return chain


# Files in walk order; `after` limits the walk to files past the chain's tip.
_FILES_IN_WALK_ORDER = """
    SELECT start_block, end_block, size_bytes, block_hash, prev_hash
    FROM job_files
    WHERE job_id = %(job_id)s AND table_name = %(table)s AND start_block > %(after)s
    ORDER BY start_block, id DESC
"""

_STORE_SUMMARY = """
    UPDATE job_tables
    SET start_block = %(start_block)s, current_block = %(current_block)s,
        tip_hash = %(tip_hash)s, files_count = %(files_count)s,
        total_size_bytes = %(total_size_bytes)s
    WHERE job_id = %(job_id)s AND table_name = %(table)s
"""


def refresh_table(cur, job_id: int, table: str, stored: Chain | None, lowest_new_start: int):
    """Bring ``job_tables``'s summary up to date after files were inserted.

    Must run in the registering transaction while it holds the ``job_tables``
    row lock, so ``stored`` is the summary before this transaction's files.
    Files starting at or before the tip cannot change the walk up to the tip
    unless one of them is new, so when every new file lies beyond the tip the
    walk resumes there and reads only the files past it.
    """
    resume = stored is not None and lowest_new_start > stored.current_block
    after = stored.current_block if resume else -1
    cur.execute(_FILES_IN_WALK_ORDER, {"job_id": job_id, "table": table, "after": after})
    chain = walk((ChainFile(*row) for row in cur), stored if resume else None)
    cur.execute(
        _STORE_SUMMARY,
        {
            "job_id": job_id,
            "table": table,
            "start_block": chain.start_block,
            "current_block": chain.current_block,
            "tip_hash": chain.tip_hash,
            "files_count": chain.files_count,
            "total_size_bytes": chain.total_size_bytes,
        },
    )
