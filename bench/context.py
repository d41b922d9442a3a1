"""The context every phase of a run is given: ``Bench``, its PostgreSQL, servers and results.

run.py makes one and runs the phases on it in order; the phases in other
modules (through_pgbouncer.py, slow_clients.py, retries.py, waiting.py) take
it as their argument, and report.py reads what they left in it. This module
imports none of them, so none of them imports run.py.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench import seed
from bench.console import say
from bench.growth import Prune, Stage
from bench.load import Load, Probe, id_script, run_wrk
from bench.plans import Plans
from bench.register import Registration
from bench.servers import (
    ROOT,
    connect,
    floor_launch,
    service_launch,
    start_postgres,
    start_server,
)
from dev.gunicorn import Server


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
    """One run: its PostgreSQL, its servers (the floors and the service), and what the
    phases measured, for report.py."""

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
        self.waiting = None  # waiting.Waiting
        self.replicas = None  # replicas.Replicas
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

    # -- load

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
