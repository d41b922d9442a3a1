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

This file is the orchestration: the scenarios, in order. The rest of the
harness: load.py (wrk, single-client probes, pgbench), servers.py
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
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench import replicas, seed
from bench.console import say
from bench.growth import Prune, Stage, run_growth
from bench.load import (
    Load,
    Probe,
    ensure_wrk,
    get_json,
    id_script,
    load_during,
    pgbench,
    request,
    run_wrk,
    run_wrk_until,
    single_client,
)
from bench.plans import Plans, jobs_rows_read
from bench.register import Registration, measure_registration
from bench.report import fmt, report
from bench.retries import run_retries
from bench.servers import (
    ROOT,
    connect,
    floor_launch,
    rss_kib,
    service_launch,
    start_postgres,
    start_server,
)
from bench.slow_clients import slow_clients
from bench.through_pgbouncer import through_pgbouncer
from bench.waiting import Waiting, run_waiting
from dev.gunicorn import Server

RESULTS = ROOT / "bench" / "results" / "latest.md"

PROGRESS_TABLES, PROGRESS_FILES = 10, 10_000
REORG_FROM, REORG_FILES = 5_000, 100  # rewrite files 5000..5099 of table_0


@dataclass
class Skew:
    label: str
    scenario: str
    path: str
    service: Probe | None = None
    naive: Probe | None = None
    # Per statement the request ran: its EXPLAIN text and the rows of jobs it read.
    plans: list[tuple[str, int]] = field(default_factory=list)
    table_rows: int = 0

    def reads_table(self) -> bool:
        """Whether any statement read a tenth of the table or more: a scan, not a lookup."""
        return any(rows >= self.table_rows / 10 for _, rows in self.plans)


class Bench:
    def __init__(self, args, workdir: Path, stack: ExitStack, floors: bool = True):
        self.args = args
        self.workdir = workdir
        self.stack = stack
        self.scenarios = seed.scenarios(args.jobs, args.bulk_delete)
        self.pg = start_postgres(workdir)
        stack.callback(self.pg.destroy)
        self.conn = connect(self.pg.url)
        with self.conn.cursor() as cur:
            cur.execute((ROOT / "schema.sql").read_text())
        self.plans = Plans(self.conn)
        self.loads: dict[tuple[str, str], Load] = {}  # (app, endpoint) -> wrk result
        self.tps: dict[str, float] = {}
        self.skews: list[Skew] = []
        self.progress: dict[str, Probe] = {}
        self.notes: list[str] = []
        self.seed_seconds: dict[str, float] = {}
        self.delete: dict[str, float | int] = {}
        self.rss: dict[str, int] = {}
        self.pgbouncer_loads: dict[str, Load] = {}  # endpoint -> wrk result via PgBouncer
        # (worker class, endpoint) -> wrk result with idle and slow clients held open
        self.slow_client_loads: dict[tuple[str, str], Load] = {}
        self.registration: Registration | None = None
        self.growth_stages: list[Stage] = []
        self.waiting: Waiting | None = None
        self.replicas: replicas.Replicas | None = None
        self.prune: Prune | None = None
        self.retries = None  # retries.RetryFigures
        self.servers = {}
        if floors:
            self.servers = {
                "constant": self.serve("constant", floor_launch("constant_app", 2)),
                "naive": self.serve("naive", floor_launch("naive_app", 2)),
                # The naive GET again with the service's client-side deadline:
                # what the deadline costs a bare round trip.
                "naive+deadline": self.serve(
                    "naive+deadline",
                    floor_launch("naive_app", 2),
                    extra_env={"NAIVE_CLIENT_DEADLINE": "1"},
                ),
            }
        service = self.service_launch(workers=2)
        if service is not None:
            self.servers["service"] = self.serve("service", service)

    # -- servers

    def service_launch(self, workers: int) -> dict | None:
        """dev.gunicorn.Server's options for the service, or None when it is absent and
        may be."""
        if self.args.service == "naive":
            return floor_launch("naive_app", workers)
        if not (ROOT / "wsgi.py").exists():
            if self.args.service == "app":
                raise SystemExit("--service app: wsgi.py does not exist yet")
            self.notes.append("The service (wsgi.py) does not exist yet: its rows read n/a.")
            return None
        return service_launch(workers)

    def serve(
        self,
        name: str,
        launch: dict,
        database_url: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> Server:
        """Start an app under gunicorn (``launch``: dev.gunicorn.Server's options); it is
        stopped when the run ends, if not before."""
        server = start_server(name, launch, database_url or self.pg.url, self.workdir, extra_env)
        self.stack.callback(server.stop)
        return server

    @property
    def service(self) -> Server | None:
        return self.servers.get("service")

    # -- data

    def seed(self, name: str) -> None:
        started = time.monotonic()
        seed.seed(self.conn, self.scenarios[name])
        self.seed_seconds[name] = time.monotonic() - started
        say(f"seeded {name}: {self.scenarios[name].description} in {self.seed_seconds[name]:.1f} s")

    def table_rows(self) -> int:
        with self.conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM jobs")
            return cur.fetchone()[0]

    # -- phases

    def skew(self, label: str, scenario: str, path: str) -> None:
        """Single-client p50 of a listing, and the plans of the service's SQL."""
        entry = Skew(label, scenario, path)
        entry.naive = single_client(self.servers["naive"].port, path)
        if self.service is not None:
            entry.service = single_client(self.service.port, path)
            statements = self.plans.capture(lambda: request(self.service.port, "GET", path))
            entry.table_rows = self.table_rows()
            for statement in statements:
                entry.plans.append(
                    (
                        f"{statement.shown()}\n\n{statement.plan_text}",
                        jobs_rows_read(statement.plan_json),
                    )
                )
        self.skews.append(entry)
        say(
            f"{label}: service p50 {fmt(entry.service and entry.service.p50_ms)} ms,"
            f" naive p50 {entry.naive.p50_ms:.2f} ms"
        )

    def throughput_endpoints(self) -> dict[str, tuple[str, list[str] | None]]:
        """endpoint -> (path for wrk, load.lua's arguments or None), over the mixed table."""
        ids = range(1, self.scenarios["mixed"].jobs + 1)
        return {
            "GET /jobs?limit=50": ("/jobs?limit=50", None),
            "GET /jobs/{id}": ("/", id_script(ids, "/jobs/{id}")),
        }

    def wrk_endpoint(self, app: str, server: Server, endpoint: str) -> Load:
        """wrk on one endpoint of one server: a warm-up, then the measured run."""
        path, script = self.throughput_endpoints()[endpoint]
        seconds, connections = self.args.duration, self.args.connections
        run_wrk(server.url + path, min(2, seconds), connections, script)  # warm-up
        load = run_wrk(server.url + path, seconds, connections, script)
        say(
            f"{app:8} {endpoint:20} {load.rps:8.0f} req/s  p50 {load.p50_ms:.2f} ms"
            f"  p99 {load.p99_ms:.2f} ms  errors {load.errors}"
        )
        return load

    def throughput(self) -> None:
        for app, server in self.servers.items():
            for endpoint in self.throughput_endpoints():
                if app in ("constant", "naive+deadline") and endpoint != "GET /jobs/{id}":
                    continue
                self.loads[(app, endpoint)] = self.wrk_endpoint(app, server, endpoint)

    def run_replicas(self) -> None:
        """Replica reads over the mixed table next to primary-only, and a failover."""
        if self.service is None:
            return

        def serve(name: str, url: str, env: dict[str, str]) -> Server:
            return self.serve(name, self.service_launch(workers=2), url, env)

        self.replicas = replicas.run(
            self.pg,
            self.workdir,
            serve,
            self.throughput_endpoints(),
            self.args.duration,
            self.args.connections,
        )

    def pgbench_lists(self) -> None:
        """pgbench on the very SQL each app runs for GET /jobs?limit=50."""
        for app in ("naive", "service"):
            server = self.servers.get(app)
            if server is None:
                continue
            statements = self.plans.capture(
                lambda server=server: request(server.port, "GET", "/jobs?limit=50")
            )
            self.tps[app] = pgbench(
                self.pg.url,
                [s.replay for s in statements],
                self.args.duration,
                self.args.connections,
                self.workdir,
                prepared=any(s.prepared for s in statements),
            )
            say(f"pgbench {app} list SQL: {self.tps[app]:.0f} tps")

    def progress_and_reorg(self, job_id: int) -> None:
        path = f"/jobs/{job_id}/progress"
        for app in ("naive", "service"):
            server = self.servers.get(app)
            if server is not None:
                self.progress[f"{app} before reorg"] = single_client(server.port, path)
        if self.service is None:
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
            self.service.port, "POST", f"/jobs/{job_id}/tables/table_0/files", files
        )
        self.delete["reorg_status"], self.delete["reorg_s"] = status, seconds
        self.progress["service after reorg"] = single_client(self.service.port, path)
        # The reorg replaced file 5000 onwards, and the old files after it no
        # longer link: the chain now ends with the last reorg file.
        table = get_json(self.service.port, path)["tables"].get("table_0", {})
        expected = REORG_FROM + REORG_FILES
        if table.get("files_count") != expected:
            self.notes.append(
                f"Progress after the reorg counts {table.get('files_count')}"
                f" files in table_0, expected {expected}."
            )
        say(
            "progress p50: " + ", ".join(f"{k} {v.p50_ms:.2f} ms" for k, v in self.progress.items())
        )

    def file_register(self) -> None:
        """Registering one file before the tip of a 200,000-file table (register.py)."""
        if self.service is None:
            return
        self.registration = measure_registration(self.conn, self.service.port)
        self.notes += self.registration.problems
        say(
            f"file registration before the tip of {self.registration.files:,} files:"
            f" p50 {self.registration.p50_ms:.2f} ms over {self.registration.samples} requests"
        )

    def leak(self, progress_job: int) -> None:
        """A worker's RSS after 1,000 and after ``--leak-requests`` requests.

        A dedicated service with one worker, so that every request lands on
        the worker being measured; the routes rotate through listings, gets,
        progress, a 404 and a 400.
        """
        launch = self.service_launch(workers=1)
        if launch is None:
            return
        server = self.serve("service-1-worker", launch)
        ids = range(1, self.scenarios["mixed"].jobs + 1)
        paths = [
            "/jobs?limit=50",
            "/jobs/{id}",
            f"/jobs/{progress_job}/progress",
            "/jobs?status=completed&last_job_id={id}",
            "/jobs/{id}00000000",
            "/jobs/not-a-number",
        ]
        marker = self.workdir / "wrk.done"
        samples = {}
        for label, count in (("1k", 1_000), ("total", self.args.leak_requests - 1_000)):
            run_wrk_until(
                server.url,
                self.args.connections,
                id_script(ids, *paths, stop_after=count, marker=str(marker)),
                marker,
            )
            (worker,) = server.workers()
            samples[label] = (worker, rss_kib(worker))
        if samples["1k"][0] != samples["total"][0]:
            self.notes.append(
                "The worker was replaced during the RSS run (max_requests?):"
                " its growth cannot be measured."
            )
            return
        self.rss = {"after_1k_kib": samples["1k"][1], "after_all_kib": samples["total"][1]}
        say(
            f"RSS {self.rss['after_1k_kib']} KiB after 1,000 requests,"
            f" {self.rss['after_all_kib']} KiB after {self.args.leak_requests:,}"
        )
        server.stop()

    def bulk_delete(self) -> None:
        """DELETE /jobs?status=completed while wrk reads surviving jobs."""
        if self.service is None:
            return
        ids = self.scenarios["bulk_delete"].spread_ids()
        outcome: dict[str, object] = {}

        def delete() -> None:
            try:
                outcome["status"], outcome["seconds"] = request(
                    self.service.port, "DELETE", "/jobs?status=completed"
                )
            except (OSError, http.client.HTTPException) as exc:
                # Most likely gunicorn's timeout killing the worker mid-delete.
                self.notes.append(f"DELETE /jobs?status=completed got no answer: {exc!r}")
                outcome["status"], outcome["seconds"] = "none", None

        # Two connections: one per worker, one of which is busy deleting.
        load = load_during(
            self.service.url,
            2,
            id_script(ids, "/jobs/{id}"),
            delete,
            warmup_s=min(2, self.args.duration),
        )
        status, seconds = outcome["status"], outcome["seconds"]
        with self.conn.cursor() as cur:
            cur.execute("SELECT count(*) FILTER (WHERE status = 'COMPLETED'), count(*) FROM jobs")
            completed_left, jobs_left = cur.fetchone()
        self.delete.update(
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
        bench.skew(label, scenario, path)
    bench.seed("mixed")
    progress_job = seed.seed_progress_job(bench.conn, PROGRESS_TABLES, PROGRESS_FILES)
    bench.skew(
        "status=completed, deep cursor",
        "mixed",
        f"/jobs?status=completed&last_job_id={args.jobs // 100}",
    )
    bench.skew("status=scheduled,failed", "mixed", "/jobs?status=scheduled,failed")
    bench.throughput()
    if args.pgbouncer:
        through_pgbouncer(bench)
    if args.replicas:
        bench.run_replicas()
    if args.slow_clients:
        slow_clients(bench)
    bench.pgbench_lists()
    bench.retries = run_retries(bench)
    bench.progress_and_reorg(progress_job)
    bench.file_register()
    if args.waiting:
        bench.waiting = run_waiting(bench)
    bench.leak(progress_job)
    bench.seed("bulk_delete")
    bench.bulk_delete()
    if args.growth:
        bench.growth_stages, bench.prune = run_growth(bench, tuple(args.growth_jobs))
    return bench


if __name__ == "__main__":
    main()
