"""Registering one file before the tip of a 200,000-file table, through the service.

    python -m bench.register    # this measurement alone: its own PostgreSQL and service

One RUNNING job with one table of 200,000 files in one clean, hash-linked
chain, seeded with SQL as the service keeps it (seed.seed_progress_job:
the files, the job_tables summary and the chain's files in job_chain).
Then one client POSTs single files, one request at a time, each
re-registering a range in the middle of the chain under a new name with the
same hashes, as a worker re-extracting a range does: the newest file at its
start, it links, and the chain goes on through it to the next file. Until
registrations re-walked the whole table for a file before the tip, each of
these cost a walk over 200,000 files.

The figure, ``file_register_200k_ms``, is the p50 of those requests (the
HTTP round trip included). Afterwards the table must still count 200,000
files up to the same block, with the same total size: anything else is a
problem, reported as a note.
"""

from __future__ import annotations

import random
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench import seed
from bench.console import say
from bench.load import get_json, request
from bench.servers import ROOT, connect, service_launch, start_postgres, start_server

FILES = 200_000
BLOCKS_PER_FILE = 1000  # seed.seed_progress_job's default
SIZE = 110_000_000  # each seeded file's size_bytes
SAMPLES, WARMUP, MAX_SECONDS = 50, 3, 10.0


@dataclass
class Registration:
    files: int
    p50_ms: float
    samples: int
    seed_s: float
    problems: list[str] = field(default_factory=list)


def measure_registration(conn, port: int) -> Registration:
    """Seed the table into the database behind ``conn``, then time POSTs to the service."""
    started = time.monotonic()
    job_id = seed.seed_progress_job(conn, 1, FILES, BLOCKS_PER_FILE)
    seed_s = time.monotonic() - started
    table = "table_0"
    path = f"/jobs/{job_id}/tables/{table}/files"
    rng = random.Random(FILES)
    timings, problems = [], []
    deadline = time.monotonic() + MAX_SECONDS
    for n in range(WARMUP + SAMPLES):
        i = rng.randrange(1, FILES - 1)
        status, seconds = request(
            port,
            "POST",
            path,
            {
                "file_name": f"{table}_{i:09d}_again_{n}.parquet",
                "start_block": i * BLOCKS_PER_FILE,
                "end_block": (i + 1) * BLOCKS_PER_FILE - 1,
                "size_bytes": SIZE,
                "block_hash": seed.chain_hash(table, i),
                "prev_hash": seed.chain_hash(table, i - 1),
            },
        )
        if status != 201:
            problems.append(f"Registering a file before the tip answered HTTP {status}.")
        if n >= WARMUP:
            timings.append(seconds)
            if time.monotonic() > deadline:
                break
    progress = get_json(port, f"/jobs/{job_id}/progress")["tables"].get(table, {})
    expected = {
        "start_block": 0,
        "current_block": FILES * BLOCKS_PER_FILE - 1,
        "files_count": FILES,
        "total_size_bytes": FILES * SIZE,
    }
    if progress != expected:
        problems.append(
            f"After registering files before the tip, progress reads {progress},"
            f" expected {expected}."
        )
    return Registration(FILES, statistics.median(timings) * 1000, len(timings), seed_s, problems)


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="jobs-bench-register-"))
    # As root, devdb runs the server as another user, who must reach its datadir.
    workdir.chmod(0o711)
    try:
        with ExitStack() as stack:
            say(f"Starting PostgreSQL and the service in {workdir}")
            pg = start_postgres(workdir)
            stack.callback(pg.destroy)
            conn = connect(pg.url)
            with conn.cursor() as cur:
                cur.execute((ROOT / "schema.sql").read_text())
            server = start_server("service", service_launch(workers=2), pg.url, workdir)
            stack.callback(server.stop)
            result = measure_registration(conn, server.port)
    except BaseException:
        print(f"Bench failed; the service's log is kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    say(f"seeded {result.files:,} files in {result.seed_s:.1f} s")
    for problem in result.problems:
        print(f"- {problem}")
    print(f"bench: file_register_200k_ms={result.p50_ms:.2f} (p50 over {result.samples} requests)")


if __name__ == "__main__":
    main()
