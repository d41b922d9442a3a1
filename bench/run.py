"""`make bench`: the Jobs service under load, measured against its floors in one run.

    python -m bench.run [--duration 10] [--connections 4] [--service auto|app|naive]
                        [--jobs 1000000] [--bulk-delete 500000] [--leak-requests 100000]
                        [--no-pgbouncer] [--no-slow-clients] [--no-growth]
                        [--growth-jobs 1000000 5000000] [--only retries]

One run starts a throwaway PostgreSQL (devdb.LocalPostgres, non-durable),
applies schema.sql, seeds each scenario with SQL (seed.py), serves the
service under its production gunicorn config (gunicorn.conf.py, wsgi:app)
and the two floors under the same worker settings (constant_app.py,
naive_app.py), and measures:

- throughput and p50/p99 with wrk of GET /jobs?limit=50 and GET /jobs/{id},
  for the service and its floors, plus pgbench on each app's own list SQL;
- single-client p50 of the four skew listings, with EXPLAIN (ANALYZE,
  BUFFERS) of the SQL each one ran and a check that none reads the table;
- single-client p50 of the progress of a job with 10 x 10,000 files, before
  and right after a reorg registered through the service;
- single-client p50 of registering one file before the tip of a table of
  200,000 files (register.py);
- the duration of DELETE /jobs?status=completed over 500,000 jobs, and the
  GET /jobs/{id} p99 that wrk sees meanwhile;
- a worker's RSS after 1,000 and after 100,000 requests;
- the list and get throughput again with the service's DATABASE_URL at a
  local PgBouncer in transaction pooling mode (through_pgbouncer.py);
- the list and get throughput with the operators' reads on a hot standby,
  next to primary-only, and the writes across a failover (replicas.py);
- waiting without polling (waiting.py): the time from a POST /jobs to the
  answer of the heartbeat waiting for it, directly and through PgBouncer, and
  GET /jobs/{id} throughput and memory with 1,000 heartbeats waiting;
- the same reads at 1M and at 5M jobs, then the time to prune the terminal
  jobs through the API and the read p99 meanwhile (growth.py);
- the retry sweep retrying 500 due jobs and finding none due on the mixed
  table, and a status report's throughput naming its worker and attempt
  against without (retries.py). ``--only retries`` seeds the mixed table and
  runs just that.

It prints the tables, writes them with the plans to bench/results/latest.md
(the source for BENCHMARKS.md), and prints the summary line last.

--service: ``auto`` (default) measures the service when wsgi.py exists and
prints n/a for it otherwise; ``app`` insists on it; ``naive`` serves
naive_app.py in its place, which exercises the whole harness before the
service exists.

The SQL behind a request is captured from the server, not taken from the
app's code (plans.py), and pgbench replays it with its values written in,
prepared as the service runs it.

This file is the orchestration: the scenarios, in order, each a function
given the run's context (context.Bench: its PostgreSQL, servers and results).
The rest of the harness: load.py (wrk, single-client probes, pgbench), servers.py
(PostgreSQL, and the floors' options for dev/gunicorn.py, which runs every
app under gunicorn), plans.py (auto_explain capture and
plan analysis), report.py (tables, verdicts, summary line), seed.py (the
tables), through_pgbouncer.py, replicas.py, growth.py, register.py and
waiting.py (those scenarios),
console.py (progress).

Everything shares two cores: wrk runs one thread, and numbers are only
compared within the same run.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench import replicas, seed
from bench.console import fmt, say
from bench.context import Bench, Skew
from bench.growth import run_growth
from bench.load import (
    ensure_wrk,
    get_json,
    id_script,
    load_during,
    pgbench,
    request,
    run_wrk_until,
    single_client,
)
from bench.plans import jobs_rows_read
from bench.register import measure_registration
from bench.report import report
from bench.retries import run_retries
from bench.servers import ROOT, rss_kib
from bench.slow_clients import slow_clients
from bench.through_pgbouncer import through_pgbouncer
from bench.waiting import run_waiting
from dev.gunicorn import Server

RESULTS = ROOT / "bench" / "results" / "latest.md"

PROGRESS_TABLES, PROGRESS_FILES = 10, 10_000
REORG_FROM, REORG_FILES = 5_000, 100  # rewrite files 5000..5099 of table_0


# ---- The phases run here (the others have modules of their own) --------------------------


def skew(bench: Bench, label: str, scenario: str, path: str) -> None:
    """Single-client p50 of a listing, and the plans of the service's SQL."""
    entry = Skew(label, scenario, path)
    entry.naive = single_client(bench.servers["naive"].port, path)
    if bench.service is not None:
        entry.service = single_client(bench.service.port, path)
        statements = bench.plans.capture(lambda: request(bench.service.port, "GET", path))
        entry.table_rows = bench.table_rows()
        for statement in statements:
            entry.plans.append(
                (
                    f"{statement.shown()}\n\n{statement.plan_text}",
                    jobs_rows_read(statement.plan_json),
                )
            )
    bench.skews.append(entry)
    say(
        f"{label}: service p50 {fmt(entry.service and entry.service.p50_ms)} ms,"
        f" naive p50 {entry.naive.p50_ms:.2f} ms"
    )


def throughput(bench: Bench) -> None:
    for app, server in bench.servers.items():
        for endpoint in bench.throughput_endpoints():
            if app in ("constant", "naive+deadline") and endpoint != "GET /jobs/{id}":
                continue
            bench.loads[(app, endpoint)] = bench.wrk_endpoint(app, server, endpoint)


def run_replicas(bench: Bench) -> None:
    """Replica reads over the mixed table next to primary-only, and a failover."""
    if bench.service is None:
        return

    def serve(name: str, url: str, env: dict[str, str]) -> Server:
        return bench.serve(name, bench.service_launch(workers=2), url, env)

    bench.replicas = replicas.run(
        bench.pg,
        bench.workdir,
        serve,
        bench.throughput_endpoints(),
        bench.args.duration,
        bench.args.connections,
    )


def pgbench_lists(bench: Bench) -> None:
    """pgbench on the very SQL each app runs for GET /jobs?limit=50."""
    for app in ("naive", "service"):
        server = bench.servers.get(app)
        if server is None:
            continue
        statements = bench.plans.capture(
            lambda server=server: request(server.port, "GET", "/jobs?limit=50")
        )
        bench.tps[app] = pgbench(
            bench.pg.url,
            [s.replay for s in statements],
            bench.args.duration,
            bench.args.connections,
            bench.workdir,
            prepared=any(s.prepared for s in statements),
        )
        say(f"pgbench {app} list SQL: {bench.tps[app]:.0f} tps")


def progress_and_reorg(bench: Bench, job_id: int) -> None:
    path = f"/jobs/{job_id}/progress"
    for app in ("naive", "service"):
        server = bench.servers.get(app)
        if server is not None:
            bench.progress[f"{app} before reorg"] = single_client(server.port, path)
    if bench.service is None:
        return
    files, prev = [], seed.chain_hash("table_0", REORG_FROM - 1)
    for i in range(REORG_FROM, REORG_FROM + REORG_FILES):
        block_hash = seed.chain_hash("table_0-reorg", i)
        files.append(
            {
                "file_name": f"table_0_{i:09d}_reorg.parquet",
                "start_block": i * 1000,
                "end_block": i * 1000 + 999,
                "size_bytes": 120_000_000,
                "block_hash": block_hash,
                "prev_hash": prev,
            }
        )
        prev = block_hash
    status, seconds = request(
        bench.service.port, "POST", f"/jobs/{job_id}/tables/table_0/files", files
    )
    bench.delete["reorg_status"], bench.delete["reorg_s"] = status, seconds
    bench.progress["service after reorg"] = single_client(bench.service.port, path)
    # The reorg replaced file 5000 onwards, and the old files after it no
    # longer link: the chain now ends with the last reorg file.
    table = get_json(bench.service.port, path)["tables"].get("table_0", {})
    expected = REORG_FROM + REORG_FILES
    if table.get("files_count") != expected:
        bench.notes.append(
            f"Progress after the reorg counts {table.get('files_count')}"
            f" files in table_0, expected {expected}."
        )
    say("progress p50: " + ", ".join(f"{k} {v.p50_ms:.2f} ms" for k, v in bench.progress.items()))


def file_register(bench: Bench) -> None:
    """Registering one file before the tip of a 200,000-file table (register.py)."""
    if bench.service is None:
        return
    bench.registration = measure_registration(bench.conn, bench.service.port)
    bench.notes += bench.registration.problems
    say(
        f"file registration before the tip of {bench.registration.files:,} files:"
        f" p50 {bench.registration.p50_ms:.2f} ms over {bench.registration.samples} requests"
    )


def leak(bench: Bench, progress_job: int) -> None:
    """A worker's RSS after 1,000 and after ``--leak-requests`` requests.

    A dedicated service with one worker, so that every request lands on
    the worker being measured; the routes rotate through listings, gets,
    progress, a 404 and a 400.
    """
    launch = bench.service_launch(workers=1)
    if launch is None:
        return
    server = bench.serve("service-1-worker", launch)
    ids = range(1, bench.scenarios["mixed"].jobs + 1)
    paths = [
        "/jobs?limit=50",
        "/jobs/{id}",
        f"/jobs/{progress_job}/progress",
        "/jobs?status=completed&last_job_id={id}",
        "/jobs/{id}00000000",
        "/jobs/not-a-number",
    ]
    marker = bench.workdir / "wrk.done"
    samples = {}
    for label, count in (("1k", 1_000), ("total", bench.args.leak_requests - 1_000)):
        run_wrk_until(
            server.url,
            bench.args.connections,
            id_script(ids, *paths, stop_after=count, marker=str(marker)),
            marker,
        )
        (worker,) = server.workers()
        samples[label] = (worker, rss_kib(worker))
    if samples["1k"][0] != samples["total"][0]:
        bench.notes.append(
            "The worker was replaced during the RSS run (max_requests?):"
            " its growth cannot be measured."
        )
        return
    bench.rss = {"after_1k_kib": samples["1k"][1], "after_all_kib": samples["total"][1]}
    say(
        f"RSS {bench.rss['after_1k_kib']} KiB after 1,000 requests,"
        f" {bench.rss['after_all_kib']} KiB after {bench.args.leak_requests:,}"
    )
    server.stop()


def bulk_delete(bench: Bench) -> None:
    """DELETE /jobs?status=completed while wrk reads surviving jobs."""
    if bench.service is None:
        return
    ids = bench.scenarios["bulk_delete"].spread_ids()
    outcome: dict[str, object] = {}

    def delete() -> None:
        try:
            outcome["status"], outcome["seconds"] = request(
                bench.service.port, "DELETE", "/jobs?status=completed"
            )
        except (OSError, http.client.HTTPException) as exc:
            # Most likely gunicorn's timeout killing the worker mid-delete.
            bench.notes.append(f"DELETE /jobs?status=completed got no answer: {exc!r}")
            outcome["status"], outcome["seconds"] = "none", None

    # Two connections: one per worker, one of which is busy deleting.
    load = load_during(
        bench.service.url,
        2,
        id_script(ids, "/jobs/{id}"),
        delete,
        warmup_s=min(2, bench.args.duration),
    )
    status, seconds = outcome["status"], outcome["seconds"]
    with bench.conn.cursor() as cur:
        cur.execute("SELECT count(*) FILTER (WHERE status = 'COMPLETED'), count(*) FROM jobs")
        completed_left, jobs_left = cur.fetchone()
    bench.delete.update(
        status=status,
        seconds=seconds,
        p99_ms=load.p99_ms,
        p50_ms=load.p50_ms,
        reads=load.requests,
        errors=load.errors,
        completed_left=completed_left,
        jobs_left=jobs_left,
    )
    say(
        f"bulk delete: HTTP {status} in {fmt(seconds, 1)} s; GET p99 meanwhile"
        f" {load.p99_ms:.2f} ms over {load.requests} reads"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration", type=int, default=10, help="seconds per wrk and pgbench run (default 10)"
    )
    parser.add_argument(
        "--connections", type=int, default=4, help="wrk and pgbench connections (default 4)"
    )
    parser.add_argument(
        "--service",
        choices=["auto", "app", "naive"],
        default="auto",
        help="what to measure as the service (default auto)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1_000_000, help="jobs in each listing table (default 1,000,000)"
    )
    parser.add_argument(
        "--bulk-delete",
        type=int,
        default=500_000,
        help="completed jobs the bulk delete removes (default 500,000)",
    )
    parser.add_argument(
        "--leak-requests",
        type=int,
        default=100_000,
        help="requests before the second RSS sample (default 100,000)",
    )
    parser.add_argument(
        "--no-pgbouncer",
        dest="pgbouncer",
        action="store_false",
        help="skip the service through PgBouncer (transaction pooling)",
    )
    parser.add_argument(
        "--no-replicas",
        dest="replicas",
        action="store_false",
        help="skip the replica reads and the failover (replicas.py; run alone: python -m"
        " bench.replicas)",
    )
    parser.add_argument(
        "--no-slow-clients",
        dest="slow_clients",
        action="store_false",
        help="skip the service under sync and gevent workers with idle and slow clients held open",
    )
    parser.add_argument(
        "--no-waiting",
        dest="waiting",
        action="store_false",
        help="skip waiting without polling (long-polled heartbeats, 1,000 waiters)",
    )
    parser.add_argument(
        "--waiting-trials",
        type=int,
        default=200,
        help="schedule-to-worker trials per set-up (default 200)",
    )
    parser.add_argument(
        "--no-growth",
        dest="growth",
        action="store_false",
        help="skip the growth scenario (reads at 1M and 5M jobs, then the prune)",
    )
    parser.add_argument(
        "--only",
        choices=["retries", "waiting"],
        default=None,
        help="run one part alone: retries (the retry sweep and fenced reports, mixed table),"
        " waiting (long-polled heartbeats, 1,000 waiters, over the mixed table)",
    )
    parser.add_argument(
        "--growth-jobs",
        type=int,
        nargs=2,
        default=[1_000_000, 5_000_000],
        metavar=("SMALL", "LARGE"),
        help="the growth scenario's two table sizes, multiples of 1,000"
        " (default 1,000,000 5,000,000)",
    )
    args = parser.parse_args()
    small, large = args.growth_jobs
    if not (0 < small < large) or small % 1000 or large % 1000:
        parser.error("--growth-jobs: two sizes, the first smaller, both multiples of 1,000")
    ensure_wrk()
    workdir = Path(tempfile.mkdtemp(prefix="jobs-bench-"))
    # As root, devdb runs the server as another user, who must reach its datadir.
    workdir.chmod(0o711)
    try:
        with ExitStack() as stack:
            say(f"Starting PostgreSQL and the apps in {workdir}")
            if args.only == "retries":
                bench = Bench(args, workdir, stack, floors=False)
                bench.seed("mixed")
                bench.retries = run_retries(bench)
            elif args.only == "waiting":
                bench = Bench(args, workdir, stack, floors=False)
                bench.seed("mixed")
                bench.waiting = run_waiting(bench)
            else:
                bench = run_all(args, Bench(args, workdir, stack))
    except BaseException:
        print(f"Bench failed; servers' logs are kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    if args.only:
        # One part alone: printed, never written over the full run's results.
        markdown, summary = report(bench, only=args.only)
        print()
        print(markdown)
        print(summary)
        return
    markdown, summary = report(bench)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(markdown)
    print()
    print(markdown)
    print(f"Written to {RESULTS.relative_to(ROOT)}")
    print(summary)


def run_all(args, bench: Bench) -> Bench:
    """Every part, in order."""
    for scenario, label, path in (
        ("mostly_terminal", "default list, 20 active", "/jobs"),
        ("mostly_active", "default list, 99% active", "/jobs"),
    ):
        bench.seed(scenario)
        skew(bench, label, scenario, path)
    bench.seed("mixed")
    progress_job = seed.seed_progress_job(bench.conn, PROGRESS_TABLES, PROGRESS_FILES)
    skew(
        bench,
        "status=completed, deep cursor",
        "mixed",
        f"/jobs?status=completed&last_job_id={args.jobs // 100}",
    )
    skew(bench, "status=scheduled,failed", "mixed", "/jobs?status=scheduled,failed")
    throughput(bench)
    if args.pgbouncer:
        through_pgbouncer(bench)
    if args.replicas:
        run_replicas(bench)
    if args.slow_clients:
        slow_clients(bench)
    pgbench_lists(bench)
    bench.retries = run_retries(bench)
    progress_and_reorg(bench, progress_job)
    file_register(bench)
    if args.waiting:
        bench.waiting = run_waiting(bench)
    leak(bench, progress_job)
    bench.seed("bulk_delete")
    bulk_delete(bench)
    if args.growth:
        bench.growth_stages, bench.prune = run_growth(bench, tuple(args.growth_jobs))
    return bench


if __name__ == "__main__":
    main()
