"""The growth scenario: the same reads at 1M and at 5M jobs, then pruning them.

The growth table (seed.growth_scenario) is mostly terminal, one job in
1,000 active and spread over the whole id range, ~3 events per job, and
every 100th job with a table of 10 files. At each size it measures the
single-client p50 of four listings, GET /jobs/{id} over ids spread across
the table, the progress of a job with 10 x 10,000 files and a worker's
status report (PUT /jobs/{id}/status, SCHEDULED -> RUNNING, a different job
each time). Then it prunes: DELETE /jobs?status=terminal, repeated while the
service answers 200 or 202 (a batch deleted, more remain) until 204, while
wrk reads active jobs; it records the total time and the reads' p99.

Seeding is pure SQL (seed.add_jobs, seed.add_files) in two sessions over
halves of the id range, with the indexes that back no constraint dropped
during the load and rebuilt after it (seed.secondary_indexes_dropped); the
1M table grows into the 5M one by adding ids 1M+1..5M. Measured on this
2-core box while other work kept its load average at ~6: 1M jobs in 46 s,
then 1M -> 5M in 185 s (5,000,000 jobs, 15.3M events, 50,000 job_tables and
500,000 job_files rows, a 9 GB database; every table logged and every index
back afterwards). Dropping the indexes saved 15-25% (300k jobs: 14-17 s
against 18-19 s with them); each row's cost is mostly the job_json trigger
and the descriptor, which stay as the service writes them.
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from dataclasses import dataclass, field

from bench import seed
from bench.console import say
from bench.load import Load, Probe, id_script, load_during, request, single_client
from bench.servers import connect

PROGRESS_TABLES, PROGRESS_FILES = 10, 10_000
# The progress job takes an id beyond any the growth seeds, so that the 1M
# table can still grow by explicit ids.
PROGRESS_JOB_ID_FLOOR = 10**12
STATUS_REPORTS = 200
PRUNE_LIMIT_S = 3600  # give up (and say so) rather than loop forever
READ_PATHS = 200  # GET /jobs/{id} over this many ids spread over the table


@dataclass
class Stage:
    """The reads at one table size."""

    jobs: int
    seed_s: float
    probes: dict[str, Probe] = field(default_factory=dict)


@dataclass
class Prune:
    status: str  # the last answer's status, or "none" when a request failed
    rounds: int
    seconds: float | None
    deleted: int | None  # as the answers' bodies counted, when they say
    terminal_left: int
    reads: Load


def listings(small_jobs: int) -> dict[str, str]:
    """The growth's listings: label -> path (the same paths at both sizes)."""
    return {
        "default list, 0.1% active": "/jobs",
        "status=terminal (nearly every job)": "/jobs?status=terminal",
        # The same old cursor at both sizes: deeper in the larger table.
        "status=completed, deep cursor": f"/jobs?status=completed&last_job_id={small_jobs // 100}",
        "status=scheduled,failed": "/jobs?status=scheduled,failed",
    }


def grow(url: str, first: int, last: int) -> float:
    """Add the growth table's jobs ``first``..``last`` (and their files); returns seconds."""
    started = time.monotonic()
    scenario = seed.growth_scenario(last)
    middle = first + (last - first) // 2
    conn = connect(url)
    failures: list[BaseException] = []

    def load(lo: int, hi: int) -> None:
        # One session per half: the inserts are CPU-bound in the backend,
        # and a single INSERT ... SELECT runs on one core.
        try:
            session = connect(url)
            try:
                seed.add_jobs(session, scenario, lo, hi)
                seed.add_files(session, lo, hi, seed.GROWTH_FILES_EVERY, seed.GROWTH_FILES)
            finally:
                session.close()
        except BaseException as exc:
            failures.append(exc)

    with seed.secondary_indexes_dropped(conn, ("jobs", "job_events", "job_files")):
        halves = [
            threading.Thread(target=load, args=(first, middle)),
            threading.Thread(target=load, args=(middle + 1, last)),
        ]
        for half in halves:
            half.start()
        for half in halves:
            half.join()
    if failures:
        raise failures[0]
    with conn.cursor() as cur:
        cur.execute("SELECT setval(pg_get_serial_sequence('jobs', 'id'), %s)", (last,))
    seed.vacuum_analyze(conn)
    conn.close()
    return time.monotonic() - started


def scheduled_ids(first: int, last: int) -> list[int]:
    """The SCHEDULED jobs among ids ``first``..``last`` of the growth table, as seeded."""
    every = seed.GROWTH_ACTIVE_EVERY
    return [
        g
        for g in range(first - first % every + every // 2, last + 1, every)
        if g >= first and seed.ACTIVE[(g // every) % len(seed.ACTIVE)] == "SCHEDULED"
    ]


def status_reports(port: int, job_ids: list[int]) -> Probe:
    """Single-client p50 of PUT /jobs/{id}/status moving each job SCHEDULED -> RUNNING."""
    timings, bad = [], {}
    for job_id in job_ids[:STATUS_REPORTS]:
        status, seconds = request(port, "PUT", f"/jobs/{job_id}/status", {"status": "RUNNING"})
        if status != 200:
            bad[status] = bad.get(status, 0) + 1
        timings.append(seconds)
    return Probe(statistics.median(timings) * 1000 if timings else float("nan"), len(timings), bad)


def measure(port: int, stage: Stage, small_jobs: int, progress_job: int, scheduled: list[int]):
    for label, path in listings(small_jobs).items():
        stage.probes[label] = single_client(port, path)
    step = max(1, stage.jobs // READ_PATHS)
    stage.probes["GET /jobs/{id}"] = single_client(
        port, [f"/jobs/{i}" for i in range(step // 2 + 1, stage.jobs + 1, step)]
    )
    stage.probes["progress, 10 x 10,000 files"] = single_client(
        port, f"/jobs/{progress_job}/progress"
    )
    stage.probes["PUT /jobs/{id}/status"] = status_reports(port, scheduled)
    say(
        f"growth at {stage.jobs:,} jobs: "
        + ", ".join(f"{k} {v.p50_ms:.2f} ms" for k, v in stage.probes.items())
    )


def prune(conn, port: int, jobs: int) -> Prune:
    """DELETE /jobs?status=terminal until 204, while wrk -c2 reads active jobs."""
    outcome = {"status": "none", "rounds": 0, "seconds": None, "deleted": None}

    def delete_all() -> None:
        started = time.monotonic()
        while time.monotonic() - started < PRUNE_LIMIT_S:
            conn_http = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
            try:
                conn_http.request("DELETE", "/jobs?status=terminal")
                response = conn_http.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                outcome["status"] = f"none ({exc!r})"
                return
            finally:
                conn_http.close()
            outcome["rounds"] += 1
            outcome["status"] = str(response.status)
            if response.status not in (200, 202):
                break
            try:
                deleted = json.loads(body).get("deleted")
            except (ValueError, AttributeError):
                deleted = None
            if isinstance(deleted, int):
                outcome["deleted"] = (outcome["deleted"] or 0) + deleted
        if outcome["status"] == "204":
            outcome["seconds"] = time.monotonic() - started

    active = seed.growth_scenario(jobs).spread_ids()
    reads = load_during(f"http://127.0.0.1:{port}/", 2, id_script(active, "/jobs/{id}"), delete_all)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM jobs WHERE status IN ('COMPLETED', 'FAILED', 'STOPPED')")
        terminal_left = cur.fetchone()[0]
    return Prune(reads=reads, terminal_left=terminal_left, **outcome)


def run_growth(bench, sizes: tuple[int, int]) -> tuple[list[Stage], Prune | None]:
    """The growth scenario on ``bench``'s database and service (see the module's doc)."""
    small, large = sizes
    seed.reset(bench.conn)
    stages = [Stage(small, grow(bench.pg.url, 1, small))]
    with bench.conn.cursor() as cur:
        cur.execute(
            "SELECT setval(pg_get_serial_sequence('jobs', 'id'), %s)", (PROGRESS_JOB_ID_FLOOR,)
        )
    progress_job = seed.seed_progress_job(bench.conn, PROGRESS_TABLES, PROGRESS_FILES)
    say(f"seeded growth: {small:,} jobs in {stages[0].seed_s:.1f} s")
    if bench.service is None:
        return stages, None
    port = bench.service.port
    measure(port, stages[0], small, progress_job, scheduled_ids(1, small))
    stages.append(Stage(large, grow(bench.pg.url, small + 1, large)))
    say(f"grew to {large:,} jobs in {stages[1].seed_s:.1f} s")
    measure(port, stages[1], small, progress_job, scheduled_ids(small + 1, large))
    pruned = prune(bench.conn, port, large)
    say(
        f"prune: HTTP {pruned.status} after {pruned.rounds} requests in"
        f" {'n/a' if pruned.seconds is None else f'{pruned.seconds:.1f}'} s;"
        f" read p99 meanwhile {pruned.reads.p99_ms:.2f} ms"
    )
    return stages, pruned
