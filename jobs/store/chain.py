"""The canonical chain of a table's files, and how it is kept up to date.

Progress counts only the canonical chain (docs/API.md, "Progress and the
canonical chain"): walk the files by ``start_block`` ascending, the most
recently registered first among equal starts; the first file starts the
chain, and a file extends it when it starts right after the chain's last
block and, when both hashes are given, its ``prev_hash`` is the chain's last
``block_hash``. Everything else (overlaps, losing forks, anything past a gap)
is skipped.

:func:`walk` is that definition as a pure function, which the tests check
against a brute-force reference and the stored chain against.

What is stored: ``job_tables`` holds each table's summary, ``job_chain`` the
chain's files themselves (its links, one per start block). Both change only
in the registering transaction, under the ``job_tables`` row's lock, and
:func:`refresh_table` changes them by walking only from where the new files
can make a difference:

- Once the chain has reached ``end``, the only files that can extend it start
  at ``end + 1``, and the one that does is the most recently registered of
  those that link. So the chain is a function of its previous link, and one
  index lookup (job_files_chain) finds each next link.
- New files starting at ``s`` can only matter where the chain needs a file at
  ``s``: right after its last link before ``s`` (one lookup in job_chain),
  or as a new first file when ``s`` is at or before the chain's start. A new
  file inside a link's range (an overlap) or past a gap changes nothing.
- From there the walk goes on, link by link, until it reaches a file that is
  already a link: from that file on the chain is the stored one again (the
  same file, so the same end and tip hash), up to the next new start past it.
  The links the walk went round are dropped, the files it took are added,
  and the summary moves by the difference.

So a registration costs an index lookup or two per new start block, plus one
per link that joins or leaves the chain: a file filling a gap adds the files
past it that now link, a reorg drops the suffix it replaced. A table's links
are rebuilt from all its files, by :func:`walk`'s rule, when
``job_tables.chain_ready`` says they cannot be trusted (schema.sql).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

MAX_BLOCK = 2**63 - 1  # the highest block number (bigint)


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


def extends(current_block: int, tip_hash: str | None, start_block: int, prev_hash: str | None):
    """Whether a file starting at ``start_block`` after ``prev_hash`` extends a chain
    that ends at ``current_block`` with ``tip_hash``."""
    if start_block != current_block + 1:
        return False
    if tip_hash is not None and prev_hash is not None:
        return prev_hash == tip_hash
    return True


def links(chain: Chain, file: ChainFile) -> bool:
    return extends(chain.current_block, chain.tip_hash, file.start_block, file.prev_hash)


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


# ---- The stored chain: one function per statement ---------------------------------


@dataclass(frozen=True)
class Link:
    """A file as the incremental walk sees it."""

    file_id: int
    start_block: int
    end_block: int
    block_hash: str | None
    size_bytes: int
    stored: bool  # already a link of the stored chain


# The chain's last link that starts before %(before)s.
_LAST_LINK_BEFORE = """
    SELECT f.id, f.start_block, f.end_block, f.block_hash, f.size_bytes, true
    FROM job_chain c JOIN job_files f ON f.id = c.file_id
    WHERE c.job_id = %(job_id)s AND c.table_name = %(table)s AND c.start_block < %(before)s
    ORDER BY c.start_block DESC
    LIMIT 1
"""


def last_link_before(cur, job_id: int, table: str, before: int) -> Link | None:
    cur.execute(_LAST_LINK_BEFORE, {"job_id": job_id, "table": table, "before": before})
    row = cur.fetchone()
    return None if row is None else Link(*row)


# The chain's links after a chain that ends at %(end_block)s with %(tip_hash)s,
# in order: each is the most recently registered file that starts right after
# the previous one and links to it (job_files_chain gives it in one descent).
# The walk stops at the first file that is already a stored link (it is
# returned, with stored = true), or where nothing links. The CASE keeps
# end_block + 1 from overflowing at the highest block.
_WALK = """
WITH RECURSIVE walk (step, id, start_block, end_block, block_hash, size_bytes, stored) AS (
    SELECT 0, NULL::bigint, NULL::bigint, %(end_block)s::bigint, %(tip_hash)s::text,
           NULL::bigint, false
  UNION ALL
    SELECT w.step + 1, f.id, f.start_block, f.end_block, f.block_hash, f.size_bytes,
           EXISTS (SELECT FROM job_chain c
                   WHERE c.job_id = %(job_id)s AND c.table_name = %(table)s
                     AND c.start_block = f.start_block AND c.file_id = f.id)
    FROM walk w CROSS JOIN LATERAL (
        SELECT f.id, f.start_block, f.end_block, f.block_hash, f.size_bytes
        FROM job_files f
        WHERE f.job_id = %(job_id)s AND f.table_name = %(table)s
          AND f.start_block = CASE WHEN w.end_block < 9223372036854775807
                                   THEN w.end_block + 1 END
          AND (w.block_hash IS NULL OR f.prev_hash IS NULL OR f.prev_hash = w.block_hash)
        ORDER BY f.id DESC
        LIMIT 1
    ) f
    WHERE NOT w.stored
)
SELECT id, start_block, end_block, block_hash, size_bytes, stored
FROM walk WHERE step > 0 ORDER BY step
"""


def walk_links(cur, job_id: int, table: str, end_block: int, tip_hash: str | None) -> list[Link]:
    cur.execute(
        _WALK, {"job_id": job_id, "table": table, "end_block": end_block, "tip_hash": tip_hash}
    )
    return [Link(*row) for row in cur.fetchall()]


# Drops the links starting in after < start_block <= until: their count and size.
_DROP_LINKS = """
WITH dropped AS (
    DELETE FROM job_chain
    WHERE job_id = %(job_id)s AND table_name = %(table)s
      AND start_block > %(after)s AND start_block <= %(until)s
    RETURNING size_bytes
)
SELECT count(*), coalesce(sum(size_bytes), 0) FROM dropped
"""


def drop_links(cur, job_id: int, table: str, after: int, until: int) -> tuple[int, int]:
    cur.execute(_DROP_LINKS, {"job_id": job_id, "table": table, "after": after, "until": until})
    count, size = cur.fetchone()
    return count, int(size)


_ADD_LINKS = """
INSERT INTO job_chain (job_id, table_name, start_block, file_id, size_bytes)
SELECT %(job_id)s, %(table)s, l.start_block, l.file_id, l.size_bytes
FROM unnest(%(starts)s::bigint[], %(ids)s::bigint[], %(sizes)s::bigint[])
     AS l(start_block, file_id, size_bytes)
"""


def add_links(cur, job_id: int, table: str, new: list[tuple[int, int, int]]) -> None:
    """Store links given as (start_block, file_id, size_bytes)."""
    starts, ids, sizes = (list(column) for column in zip(*new, strict=True)) if new else ([],) * 3
    cur.execute(
        _ADD_LINKS,
        {"job_id": job_id, "table": table, "starts": starts, "ids": ids, "sizes": sizes},
    )


# Every file of the table in walk order, for a rebuild of its links.
_FILES_IN_WALK_ORDER = """
    SELECT id, start_block, end_block, size_bytes, block_hash, prev_hash
    FROM job_files
    WHERE job_id = %(job_id)s AND table_name = %(table)s
    ORDER BY start_block, id DESC
"""


def files_in_walk_order(cur, job_id: int, table: str) -> list[tuple]:
    """(id, start_block, end_block, size_bytes, block_hash, prev_hash) of every file."""
    cur.execute(_FILES_IN_WALK_ORDER, {"job_id": job_id, "table": table})
    return cur.fetchall()


_STORED_LINKS = """
    SELECT start_block, file_id FROM job_chain
    WHERE job_id = %(job_id)s AND table_name = %(table)s
"""


def stored_links(cur, job_id: int, table: str) -> dict[int, int]:
    """start_block -> file_id of every stored link of the table."""
    cur.execute(_STORED_LINKS, {"job_id": job_id, "table": table})
    return dict(cur.fetchall())


_FORGET_LINKS = """
    DELETE FROM job_chain
    WHERE job_id = %(job_id)s AND table_name = %(table)s AND start_block = ANY(%(starts)s)
"""


def forget_links(cur, job_id: int, table: str, starts: list[int]) -> None:
    cur.execute(_FORGET_LINKS, {"job_id": job_id, "table": table, "starts": starts})


# chain_writes + 1: this release wrote the row, and job_chain with it (schema.sql).
_STORE_SUMMARY = """
    UPDATE job_tables
    SET start_block = %(start_block)s, current_block = %(current_block)s,
        tip_hash = %(tip_hash)s, files_count = %(files_count)s,
        total_size_bytes = %(total_size_bytes)s,
        chain_ready = true, chain_writes = chain_writes + 1
    WHERE job_id = %(job_id)s AND table_name = %(table)s
"""


def store_summary(cur, job_id: int, table: str, chain: Chain) -> None:
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


# ---- Keeping it up to date ----------------------------------------------------------


def refresh_table(
    cur, job_id: int, table: str, stored: Chain | None, new_starts: Iterable[int], ready: bool
) -> None:
    """Bring the table's links and summary up to date after files were inserted.

    Must run in the registering transaction while it holds the ``job_tables``
    row lock, so ``stored`` is the summary before this transaction's files and
    ``new_starts`` are the start blocks of those files. ``ready`` is
    ``job_tables.chain_ready``: when it is false the links are rebuilt.
    """
    if ready:
        chain = _advance(cur, job_id, table, stored, sorted(set(new_starts)))
    else:
        chain = _rebuild(cur, job_id, table)
    if chain != stored or not ready:
        store_summary(cur, job_id, table, chain)


# Links are written this many per statement in a rebuild, so that each statement
# of a large table's rebuild stays well within the statement timeout.
REBUILD_BATCH = 50_000


def _rebuild(cur, job_id: int, table: str) -> Chain:
    """The table's links anew, by the documented walk over all its files (O(files), once).

    Only the links that differ from the stored ones are written: after a
    previous release's registrations most of them are usually still right.
    """
    new: dict[int, tuple[int, int, int]] = {}  # start_block -> (start_block, file_id, size)
    first = current = tip_hash = None
    total = 0
    for file_id, start, end, size, block_hash, prev_hash in files_in_walk_order(cur, job_id, table):
        if first is None or extends(current, tip_hash, start, prev_hash):
            first = start if first is None else first
            current, tip_hash = end, block_hash
            new[start] = (start, file_id, size)
            total += size
    stored = stored_links(cur, job_id, table)
    stale = [start for start, file_id in stored.items() if new.get(start, (0, None))[1] != file_id]
    missing = [link for start, link in new.items() if stored.get(start) != link[1]]
    for i in range(0, len(stale), REBUILD_BATCH):
        forget_links(cur, job_id, table, stale[i : i + REBUILD_BATCH])
    for i in range(0, len(missing), REBUILD_BATCH):
        add_links(cur, job_id, table, missing[i : i + REBUILD_BATCH])
    return Chain(first, current, tip_hash, len(new), total)


def _advance(cur, job_id: int, table: str, chain: Chain | None, starts: list[int]) -> Chain:
    """The chain after new files starting at ``starts`` (ascending), its links updated."""
    i = 0
    while i < len(starts):
        start = starts[i]
        # Where the chain needs a file at `start`: after a link ending at `end`
        # with `tip_hash` (whose own start is `after`), or as its first file.
        if chain is None or start <= chain.start_block:
            # A new first file: the walk starts at the table's lowest start, this one.
            after, end, tip_hash = -1, start - 1, None
        elif start > chain.current_block:
            if start > chain.current_block + 1:
                break  # past a gap after the tip, and so is every later start
            after, end, tip_hash = None, chain.current_block, chain.tip_hash  # no link after it
        else:
            anchor = last_link_before(cur, job_id, table, start)
            if start <= anchor.end_block:
                i = bisect_right(starts, anchor.end_block)  # inside a link: changes nothing
                continue
            after, end, tip_hash = anchor.start_block, anchor.end_block, anchor.block_hash
        steps = walk_links(cur, job_id, table, end, tip_hash)
        rejoined = steps.pop() if steps and steps[-1].stored else None
        if steps:  # else the next link is the stored one, or (as before) there is none
            dropped, dropped_size = (0, 0)
            if after is not None:  # the stored links the walk went round
                until = MAX_BLOCK if rejoined is None else rejoined.start_block - 1
                dropped, dropped_size = drop_links(cur, job_id, table, after, until)
            add_links(cur, job_id, table, [(s.start_block, s.file_id, s.size_bytes) for s in steps])
            tip = steps[-1] if rejoined is None else None
            chain = Chain(
                steps[0].start_block if after == -1 else chain.start_block,
                chain.current_block if tip is None else tip.end_block,
                chain.tip_hash if tip is None else tip.block_hash,
                (0 if chain is None else chain.files_count) - dropped + len(steps),
                (0 if chain is None else chain.total_size_bytes)
                - dropped_size
                + sum(link.size_bytes for link in steps),
            )
        if rejoined is None:
            break  # the chain ends here: nothing links after it
        # From the file it rejoined the chain is the stored one, up to the next new start past it.
        i = bisect_right(starts, rejoined.end_block)
    return chain
