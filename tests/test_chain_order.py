"""Files registered in any order keep the stored chain exactly the canonical one.

A registration re-walks the chain only from where its files can make a
difference and stops where the walk rejoins the stored chain (chain.py), so
the stored chain's files (job_chain) matter as much as the summary. After
every registration these tests compare both with the reference
(support.oracle.reference_chain, from docs/API.md's words): the progress answered and
read back, and the stored chain's files, name by name.

- Random tables (a hash-linked main chain, reorg branches off it, forks at its
  starts, duplicates, files before its first block, strays), registered in a
  random order and random batches, a few of them by the previous release
  (which leaves job_chain as it was): hypothesis.
- Each case the incremental walk has to get right, once by hand, in the
  middle of a longer chain.
- 20,000 files seeded with SQL, then registered into out of order.
- Databases from before job_chain (filled by hand, and upgraded by init-db),
  and tables a previous release wrote to: rebuilt from their files by the next
  registration.
"""

from __future__ import annotations

import random

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import create_app
from jobs.store import chain

from support.databases import init_db
from support.oracle import expected_progress, reference_chain, reference_progress
from support.service import block_hash, new_job

TABLE = "blocks"


def wire(f: dict) -> dict:
    body = {k: f[k] for k in ("file_name", "start_block", "end_block", "size_bytes")}
    body.update({k: f[k] for k in ("block_hash", "prev_hash") if f.get(k) is not None})
    return body


def register(client, job_id: int, files: list[dict]) -> dict:
    """Registers ``files`` (one request, in this order); returns the progress answered."""
    response = client.post(f"/jobs/{job_id}/tables/{TABLE}/files", json=[wire(f) for f in files])
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["registered"] == len(files)
    return response.get_json()["progress"]


def progress_read(client, job_id: int) -> dict:
    return client.get(f"/jobs/{job_id}/progress").get_json()["tables"].get(TABLE)


def stored_chain(db_conn, job_id: int) -> list[str]:
    """The names of the stored chain's files (job_chain), in chain order."""
    with db_conn.cursor() as cur:
        cur.execute(
            "SELECT f.file_name FROM job_chain c JOIN job_files f ON f.id = c.file_id"
            " WHERE c.job_id = %s AND c.table_name = %s ORDER BY c.start_block",
            (job_id, TABLE),
        )
        return [name for (name,) in cur.fetchall()]


def chain_ready(db_conn, job_id: int) -> bool:
    with db_conn.cursor() as cur:
        cur.execute(
            "SELECT chain_ready FROM job_tables WHERE job_id = %s AND table_name = %s",
            (job_id, TABLE),
        )
        return cur.fetchone()[0]


def assert_canonical(client, db_conn, job_id: int, registered: list[dict], answered: dict):
    expected = reference_progress(registered)
    assert answered == expected
    assert progress_read(client, job_id) == expected
    assert stored_chain(db_conn, job_id) == [f["file_name"] for f in reference_chain(registered)]
    assert chain_ready(db_conn, job_id)


def named(files: list[dict], prefix: str = "f") -> list[dict]:
    return [{**f, "file_name": f"{prefix}{i:03d}"} for i, f in enumerate(files)]


# ---- Random tables, random order ----------------------------------------------------


@st.composite
def tables(draw) -> list[dict]:
    """A table's files, unordered: a main chain and the files that compete with it."""
    fresh = iter(range(1, 10**6))  # hash numbers never used before in this table

    def h(n: int | None) -> str | None:
        # Hashes present in most files, absent in some (then anything links).
        return None if n is None or draw(st.integers(0, 5)) == 0 else block_hash(n)

    size = st.integers(0, 1000)
    # The main chain, hash-linked; its first file's prev_hash names a block before it.
    before_first = next(fresh)
    main, start, prev = [], draw(st.integers(0, 4)), before_first
    for _ in range(draw(st.integers(1, 14))):
        end, own = start + draw(st.integers(0, 2)), next(fresh)
        main.append(
            {
                "start_block": start,
                "end_block": end,
                "size_bytes": draw(size),
                "block_hash": h(own),
                "prev_hash": h(prev),
                "n": own,
            }
        )
        start, prev = end + 1, own
    files = list(main)
    # Reorgs: a branch leaving the main chain at one of its files, linking to its predecessor.
    for _ in range(draw(st.integers(0, 2))):
        k = draw(st.integers(0, len(main) - 1))
        start, prev = main[k]["start_block"], main[k - 1]["n"] if k else before_first
        for _ in range(draw(st.integers(1, 4))):
            end, own = start + draw(st.integers(0, 2)), next(fresh)
            files.append(
                {
                    "start_block": start,
                    "end_block": end,
                    "size_bytes": draw(size),
                    "block_hash": h(own),
                    "prev_hash": h(prev),
                    "n": own,
                }
            )
            start, prev = end + 1, own
    # Forks at a main file's start (linking or not), and duplicates of main files.
    for _ in range(draw(st.integers(0, 3))):
        k = draw(st.integers(0, len(main) - 1))
        twin = dict(main[k])
        if draw(st.booleans()):  # a duplicate: the same range and hash under another name
            twin["size_bytes"] = draw(size)
        else:
            twin["end_block"] = twin["start_block"] + draw(st.integers(0, 3))
            twin["n"] = next(fresh)
            twin["block_hash"] = h(twin["n"])
            if draw(st.booleans()):
                twin["prev_hash"] = h(next(fresh))  # a losing fork: links to nothing
        files.append(twin)
    # Files before the first one, ending right before it (linking to it) or not.
    for _ in range(draw(st.integers(0, 1))):
        end = main[0]["start_block"] - 1 - draw(st.integers(0, 1))
        if end >= 0:
            files.append(
                {
                    "start_block": max(0, end - draw(st.integers(0, 2))),
                    "end_block": end,
                    "size_bytes": draw(size),
                    "block_hash": h(before_first),
                    "prev_hash": None,
                }
            )
    # Strays anywhere: overlaps, past the tip, past gaps, hashes from the table's own.
    top = main[-1]["end_block"] + 3
    for _ in range(draw(st.integers(0, 3))):
        start = draw(st.integers(0, top))
        files.append(
            {
                "start_block": start,
                "end_block": start + draw(st.integers(0, 3)),
                "size_bytes": draw(size),
                "block_hash": h(draw(st.integers(1, 20))),
                "prev_hash": h(draw(st.integers(1, 20))),
            }
        )
    for f in files:
        f.pop("n", None)
    return files


@st.composite
def registrations(draw) -> tuple[list[list[dict]], set[int]]:
    """A table's files in a random order, cut into random batches, and the batches (not
    the first) that the previous release registers, mid-deploy."""
    files = named(draw(st.permutations(draw(tables()))))
    batches, i = [], 0
    while i < len(files):
        n = draw(st.integers(1, 4))
        batches.append(files[i : i + n])
        i += n
    theirs = draw(st.sets(st.integers(1, len(batches) - 1), max_size=2)) if batches[1:] else set()
    return batches, theirs


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=registrations())
def test_any_order_and_batching_keeps_the_canonical_chain(client, db_conn, plan):
    batches, theirs = plan
    job_id = new_job(client)
    registered: list[dict] = []
    for n, batch in enumerate(batches):
        if n in theirs:  # stored without job_chain: the next registration here rebuilds
            for f in batch:
                previous_release_registers(db_conn, job_id, registered, f)
                registered.append(f)
            assert not chain_ready(db_conn, job_id)
            continue
        answered = register(client, job_id, batch)
        registered += batch
        assert_canonical(client, db_conn, job_id, registered, answered)


# ---- Each case once, in the middle of a longer chain ------------------------------


def linked(first: int, count: int, length: int = 10, prefix: str = "m", tag: int = 0) -> list:
    """``count`` hash-linked files from block ``first * length``; hashes tag * 1000 + i."""
    return [
        {
            "file_name": f"{prefix}{i:03d}",
            "start_block": i * length,
            "end_block": i * length + length - 1,
            "size_bytes": i + 1,
            "block_hash": block_hash(tag * 1000 + i),
            "prev_hash": block_hash(tag * 1000 + i - 1) if i else None,
        }
        for i in range(first, first + count)
    ]


def file(name, start, end, size=1, block=None, prev=None) -> dict:
    return {
        "file_name": name,
        "start_block": start,
        "end_block": end,
        "size_bytes": size,
        "block_hash": None if block is None else block_hash(block),
        "prev_hash": None if prev is None else block_hash(prev),
    }


# Each case: (files registered first, then one at a time) over the chain m000..m029 (0-299).
CASES = {
    # A file past a gap changes nothing; filling the gap extends over it and what follows.
    "past_a_gap_then_filled": (
        linked(0, 10) + linked(11, 19),
        [file("x", 305, 309), linked(10, 1, prefix="fill")[0]],
    ),
    # Newest wins at a start when it links: a reorg replaces the suffix from there.
    "reorg_replacing_a_suffix": (
        linked(0, 30),
        [file("r15", 150, 159, 100, 5015, 14), file("r16", 160, 169, 100, 5016, 5015)],
    ),
    # The same range and hash under another name: the chain goes through it and rejoins.
    "rejoining_duplicate": (linked(0, 30), [file("dup", 120, 129, 500, 12, 11)]),
    # A fork at a chain file's start that does not link: the older file stays.
    "losing_fork": (linked(0, 30), [file("fork", 120, 124, 7, 7777, 9999)]),
    # A fork without hashes links whatever the tip's hash: it wins and cuts the chain.
    "fork_without_hashes": (linked(0, 30), [file("bare", 120, 124, 7)]),
    # A file before the chain's first one is the new first file...
    "before_the_first_file": (linked(5, 25), [file("early", 0, 29, 3)]),
    # ...and one ending right before it, with the hash it names, extends back over it.
    "before_and_linking": (linked(5, 25), [file("early", 30, 49, 3, 4, None)]),
    # The newest file at the first start begins the chain, whatever it ends at.
    "new_first_at_the_same_start": (linked(0, 30), [file("first2", 0, 4, 2)]),
    # Overlaps inside a link, ending with it, and across two links change nothing.
    "overlaps": (
        linked(0, 30),
        [file("in", 121, 125), file("tail", 125, 129, 1, 12, None), file("across", 125, 134)],
    ),
    # Batches mixing all of it are covered above; several new starts in one batch here.
    "one_batch_in_several_places": (
        linked(0, 10) + linked(11, 19),
        [
            [
                file("late", 250, 259, 9, 9025, 24),
                linked(10, 1, prefix="fill")[0],
                file("fork3", 30, 34, 5, 8888, 9999),
            ]
        ],
    ),
    # A duplicate that rejoins, then (same batch) a reorg further on: two walks.
    "rejoin_then_reorg": (
        linked(0, 30),
        [[file("dup", 120, 129, 500, 12, 11), file("late", 250, 259, 9, 9025, 24)]],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_each_case_in_the_middle_of_a_chain(client, db_conn, case):
    first, later = CASES[case]
    job_id = new_job(client)
    registered = list(first)
    assert_canonical(client, db_conn, job_id, registered, register(client, job_id, first))
    for step in later:
        batch = step if isinstance(step, list) else [step]
        registered += batch
        assert_canonical(client, db_conn, job_id, registered, register(client, job_id, batch))


def test_the_cases_change_what_they_say(client):
    """The cases above are not vacuous: check a few of their outcomes by hand."""
    expectations = {
        "past_a_gap_then_filled": expected_progress(0, 299, 30, 465),
        "reorg_replacing_a_suffix": expected_progress(0, 169, 17, sum(range(1, 16)) + 200),
        "rejoining_duplicate": expected_progress(0, 299, 30, 465 - 13 + 500),
        "losing_fork": expected_progress(0, 299, 30, 465),
        "fork_without_hashes": expected_progress(0, 124, 13, sum(range(1, 13)) + 7),
        "before_the_first_file": expected_progress(0, 29, 1, 3),
        "before_and_linking": expected_progress(30, 299, 26, 3 + sum(range(6, 31))),
        "new_first_at_the_same_start": expected_progress(0, 4, 1, 2),
        "overlaps": expected_progress(0, 299, 30, 465),
        "one_batch_in_several_places": expected_progress(0, 259, 26, sum(range(1, 26)) + 9),
        "rejoin_then_reorg": expected_progress(0, 259, 26, sum(range(1, 26)) - 13 + 500 + 9),
    }
    for case, expected in expectations.items():
        first, later = CASES[case]
        steps = [f for step in later for f in (step if isinstance(step, list) else [step])]
        assert reference_progress(first + steps) == expected, case


# ---- Many files, out of order ------------------------------------------------------------

MANY = 20_000
LENGTH = 10  # blocks per file


def seed_many(db_conn, holes: list[int]) -> int:
    """A RUNNING job whose table holds files 0..MANY-1 but ``holes``, as a database made
    before job_chain existed would (a summary, no links): linked by hashes, file i
    covering blocks [i*LENGTH, i*LENGTH + LENGTH - 1] with size i + 1."""
    first_hole = min(holes)
    with db_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO jobs (node_id, status) VALUES ('worker-01', 'RUNNING') RETURNING id"
        )
        job_id = cur.fetchone()[0]
        cur.execute(
            """
            INSERT INTO job_tables (job_id, table_name, start_block, current_block, tip_hash,
                                    files_count, total_size_bytes)
            VALUES (%s, %s, 0, %s, %s, %s, %s)
            """,
            (
                job_id,
                TABLE,
                first_hole * LENGTH - 1,
                block_hash(first_hole - 1),
                first_hole,
                first_hole * (first_hole + 1) // 2,
            ),
        )
        cur.execute(
            """
            INSERT INTO job_files (job_id, table_name, file_name, start_block, end_block,
                                   size_bytes, block_hash, prev_hash)
            SELECT %(job)s, %(table)s, 'm' || lpad(i::text, 5, '0'), i * %(len)s,
                   i * %(len)s + %(len)s - 1, i + 1,
                   '0x' || lpad(to_hex(i), 64, '0'),
                   CASE WHEN i > 0 THEN '0x' || lpad(to_hex(i - 1), 64, '0') END
            FROM generate_series(0, %(many)s - 1) AS i
            WHERE i <> ALL(%(holes)s)
            ORDER BY i
            """,
            {"job": job_id, "table": TABLE, "len": LENGTH, "many": MANY, "holes": holes},
        )
        # Statistics for the table as it now is, as a live database's describe its own:
        # those of an earlier test's few rows, before autovacuum came round, once led
        # PostgreSQL 18's planner to look files up by id through a skip scan of
        # job_files_chain, one pass over the index per lookup (a registration cancelled
        # at the 5 s statement timeout; stored_chain's join took 27 s).
        cur.execute("ANALYZE job_files, job_tables, job_chain")
    return job_id


def main_file(i: int, prefix: str = "m") -> dict:
    return {
        "file_name": f"{prefix}{i:05d}",
        "start_block": i * LENGTH,
        "end_block": i * LENGTH + LENGTH - 1,
        "size_bytes": i + 1,
        "block_hash": block_hash(i),
        "prev_hash": block_hash(i - 1) if i else None,
    }


def walked(files: list[dict]) -> tuple[dict, list[str]]:
    """The progress and the chain's file names, by chain.walk's rule (files in
    registration order; test_chain checks that rule against the reference)."""
    order = sorted(range(len(files)), key=lambda i: (files[i]["start_block"], -i))
    tip, names = None, []
    for i in order:
        f = chain.ChainFile(
            *(
                files[i][k]
                for k in ("start_block", "end_block", "size_bytes", "block_hash", "prev_hash")
            )
        )
        if tip is None or chain.links(tip, f):
            tip = chain.walk([f], tip)
            names.append(files[i]["file_name"])
    return expected_progress(
        tip.start_block, tip.current_block, tip.files_count, tip.total_size_bytes
    ), names


def test_out_of_order_into_twenty_thousand_files(client, db_conn):
    rng = random.Random(20_000)
    holes = sorted(rng.sample(range(1, MANY - 10), 30))
    again = next(i for i in range(holes[10] - 7, MANY) if i not in holes)
    job_id = seed_many(db_conn, holes)
    files = [main_file(i) for i in range(MANY) if i not in set(holes)]
    assert not chain_ready(db_conn, job_id)
    # The holes filled in a random order, with a losing fork, a re-registered range
    # and a reorg of the last files among them.
    later = [main_file(i) for i in holes]
    later.append(
        {
            **main_file(holes[5] + 3, "fork"),
            "end_block": holes[5] * LENGTH + 34,
            "prev_hash": block_hash(10**9),
        }
    )
    later.append({**main_file(again, "again"), "size_bytes": 10**6})
    rng.shuffle(later)
    reorg = [
        {
            **main_file(i, "reorg"),
            "block_hash": block_hash(10**9 + i),
            "prev_hash": block_hash(10**9 + i - 1 if i > MANY - 5 else i - 1),
        }
        for i in range(MANY - 5, MANY + 2)
    ]
    later.insert(len(later) // 2, reorg)
    for step in later:
        batch = step if isinstance(step, list) else [step]
        answered = register(client, job_id, batch)
        files += batch
        expected, names = walked(files)
        assert answered == expected, batch[0]["file_name"]
        assert progress_read(client, job_id) == expected
    assert stored_chain(db_conn, job_id) == names
    # Every main file up to the reorg, which replaced the last five and added two;
    # "again" in place of its main file, the fork lost.
    assert expected["files_count"] == MANY + 2
    assert f"again{again:05d}" in names and f"m{again:05d}" not in names


# ---- Databases and tables whose links are not (or no longer) kept --------------------


def test_a_database_from_before_job_chain_is_rebuilt_by_the_next_registration(client, db_conn):
    """job_files and job_tables as an earlier release left them: no links, chain_ready false."""
    others = [file("fork", 40, 44, 9, 777, 999), file("past", 200, 209, 5)]
    files = named([*linked(0, 12), *others, file("dup", 60, 69, 50, 6, 5)])
    with db_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO jobs (node_id, status) VALUES ('worker-01', 'RUNNING') RETURNING id"
        )
        job_id = cur.fetchone()[0]
        summary = reference_progress(files)
        cur.execute(
            "INSERT INTO job_tables (job_id, table_name, start_block, current_block, tip_hash,"
            " files_count, total_size_bytes) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (
                job_id,
                TABLE,
                summary["start_block"],
                summary["current_block"],
                reference_chain(files)[-1]["block_hash"],
                summary["files_count"],
                summary["total_size_bytes"],
            ),
        )
        for f in files:
            cur.execute(
                "INSERT INTO job_files (job_id, table_name, file_name, start_block, end_block,"
                " size_bytes, block_hash, prev_hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    job_id,
                    TABLE,
                    *(
                        f[k]
                        for k in (
                            "file_name",
                            "start_block",
                            "end_block",
                            "size_bytes",
                            "block_hash",
                            "prev_hash",
                        )
                    ),
                ),
            )
    assert not chain_ready(db_conn, job_id)
    assert stored_chain(db_conn, job_id) == []
    assert progress_read(client, job_id) == reference_progress(files)
    # A file before the tip: the table's links are rebuilt, then it is taken into account.
    late = [file("late", 70, 79, 1000, 7, 6)]
    files += late
    assert_canonical(client, db_conn, job_id, files, register(client, job_id, late))
    more = [file("m012", 120, 129, 1, 12, 11), file("fork2", 80, 84, 2)]
    files += more
    assert_canonical(client, db_conn, job_id, files, register(client, job_id, more))


# What the previous release ran to register a file: it knows neither job_chain nor
# chain_writes (store/files.py INSERT_FILES and chain._STORE_SUMMARY before them).
PREVIOUS_RELEASE_UPSERT = """
    INSERT INTO job_tables (job_id, table_name) VALUES (%s, %s)
    ON CONFLICT (job_id, table_name) DO UPDATE SET table_name = EXCLUDED.table_name
"""
PREVIOUS_RELEASE_SUMMARY = """
    UPDATE job_tables SET start_block = %s, current_block = %s, tip_hash = %s,
        files_count = %s, total_size_bytes = %s
    WHERE job_id = %s AND table_name = %s
"""


def previous_release_registers(db_conn, job_id: int, registered: list[dict], new: dict):
    with db_conn.cursor() as cur:
        cur.execute(PREVIOUS_RELEASE_UPSERT, (job_id, TABLE))
        cur.execute(
            "INSERT INTO job_files (job_id, table_name, file_name, start_block, end_block,"
            " size_bytes, block_hash, prev_hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (
                job_id,
                TABLE,
                *(
                    new[k]
                    for k in (
                        "file_name",
                        "start_block",
                        "end_block",
                        "size_bytes",
                        "block_hash",
                        "prev_hash",
                    )
                ),
            ),
        )
        summary = reference_progress([*registered, new])
        cur.execute(
            PREVIOUS_RELEASE_SUMMARY,
            (
                summary["start_block"],
                summary["current_block"],
                reference_chain([*registered, new])[-1]["block_hash"],
                summary["files_count"],
                summary["total_size_bytes"],
                job_id,
                TABLE,
            ),
        )


@pytest.mark.parametrize("summary_changes", [True, False])
def test_a_table_a_previous_release_wrote_to_is_rebuilt(client, db_conn, summary_changes):
    """During a rolling deploy the previous release keeps registering without job_chain:
    its first write clears chain_ready, and the next registration here rebuilds."""
    job_id = new_job(client)
    files = named(linked(0, 10))
    assert_canonical(client, db_conn, job_id, files, register(client, job_id, files))
    # The previous release registers a file: one that reorgs the chain, or a duplicate
    # of the first file, which changes the chain's files but not its summary.
    if summary_changes:
        theirs = file("theirs", 50, 54, 7, 555, 4)
    else:
        theirs = {**files[0], "file_name": "theirs"}
    previous_release_registers(db_conn, job_id, files, theirs)
    files.append(theirs)
    assert not chain_ready(db_conn, job_id)
    assert progress_read(client, job_id) == reference_progress(files)
    # This release's next registration, in the middle: rebuilt, then right.
    ours = [file("ours", 30, 39, 11, 3, 2)]
    files += ours
    assert_canonical(client, db_conn, job_id, files, register(client, job_id, ours))
    assert "theirs" in stored_chain(db_conn, job_id)


def test_init_db_again_keeps_the_links(client, db_conn, runner):
    job_id = new_job(client)
    files = named(linked(0, 10) + linked(11, 5))
    assert_canonical(client, db_conn, job_id, files, register(client, job_id, files))
    result = runner.invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
    assert chain_ready(db_conn, job_id)
    fill = linked(10, 1, prefix="fill")
    files += fill
    assert_canonical(client, db_conn, job_id, files, register(client, job_id, fill))
    assert progress_read(client, job_id) == expected_progress(0, 159, 16, sum(range(1, 17)))


# What this change added to the schema: taken off today's schema, it leaves a
# database as the previous release made it.
BEFORE_JOB_CHAIN = """
    DROP TABLE job_chain;
    DROP TRIGGER job_tables_chain_guard ON job_tables;
    DROP FUNCTION job_tables_chain_guard();
    ALTER TABLE job_tables DROP COLUMN chain_ready, DROP COLUMN chain_writes;
"""


def test_init_db_upgrades_a_database_made_before_job_chain(postgres_url):
    """A database of its own, made and filled by the previous release, then init-db."""
    admin = psycopg2.connect(postgres_url)
    admin.autocommit = True
    name = "jobs_before_job_chain"
    url = psycopg2.extensions.make_dsn(postgres_url, dbname=name)
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        cur.execute(f"CREATE DATABASE {name}")
    app = None
    try:
        init_db(url)
        conn = psycopg2.connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(BEFORE_JOB_CHAIN)
            cur.execute("INSERT INTO jobs (node_id, status) VALUES ('w', 'RUNNING') RETURNING id")
            job_id = cur.fetchone()[0]
        files = named(linked(0, 20) + linked(21, 9))  # a gap at 200-209
        for f in files:
            previous_release_registers(conn, job_id, files[: files.index(f)], f)
        conn.close()
        init_db(url)
        init_db(url)  # every deploy runs it
        app = create_app({"TESTING": True, "DATABASE_URL": url})
        client = app.test_client()
        assert progress_read(client, job_id) == reference_progress(files)
        conn = psycopg2.connect(url)
        conn.autocommit = True
        try:
            assert not chain_ready(conn, job_id)
            # The gap filled, and a re-registration before the tip in the same batch.
            later = [file("fill", 200, 209, 21, 20, 19), file("again", 50, 59, 99, 5, 4)]
            files += later
            assert_canonical(client, conn, job_id, files, register(client, job_id, later))
            assert progress_read(client, job_id) == expected_progress(
                0, 299, 30, sum(range(1, 31)) - 6 + 99
            )
        finally:
            conn.close()
    finally:
        if app is not None and "jobs_db_pool" in app.extensions:
            app.extensions["jobs_db_pool"].drop_idle()
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()
