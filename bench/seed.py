"""Fast SQL seeding of the project's own schema for the benchmark.

Jobs and their events are one INSERT ... SELECT over generate_series, so a
million jobs with ~3 million events take 10-20 s. The rows look like what the
service itself writes: a ~500-byte descriptor (see DESCRIPTOR), timestamps
ascending with the id, and the job_events history each status implies (creation plus one event
per transition), so bulk deletes cascade over realistic event counts.

Statuses are assigned deterministically from the id, so every run of a
scenario produces the very same table:

- ``weights`` (per mille) fill the table through a permutation of id % 1000,
  which gives exact proportions within every block of 1000 consecutive ids;
- ``spread`` places exactly ``count`` jobs evenly over the whole id range,
  cycling through its statuses, and takes precedence over ``weights`` (this
  is how "exactly 20 active jobs, some of them very old" is made).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

ACTIVE = ("SCHEDULED", "RUNNING", "STOP_REQUESTED", "STOPPING")

# The history each final status implies: the events the service appends on
# creation and on every transition that leads there (docs/API.md, Events).
EVENT_PATHS = {
    "SCHEDULED": ["SCHEDULED"],
    "RUNNING": ["SCHEDULED", "RUNNING"],
    "STOP_REQUESTED": ["SCHEDULED", "RUNNING", "STOP_REQUESTED"],
    "STOPPING": ["SCHEDULED", "RUNNING", "STOP_REQUESTED", "STOPPING"],
    "COMPLETED": ["SCHEDULED", "RUNNING", "COMPLETED"],
    "FAILED": ["SCHEDULED", "RUNNING", "FAILED"],
    "STOPPED": ["SCHEDULED", "RUNNING", "STOP_REQUESTED", "STOPPING", "STOPPED"],
}


# What an extraction job's descriptor holds: its block range and output, the
# columns to extract, and how to reach the node. ~500 bytes as JSON, which
# json.loads parses in ~3.2 us here (0.16 ms a page of 50 for the naive
# view): the issue's "psycopg2 parsing the JSONB column costs ~0.4 ms per
# page", scaled by its constant view's 2,600 req/s to this box's ~6,000.
DESCRIPTOR = """jsonb_build_object(
    'dataset', 'eth/mainnet',
    'table', (ARRAY['blocks', 'transactions', 'logs', 'traces'])[1 + mod(g, 4)],
    'start_block', g * 100000,
    'end_block', g * 100000 + 99999,
    'output', 's3://extract-bucket/eth/mainnet/' || lpad(g::text, 9, '0'),
    'priority', mod(g, 5),
    'format', 'parquet',
    'compression', 'zstd',
    'partition_blocks', 10000,
    'columns', jsonb_build_array('block_number', 'transaction_index', 'hash', 'from_address',
                                 'to_address', 'value', 'gas', 'gas_price', 'input'),
    'rpc', jsonb_build_object('endpoint', 'https://rpc.internal/eth',
                              'max_concurrency', 16, 'timeout_s', 30),
    'retry', jsonb_build_object('max_attempts', 5, 'backoff_s', 10))"""


@dataclass(frozen=True)
class Scenario:
    jobs: int
    weights: dict[str, int]
    spread: tuple[tuple[str, ...], int] | None = None
    description: str = field(default="", compare=False)

    def spread_ids(self) -> range:
        """The ids of the jobs placed by ``spread``, oldest first."""
        if self.spread is None:
            raise ValueError("this scenario spreads no jobs")
        stride = self.jobs // self.spread[1]
        return range(stride // 2, stride * self.spread[1], stride)


def scenarios(jobs: int = 1_000_000, bulk_delete: int = 500_000) -> dict[str, Scenario]:
    """The benchmark's tables; ``jobs`` and ``bulk_delete`` shrink them for a smoke run."""
    return {
        # The default listing must find 20 needles, some of them a million rows
        # deep, without reading the haystack.
        "mostly_terminal": Scenario(
            jobs=jobs,
            weights={"COMPLETED": 900, "FAILED": 70, "STOPPED": 30},
            spread=(ACTIVE, 20),
            description=f"{jobs:,} jobs, exactly 20 active spread over the whole id range",
        ),
        "mostly_active": Scenario(
            jobs=jobs,
            weights={
                "RUNNING": 600,
                "SCHEDULED": 380,
                "STOP_REQUESTED": 5,
                "STOPPING": 5,
                "COMPLETED": 6,
                "FAILED": 3,
                "STOPPED": 1,
            },
            description=f"{jobs:,} jobs, 99% active",
        ),
        # The general-purpose table: throughput runs, pgbench, the
        # status=completed deep cursor and status=scheduled,failed listings.
        "mixed": Scenario(
            jobs=jobs,
            weights={
                "COMPLETED": 700,
                "FAILED": 100,
                "STOPPED": 50,
                "RUNNING": 100,
                "SCHEDULED": 40,
                "STOP_REQUESTED": 5,
                "STOPPING": 5,
            },
            description=f"{jobs:,} jobs: 70% completed, 10% failed, 5% stopped, 15% active",
        ),
        # Exactly ``bulk_delete`` COMPLETED jobs to delete, interleaved with a
        # fifth as many active ones (every 6th id) that GET /jobs/{id} keeps
        # reading meanwhile.
        "bulk_delete": Scenario(
            jobs=bulk_delete * 6 // 5,
            weights={"COMPLETED": 1000},
            spread=(("RUNNING", "SCHEDULED"), bulk_delete // 5),
            description=f"{bulk_delete * 6 // 5:,} jobs: {bulk_delete:,} completed,"
            " every 6th id active",
        ),
    }


# The growth tables: one job in GROWTH_ACTIVE_EVERY is active (the default
# listing's needles, spread over the whole id range), the rest terminal, and
# every GROWTH_FILES_EVERY-th job has a table of GROWTH_FILES files. A job's
# row depends only on its id, so the 1M table grows into the 5M one.
GROWTH_ACTIVE_EVERY, GROWTH_FILES_EVERY, GROWTH_FILES = 1000, 100, 10


def growth_scenario(jobs: int) -> Scenario:
    if jobs % GROWTH_ACTIVE_EVERY:
        raise ValueError(f"growth sizes must be multiples of {GROWTH_ACTIVE_EVERY}")
    return Scenario(
        jobs=jobs,
        weights={"COMPLETED": 900, "FAILED": 70, "STOPPED": 30},
        spread=(ACTIVE, jobs // GROWTH_ACTIVE_EVERY),
        description=f"{jobs:,} jobs, one in {GROWTH_ACTIVE_EVERY:,} active,"
        f" every {GROWTH_FILES_EVERY}th with {GROWTH_FILES} files",
    )


@contextmanager
def secondary_indexes_dropped(conn, tables: tuple[str, ...]) -> Iterator:
    """Drop the indexes of ``tables`` that back no constraint, and rebuild them after.

    Building an index once over the loaded rows (sorted, in parallel, with
    a large maintenance_work_mem) beats maintaining it row by row. The
    definitions are read from the catalog, so the schema stays schema.sql's.
    """
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
            FROM pg_index i
            WHERE i.indrelid = ANY(%s::regclass[])
              AND NOT EXISTS (SELECT FROM pg_constraint c WHERE c.conindid = i.indexrelid)
            """,
            (list(tables),),
        )
        indexes = cur.fetchall()
        for name, _ in indexes:
            cur.execute(f"DROP INDEX {name}")
    try:
        yield
    finally:
        with conn.cursor() as cur:
            cur.execute("SET maintenance_work_mem = '1GB'")
            cur.execute("SET max_parallel_maintenance_workers = 2")
            for _, definition in indexes:
                cur.execute(definition)
            cur.execute("RESET maintenance_work_mem")
            cur.execute("RESET max_parallel_maintenance_workers")


def _status_sql(scenario: Scenario) -> str:
    """A SQL expression of ``g`` (the job id) giving the job's status."""
    if sum(scenario.weights.values()) != 1000:
        raise ValueError("weights must add up to 1000 per mille")
    whens = []
    if scenario.spread:
        statuses, count = scenario.spread
        stride = scenario.jobs // count
        array = "ARRAY[" + ", ".join(f"'{s}'" for s in statuses) + "]"
        # Slots at stride/2, stride*1.5, ...: never the newest id, and the
        # oldest slot sits half a stride from the start of the table.
        whens.append(
            f"WHEN mod(g, {stride}) = {stride // 2} AND g / {stride} < {count} "
            f"THEN ({array})[1 + mod(g / {stride}, {len(statuses)})]"
        )
    # 761 is coprime with 1000, so mod(g * 761, 1000) visits every residue once
    # per 1000 ids: exact proportions without clustering statuses by id.
    bound = 0
    for status, weight in scenario.weights.items():
        bound += weight
        whens.append(f"WHEN mod(g * 761, 1000) < {bound} THEN '{status}'")
    return "CASE " + " ".join(whens) + " END"


def _events_sql() -> str:
    """A SQL expression of ``j.status`` giving its event types, oldest first."""
    whens = " ".join(
        f"WHEN '{status}' THEN ARRAY[" + ", ".join(f"'{e}'" for e in path) + "]"
        for status, path in EVENT_PATHS.items()
    )
    return f"CASE j.status {whens} END"


@contextmanager
def _bulk_load(conn) -> Iterator:
    """A cursor with foreign-key triggers off: the rows are consistent by construction.

    Checking each of millions of job_events rows against jobs one at a time
    doubles the seeding time. Needs a superuser, which the throwaway server's is.
    """
    with conn.cursor() as cur:
        cur.execute("SET session_replication_role = replica")
        try:
            yield cur
        finally:
            cur.execute("RESET session_replication_role")


def reset(conn) -> None:
    with conn.cursor() as cur:
        cur.execute(
            "TRUNCATE jobs, job_events, job_tables, job_files, job_chain RESTART IDENTITY CASCADE"
        )


def seed(conn, scenario: Scenario) -> None:
    """Replace the database's contents with ``scenario``'s jobs and events."""
    reset(conn)
    add_jobs(conn, scenario)
    vacuum_analyze(conn)


def add_jobs(conn, scenario: Scenario, first: int = 1, last: int | None = None) -> None:
    """Insert jobs ``first``..``last`` (default all) of ``scenario``, with their events.

    A job's row depends only on its id (and the scenario's weights and
    stride), so a table can be grown by calling this again with a larger
    scenario and ``first`` past the last id.
    """
    with _bulk_load(conn) as cur:
        # Jobs are created a second apart and finish within minutes; the
        # descriptor is shaped like a real extraction job's (DESCRIPTOR).
        cur.execute(
            f"""
            WITH j AS (
                INSERT INTO jobs (id, created_at, updated_at, node_id, status, descriptor)
                SELECT g,
                       timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second',
                       timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second'
                           + mod(g, 600) * interval '1 second',
                       'worker-' || lpad(mod(g, 64)::text, 2, '0'),
                       {_status_sql(scenario)},
                       {DESCRIPTOR}
                FROM generate_series(%(first)s::bigint, %(last)s) AS g
                RETURNING id, created_at, node_id, status
            )
            INSERT INTO job_events (job_id, created_at, event_type, node_id)
            SELECT j.id, j.created_at + (e.step - 1) * interval '10 seconds', e.event_type,
                   j.node_id
            FROM j, unnest({_events_sql()}) WITH ORDINALITY AS e(event_type, step)
            """,
            {"first": first, "last": scenario.jobs if last is None else last},
        )
        # Ids were given explicitly: let POST /jobs continue after them.
        cur.execute("SELECT setval(pg_get_serial_sequence('jobs', 'id'), %s)", (scenario.jobs,))


# The seeded chains are clean: every file is one of its chain's files (schema.sql, job_chain).
CHAIN_OF_EVERY_FILE = """
    INSERT INTO job_chain (job_id, table_name, start_block, file_id, size_bytes)
    SELECT job_id, table_name, start_block, id, size_bytes FROM job_files
"""


def add_files(conn, first: int, last: int, every: int, files: int, blocks_per_file: int = 1000):
    """Give every ``every``-th job of ``first``..``last`` one table of ``files`` files.

    The chain is clean and job_tables holds its summary, and job_chain its
    files, as the service maintains them; the files' hashes follow :func:`chain_hash`.
    """
    hash_sql = "'0x' || rpad(encode(convert_to('blocks:' || {i}, 'UTF8'), 'hex'), 64, '0')"
    params = {"first": first, "last": last, "every": every, "files": files, "bpf": blocks_per_file}
    with _bulk_load(conn) as cur:
        cur.execute(
            f"""
            INSERT INTO job_tables (job_id, table_name, start_block, current_block, tip_hash,
                                    files_count, total_size_bytes, chain_ready)
            SELECT g, 'blocks', 0, %(files)s * %(bpf)s - 1,
                   {hash_sql.format(i="(%(files)s - 1)")}, %(files)s,
                   %(files)s * 110000000::numeric, true
            FROM generate_series(%(first)s::bigint, %(last)s) AS g
            WHERE mod(g, %(every)s) = 0
            """,
            params,
        )
        cur.execute(
            f"""
            INSERT INTO job_files (job_id, table_name, file_name, start_block, end_block,
                                   size_bytes, block_hash, prev_hash)
            SELECT g, 'blocks', 'blocks_' || lpad(i::text, 9, '0') || '.parquet',
                   i * %(bpf)s, i * %(bpf)s + %(bpf)s - 1, 110000000,
                   {hash_sql.format(i="i")},
                   CASE WHEN i > 0 THEN {hash_sql.format(i="(i - 1)")} END
            FROM generate_series(%(first)s::bigint, %(last)s) AS g,
                 generate_series(0, %(files)s - 1) AS i
            WHERE mod(g, %(every)s) = 0
            """,
            params,
        )
        cur.execute(CHAIN_OF_EVERY_FILE + " WHERE job_id BETWEEN %(first)s AND %(last)s", params)


def vacuum_analyze(conn) -> None:
    """Bring the table to the state autovacuum keeps it in on a live system.

    Without it the first reads of every page set hint bits (writes) and the
    planner sees an empty table, both of which distort the first measurements.
    """
    autocommit = conn.autocommit
    conn.autocommit = True  # VACUUM refuses to run inside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute("VACUUM (ANALYZE) jobs, job_events, job_tables, job_files, job_chain")
    finally:
        conn.autocommit = autocommit


def chain_hash(table: str, index: int) -> str:
    """The block hash of the ``index``-th file of ``table`` in the seeded chain."""
    return "0x" + f"{table}:{index}".encode().hex().ljust(64, "0")[:64]


def seed_progress_job(conn, tables: int, files_per_table: int, blocks_per_file: int = 1000) -> int:
    """Add one RUNNING job with ``tables`` x ``files_per_table`` files in one clean chain.

    The job_tables summary and the chain's files in job_chain are written as
    the service would have maintained them while the files were registered one
    batch at a time, so progress can be read at once and the next registration
    finds the chain as the service keeps it; a later reorg goes through the
    service's own endpoint.
    Hashes are computed in SQL with the same formula as :func:`chain_hash`.
    """
    hash_sql = "'0x' || rpad(encode(convert_to(t.name || ':' || {i}, 'UTF8'), 'hex'), 64, '0')"
    with _bulk_load(conn) as cur:
        cur.execute(
            """
            INSERT INTO jobs (node_id, status, descriptor)
            VALUES ('worker-progress', 'RUNNING', '{"dataset": "eth/mainnet"}')
            RETURNING id
            """
        )
        job_id = cur.fetchone()[0]
        cur.execute(
            "INSERT INTO job_events (job_id, event_type, node_id)"
            " SELECT %s, e, 'worker-progress' FROM unnest(ARRAY['SCHEDULED', 'RUNNING']) e",
            (job_id,),
        )
        cur.execute(
            f"""
            INSERT INTO job_tables (job_id, table_name, start_block, current_block, tip_hash,
                                    files_count, total_size_bytes, chain_ready)
            SELECT %(job)s, t.name, 0, %(files)s * %(bpf)s - 1,
                   {hash_sql.format(i="(%(files)s - 1)")},
                   %(files)s, %(files)s * 110000000::numeric, true
            FROM (SELECT 'table_' || n AS name FROM generate_series(0, %(tables)s - 1) n) t
            """,
            {"job": job_id, "tables": tables, "files": files_per_table, "bpf": blocks_per_file},
        )
        cur.execute(
            f"""
            INSERT INTO job_files (job_id, table_name, file_name, start_block, end_block,
                                   size_bytes, block_hash, prev_hash)
            SELECT %(job)s, t.name, t.name || '_' || lpad(i::text, 9, '0') || '.parquet',
                   i * %(bpf)s, i * %(bpf)s + %(bpf)s - 1, 110000000,
                   {hash_sql.format(i="i")},
                   CASE WHEN i > 0 THEN {hash_sql.format(i="(i - 1)")} END
            FROM (SELECT 'table_' || n AS name FROM generate_series(0, %(tables)s - 1) n) t,
                 generate_series(0, %(files)s - 1) AS i
            """,
            {"job": job_id, "tables": tables, "files": files_per_table, "bpf": blocks_per_file},
        )
        cur.execute(CHAIN_OF_EVERY_FILE + " WHERE job_id = %(job)s", {"job": job_id})
    vacuum_analyze(conn)
    return job_id
