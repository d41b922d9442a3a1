"""Replicas and failover: the operators' reads on a hot standby, and writes across
the loss of the primary.

- Replica reads: a hot standby of the benchmark's PostgreSQL (dev/standby.py:
  pg_basebackup of the seeded table), then the service twice over that table,
  in turns: primary-only, and with DATABASE_REPLICA_URL at the standby. wrk
  on GET /jobs?limit=50 and GET /jobs/{id}, twice each in turns (the mean)
  (``list_replica_vs_primary``, ``get_replica_vs_primary``), and the share of
  the measured reads the standby answered (jobs_db_reads_total).
- Failover: a fresh primary and a synchronous standby, the service with both
  in its DATABASE_URL (target_session_attrs=read-write). Writers POST /jobs
  (each with an idempotency key) while the primary is killed (SIGKILL) and,
  a second later, the standby is promoted. ``failover_s``: from asking for the
  promotion to the first acknowledged write; ``failover_lost``: acknowledged
  jobs missing from the new primary afterwards (must be 0).

On one box the standby shares the two cores with the primary, the service and
wrk: the replica figures say what the routing costs and that the reads reach
the standby, not what a standby on a machine of its own adds.

    python -m bench.replicas [--jobs 100000] [--duration 10] [--connections 4]

runs this part alone (its own PostgreSQL, seeded with the mixed table);
`make bench` runs it after the PgBouncer scenario on the 1M-job table
(--no-replicas skips it).
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench import seed
from bench.console import fmt, say, table
from bench.load import Load, ensure_wrk, id_script, run_wrk
from bench.servers import ROOT, connect, service_launch, start_postgres, start_server
from dev.gunicorn import Server
from dev.postgres import LocalPostgres
from dev.standby import LocalStandby, make_synchronous

ROUNDS = 2  # wrk runs per target and endpoint, in turns
FAILOVER_WRITERS = 4
OUTAGE_S = 1.0  # from the kill to the promotion
AFTER_S = 1.0  # writes kept going after the first acknowledged one
ENDPOINTS = ("GET /jobs?limit=50", "GET /jobs/{id}")
# The service with replicas: the default lag limit, checked as often as the default.
REPLICA_ENV = {"REPLICA_MAX_LAG_S": "5", "REPLICA_CHECK_S": "1"}

# serve(name, DATABASE_URL, extra environment) -> the service under gunicorn, 2 workers.
Serve = Callable[[str, str, dict[str, str]], Server]


@dataclass
class Failover:
    failover_s: float | None  # promotion -> first acknowledged write
    stopped_s: float | None  # kill -> first acknowledged write (the outage included)
    lost: int | None
    acknowledged: int = 0
    errors: int = 0  # JSON CREATE_JOB_ERROR answers
    unexpected: list[str] = field(default_factory=list)  # anything else
    slowest_s: float = 0.0


@dataclass
class Replicas:
    loads: dict[tuple[str, str], Load] = field(default_factory=dict)  # (target, endpoint)
    replica_share: float | None = None  # of the measured reads, those the standby answered
    fallbacks: dict[str, int] = field(default_factory=dict)  # the others, by reason
    standby_s: float | None = None  # pg_basebackup and start
    failover: Failover | None = None

    def ratio(self, endpoint: str) -> float | None:
        primary, replica = (self.loads.get((target, endpoint)) for target in ("primary", "replica"))
        if primary is None or replica is None or primary.errors or replica.errors:
            return None
        return replica.rps / primary.rps if primary.rps else None


def run(
    pg: LocalPostgres,
    workdir: Path,
    serve: Serve,
    paths: dict[str, tuple[str, list[str] | None]],
    duration: int,
    connections: int,
) -> Replicas:
    """Both parts; ``paths``: endpoint -> (path for wrk, load.lua's arguments or None)."""
    figures = Replicas()
    replica_reads(figures, pg, workdir, serve, paths, duration, connections)
    figures.failover = failover(workdir, serve)
    return figures


def replica_reads(figures, pg, workdir, serve, paths, duration, connections) -> None:
    started = time.monotonic()
    standby = LocalStandby(pg, workdir / "standby")
    try:
        standby.start()
        standby.wait_caught_up(timeout=600)
        figures.standby_s = time.monotonic() - started
        say(f"standby of the bench's PostgreSQL in {figures.standby_s:.1f} s at {standby.url}")
        servers = {
            "primary": serve("service-primary-reads", pg.url, {}),
            "replica": serve(
                "service-replica-reads",
                pg.url,
                {"DATABASE_REPLICA_URL": standby.url, **REPLICA_ENV},
            ),
        }
        try:
            for server in servers.values():  # warm-up: caches, pools, the replica checks
                for path, script in paths.values():
                    run_wrk(server.url + path, 2, connections, script)
            before = read_counts(servers["replica"])
            # In turns, ROUNDS times over: the box's load drifts more between
            # runs than the routing costs, and both targets see the same drift.
            runs: dict[tuple[str, str], list[Load]] = {}
            for endpoint in ENDPOINTS:
                path, script = paths[endpoint]
                for _ in range(ROUNDS):
                    for target, server in servers.items():
                        # A second of warm-up: the replica's freshness was last
                        # checked before this server's pause, and its first
                        # reads go to the primary until a check has run.
                        run_wrk(server.url + path, 1, connections, script)
                        load = run_wrk(server.url + path, duration, connections, script)
                        runs.setdefault((target, endpoint), []).append(load)
                        say(
                            f"{target:8} {endpoint:20} {load.rps:8.0f} req/s"
                            f"  p50 {load.p50_ms:.2f} ms  p99 {load.p99_ms:.2f} ms"
                            f"  errors {load.errors}"
                        )
            after = read_counts(servers["replica"])
        finally:
            for server in servers.values():
                server.stop()
        figures.loads = {key: combined(loads) for key, loads in runs.items()}
        counted = {k: after[k] - before.get(k, 0) for k in after}
        total = counted.get("primary", 0) + counted.get("replica", 0)
        figures.replica_share = counted.get("replica", 0) / total if total else None
        figures.fallbacks = {k: int(counted.get(k, 0)) for k in ("lag", "down")}
    finally:
        standby.destroy()


def combined(loads: list[Load]) -> Load:
    """Runs of equal length as one: mean rate and p50, the worst p99, all the errors."""
    return Load(
        requests=sum(x.requests for x in loads),
        rps=statistics.mean(x.rps for x in loads),
        p50_ms=statistics.mean(x.p50_ms for x in loads),
        p99_ms=max(x.p99_ms for x in loads),
        errors=sum(x.errors for x in loads),
    )


def read_counts(server: Server) -> dict[str, float]:
    """jobs_db_reads_total by target and jobs_replica_fallbacks_total by reason, summed
    over the server's workers."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "jobs_db_reads_total":
                counts[sample.labels["target"]] = sample.value
            elif sample.name == "jobs_replica_fallbacks_total":
                counts[sample.labels["reason"]] = sample.value
    return counts


def failover(workdir: Path, serve: Serve) -> Failover:
    primary = LocalPostgres(workdir / "failover-primary", durable=False)
    standby = LocalStandby(primary, workdir / "failover-standby")
    try:
        primary.start()
        conn = connect(primary.url)
        with conn.cursor() as cur:
            cur.execute((ROOT / "schema.sql").read_text())
        conn.close()
        standby.start()
        make_synchronous(primary)
        standby.wait_caught_up()
        url = (
            f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}"
            "/postgres?target_session_attrs=read-write"
        )
        server = serve("service-failover", url, {"STATEMENT_TIMEOUT_MS": "1000"})
        try:
            return _failover(server, primary, standby)
        finally:
            server.stop()
    finally:
        standby.destroy()
        primary.destroy()


def _failover(server: Server, primary: LocalPostgres, standby: LocalStandby) -> Failover:
    records: list[tuple[float, float, int, dict | None]] = []  # sent, answered, status, body
    stopping = threading.Event()
    lock = threading.Lock()

    def writer(number: int) -> None:
        for n in range(10**9):
            if stopping.is_set():
                return
            body = {"node_id": "bench", "idempotency_key": f"failover-{number}-{n}"}
            sent = time.monotonic()
            try:
                status, answer = _post(server.port, "/jobs", body)
            except (OSError, http.client.HTTPException) as exc:
                status, answer = 0, {"exception": type(exc).__name__}
            with lock:
                records.append((sent, time.monotonic(), status, answer))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(FAILOVER_WRITERS)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    primary.kill()
    killed_at = time.monotonic()  # once dead: a write sent from now on waits for the promotion
    say("failover: primary killed")
    time.sleep(OUTAGE_S)
    promoted_at = time.monotonic()  # asked: pg_ctl promote -w notices it up to 0.1 s late
    standby.promote()
    say(f"failover: standby promoted {promoted_at - killed_at:.2f} s after the kill")
    deadline = promoted_at + 30
    while time.monotonic() < deadline:
        with lock:
            if any(r[0] > killed_at and r[2] == 201 for r in records):
                break
        time.sleep(0.01)
    time.sleep(AFTER_S)
    stopping.set()
    for thread in threads:
        thread.join(60)

    outcome = Failover(failover_s=None, stopped_s=None, lost=None)
    resumed = [r[1] for r in records if r[0] > killed_at and r[2] == 201]
    if resumed:
        outcome.failover_s = min(resumed) - promoted_at
        outcome.stopped_s = min(resumed) - killed_at
    acknowledged = {r[3]["id"] for r in records if r[2] == 201}
    outcome.acknowledged = len(acknowledged)
    for _, _, status, answer in records:
        if status == 500 and answer and answer.get("error_code") == "CREATE_JOB_ERROR":
            outcome.errors += 1
        elif status != 201:
            outcome.unexpected.append(f"HTTP {status} {answer}")
    outcome.slowest_s = max((r[1] - r[0] for r in records), default=0.0)
    conn = connect(standby.url)
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM jobs")
        stored = {row[0] for row in cur.fetchall()}
    conn.close()
    outcome.lost = len(acknowledged - stored)
    say(
        f"failover: first write {fmt(outcome.failover_s)} s after the promotion,"
        f" {outcome.acknowledged} acknowledged, {outcome.lost} lost,"
        f" {outcome.errors} CREATE_JOB_ERROR, {len(outcome.unexpected)} other answers"
    )
    return outcome


def _post(port: int, path: str, body: dict) -> tuple[int, dict | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs in the table (100,000)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (10)")
    parser.add_argument("--connections", type=int, default=4, help="wrk connections (4)")
    args = parser.parse_args()
    ensure_wrk()
    workdir = Path(tempfile.mkdtemp(prefix="jobs-bench-replicas-"))
    workdir.chmod(0o711)  # as root, the servers run as another user
    try:
        with ExitStack() as stack:
            pg = start_postgres(workdir)
            stack.callback(pg.destroy)
            conn = connect(pg.url)
            with conn.cursor() as cur:
                cur.execute((ROOT / "schema.sql").read_text())
            mixed = seed.scenarios(args.jobs, 1000)["mixed"]
            say(f"seeding {mixed.description}")
            seed.seed(conn, mixed)

            def serve(name: str, url: str, env: dict[str, str]) -> Server:
                server = start_server(name, service_launch(2), url, workdir, env)
                stack.callback(server.stop)
                return server

            paths = {
                ENDPOINTS[0]: ("/jobs?limit=50", None),
                ENDPOINTS[1]: ("/", id_script(range(1, args.jobs + 1), "/jobs/{id}")),
            }
            figures = run(pg, workdir, serve, paths, args.duration, args.connections)
    except BaseException:
        print(f"Failed; the servers' logs are kept in {workdir}")
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    lines, formatted = replicas_section(figures)
    print("\n".join(lines))
    print()
    print("bench: " + replicas_summary(formatted))


if __name__ == "__main__":
    main()


def replicas_section(figures: Replicas | None) -> tuple[list[str], dict[str, str]]:
    """The replica reads next to primary-only, and the failover; the summary's figures."""
    if figures is None:
        return [], dict.fromkeys(("list", "get", "failover_s", "failover_lost"), "n/a")
    rows = []
    for endpoint in ("GET /jobs?limit=50", "GET /jobs/{id}"):
        primary, replica = (figures.loads.get((t, endpoint)) for t in ("primary", "replica"))
        rows.append(
            [
                endpoint,
                "n/a" if primary is None else f"{primary.rps:.0f}",
                fmt(primary and primary.p99_ms),
                "n/a" if replica is None else f"{replica.rps:.0f}",
                fmt(replica and replica.p99_ms),
                "n/a" if replica is None else str(replica.errors),
                f"{fmt(figures.ratio(endpoint))}x",
            ]
        )
    share = figures.replica_share
    others = ", ".join(f"{n} {reason}" for reason, n in figures.fallbacks.items())
    header = ["endpoint", "primary-only req/s", "primary-only p99 ms", "with replica req/s"]
    header += ["with replica p99 ms", "with replica errors", "replica / primary"]
    lines = [
        "",
        "## Replicas and failover",
        "",
        f"A hot standby of the same table (pg_basebackup and catch-up in"
        f" {fmt(figures.standby_s, 1)} s), the service primary-only and then with"
        " DATABASE_REPLICA_URL at it. Reads the standby answered in the measured runs:"
        f" {'n/a' if share is None else f'{100 * share:.1f}%'}"
        f" (the primary's, by jobs_replica_fallbacks_total: {others or 'n/a'}).",
        "",
        table(header, rows),
    ]
    out = figures.failover
    if out is not None:
        rows = [
            ["promotion -> first acknowledged write", f"{fmt(out.failover_s)} s"],
            ["kill -> first acknowledged write", f"{fmt(out.stopped_s)} s"],
            ["acknowledged writes", str(out.acknowledged)],
            ["acknowledged writes missing afterwards", str(out.lost)],
            ["answers in between: CREATE_JOB_ERROR, other", f"{out.errors}, {len(out.unexpected)}"],
            ["slowest answer", f"{fmt(out.slowest_s)} s"],
        ]
        title = "failover: primary killed, synchronous standby promoted 1 s later"
        lines += ["", table([title, "value"], rows)]
        if out.unexpected:
            lines += ["", "Other answers: " + "; ".join(out.unexpected[:5])]
    return lines, {
        "list": fmt(figures.ratio("GET /jobs?limit=50")),
        "get": fmt(figures.ratio("GET /jobs/{id}")),
        "failover_s": fmt(out and out.failover_s),
        "failover_lost": "n/a" if out is None or out.lost is None else str(out.lost),
    }


def replicas_summary(figures: dict[str, str]) -> str:
    return (
        f"list_replica_vs_primary={figures['list']} get_replica_vs_primary={figures['get']}"
        f" failover_s={figures['failover_s']} failover_lost={figures['failover_lost']}"
    )
