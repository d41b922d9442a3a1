"""Waiting without polling, measured through the service under gunicorn.

    python -m bench.waiting [--trials 200] [--duration 5]   # this part alone (~4 min)

Its own throwaway PostgreSQL (unless a Bench hands it one), 100,000 jobs to
read, and the service under its production config (2 gevent workers):

- ``schedule_to_worker_ms``: a registered worker's heartbeat waits
  (``?wait=30``, the worker's row marked waiting: it has arrived); at a random
  moment 0-250 ms later (not in step with a poller's ticks) one client POSTs
  a job for that worker; the figure is the time from the POST's answer to the
  heartbeat's (a negative one, the heartbeat first, counts as 0). p50 and p99
  over ``--trials`` trials, for three set-ups: directly (LISTEN on
  DATABASE_URL), through PgBouncer in transaction mode (polling,
  WAIT_POLL_INTERVAL_MS 250), and through PgBouncer with DATABASE_LISTEN_URL
  at PostgreSQL itself (LISTEN). Between trials the job is reported RUNNING,
  so that the next heartbeat has nothing and waits.
- ``get_with_1000_waiters_vs_idle``: wrk's GET /jobs/{id} throughput with
  1,000 heartbeats waiting (raw sockets, 1,000 registered workers) over the
  same without them: the median over three adjacent pairs of runs.
- ``waiting_kib_per_request``: the workers' RSS with the 1,000 waiting, minus
  before, per waiting request; and the database connections the service held
  meanwhile (pg_stat_activity).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.console import say
from bench.load import Load, ensure_wrk, id_script, run_wrk
from bench.servers import (
    ROOT,
    connect,
    rss_kib,
    service_launch,
    start_postgres,
    start_server,
)
from dev.gunicorn import Server
from dev.pgbouncer import LocalPgBouncer

if TYPE_CHECKING:
    from bench.context import Bench

WAITERS = 1000
ROUNDS = 3
JOBS = 100_000
NODE = "bench-worker"


@dataclass
class Latency:
    p50_ms: float
    p99_ms: float
    trials: int
    heartbeat_first: int  # trials where the heartbeat answered before the POST did


@dataclass
class Waiting:
    schedule_to_worker: dict[str, Latency] = field(default_factory=dict)
    get_idle: Load | None = None
    get_waiting: Load | None = None
    kib_per_waiter: float | None = None
    held_connections: int | None = None
    waiting_seen: int | None = None
    problems: list[str] = field(default_factory=list)

    get_ratios: list[float] = field(default_factory=list)  # per adjacent pair of runs

    @property
    def get_ratio(self) -> float | None:
        return statistics.median(self.get_ratios) if self.get_ratios else None


class Client:
    """One keep-alive connection for the POSTs and PUTs of the trials."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body)
        self.conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        return response.status, json.loads(response.read() or b"null")


def _heartbeat_in_thread(port: int, result: dict) -> threading.Thread:
    def run():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", f"/workers/{NODE}/heartbeat?wait=30")
        response = conn.getresponse()
        body = response.read()
        result["at"] = time.perf_counter()
        result["status"], result["body"] = response.status, json.loads(body)
        conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _until_waiting(db, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    with db.cursor() as cur:
        while time.monotonic() < deadline:
            cur.execute("SELECT waiting_until IS NOT NULL FROM workers WHERE node_id = %s", (NODE,))
            if cur.fetchone()[0]:
                return
            time.sleep(0.001)
    raise RuntimeError("the heartbeat never waited")


def schedule_to_worker(port: int, db, trials: int, problems: list[str]) -> Latency:
    client = Client(port)
    assert client.call("PUT", f"/workers/{NODE}")[0] == 200
    samples, first = [], 0
    jitter = random.Random(trials)
    for _ in range(trials + 3):
        result: dict = {}
        thread = _heartbeat_in_thread(port, result)
        _until_waiting(db)
        # At a random moment: a job is not scheduled in step with a poller's ticks
        # (right after a wake-up, the next tick is a whole interval away).
        time.sleep(jitter.uniform(0, 0.25))
        status, job = client.call("POST", "/jobs", {"node_id": NODE})
        returned = time.perf_counter()
        thread.join(60)
        if status != 201 or result.get("status") != 200:
            problems.append(f"a trial answered POST {status}, heartbeat {result.get('status')}")
            continue
        if result["body"]["scheduled"] != [job["id"]]:
            problems.append(f"a heartbeat listed {result['body']['scheduled']}, not [{job['id']}]")
        elapsed = result["at"] - returned
        first += elapsed < 0
        samples.append(max(0.0, elapsed))
        client.call("PUT", f"/jobs/{job['id']}/status", {"status": "RUNNING"})
    samples = samples[3:]  # the first trials open connections
    samples.sort()
    return Latency(
        statistics.median(samples) * 1000,
        samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1000,
        len(samples),
        first,
    )


def _raw_waiters(port: int, count: int, wait_s: int) -> list[socket.socket]:
    socks = []
    for i in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(
            f"POST /workers/bench-wait-{i:04d}/heartbeat?wait={wait_s} HTTP/1.1\r\n"
            "Host: bench\r\nContent-Length: 0\r\n\r\n".encode()
        )
        socks.append(sock)
    return socks


def _waiting_now(db) -> int:
    with db.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM workers"
            " WHERE waiting_until IS NOT NULL AND node_id LIKE 'bench-wait-%'"
        )
        return cur.fetchone()[0]


def _until_waiting_count(db, count: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while (seen := _waiting_now(db)) != count and time.monotonic() < deadline:
        time.sleep(0.1)
    return seen


def get_with_waiters(server: Server, db, duration: int, result: Waiting) -> None:
    """GET /jobs/{id} throughput, idle and with WAITERS heartbeats waiting, in ROUNDS
    adjacent pairs (the shared box's load drifts: each pair sees the same), and RSS."""
    with db.cursor() as cur:
        cur.execute(
            "INSERT INTO workers (node_id, created_at, registered_at, heartbeat_at)"
            " SELECT 'bench-wait-' || lpad(i::text, 4, '0'), now(), now(), now()"
            " FROM generate_series(0, %s) i ON CONFLICT DO NOTHING",
            (WAITERS - 1,),
        )
        cur.execute("SELECT min(id), max(id) FROM jobs")
        low, high = cur.fetchone()
    script = id_script(range(low, high + 1), "/jobs/{id}")
    url = server.url("/")
    run_wrk(url, 2, 4, script)  # warm-up
    # Long enough to outlast the arrivals and the measured run.
    wait_s = duration + 20
    idle_runs, busy_runs = [], []
    for round_ in range(ROUNDS):
        idle_runs.append(run_wrk(url, duration, 4, script))
        before = sum(rss_kib(pid) for pid in server.workers())
        socks = _raw_waiters(server.port, WAITERS, wait_s)
        started = time.monotonic()
        try:
            seen = _until_waiting_count(db, WAITERS)
            if seen < WAITERS:
                result.problems.append(f"only {seen} of {WAITERS} heartbeats waited")
            if round_ == 0:
                result.waiting_seen = seen
                with_waiters = sum(rss_kib(pid) for pid in server.workers())
                result.kib_per_waiter = (with_waiters - before) / WAITERS
                with db.cursor() as cur:
                    cur.execute(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE application_name LIKE 'jobs-service%'"
                    )
                    result.held_connections = cur.fetchone()[0]
            busy_runs.append(run_wrk(url, duration, 4, script))
            if _waiting_now(db) < WAITERS:
                result.problems.append("some heartbeats stopped waiting during the GET run")
            # Until their wait is over (each answer clears its worker's mark).
            time.sleep(max(0.0, wait_s - (time.monotonic() - started)))
            _until_waiting_count(db, 0)
        finally:
            for sock in socks:
                sock.close()
    result.get_idle = _mean(idle_runs)
    result.get_waiting = _mean(busy_runs)
    result.get_ratios = [b.rps / i.rps for i, b in zip(idle_runs, busy_runs, strict=True)]


def _mean(loads: list[Load]) -> Load:
    return Load(
        requests=sum(load.requests for load in loads),
        rps=statistics.mean(load.rps for load in loads),
        p50_ms=statistics.median(load.p50_ms for load in loads),
        p99_ms=max(load.p99_ms for load in loads),
        errors=sum(load.errors for load in loads),
    )


def measure(pg_url: str, workdir: Path, stack: ExitStack, trials: int, duration: int) -> Waiting:
    result = Waiting()
    db = connect(pg_url)
    bouncer = LocalPgBouncer(pg_url, str(workdir / "pgbouncer-waiting"), "transaction")
    bouncer_url = bouncer.start()
    stack.callback(bouncer.stop)
    setups = {
        "direct (LISTEN)": {"DATABASE_URL": pg_url},
        "PgBouncer, polling": {"DATABASE_URL": bouncer_url},
        "PgBouncer + DATABASE_LISTEN_URL": {
            "DATABASE_URL": bouncer_url,
            "DATABASE_LISTEN_URL": pg_url,
        },
    }
    for label, env in setups.items():
        name = "waiting-" + label.split()[0].lower()
        extra = {k: v for k, v in env.items() if k != "DATABASE_URL"}
        server = start_server(
            name, service_launch(workers=2), env["DATABASE_URL"], workdir, extra_env=extra
        )
        try:
            with db.cursor() as cur:
                cur.execute("DELETE FROM jobs WHERE node_id = %s", (NODE,))
            latency = schedule_to_worker(server.port, db, trials, result.problems)
            result.schedule_to_worker[label] = latency
            say(
                f"schedule_to_worker, {label}: p50 {latency.p50_ms:.1f} ms,"
                f" p99 {latency.p99_ms:.1f} ms over {latency.trials} trials"
            )
            if label.startswith("direct"):
                get_with_waiters(server, db, duration, result)
                say(
                    f"GET /jobs/{{id}}: {result.get_idle.rps:.0f} req/s idle,"
                    f" {result.get_waiting.rps:.0f} with {result.waiting_seen} heartbeats waiting"
                    f" ({result.get_ratio:.2f}x); {result.kib_per_waiter:.1f} KiB per waiting"
                    f" request; {result.held_connections} database connections held"
                )
        finally:
            server.stop()
    with db.cursor() as cur:  # what the trials made goes: later phases count jobs
        cur.execute("DELETE FROM jobs WHERE node_id = %s", (NODE,))
        cur.execute(
            "DELETE FROM workers WHERE node_id = %s OR node_id LIKE 'bench-wait-%%'", (NODE,)
        )
    return result


def run_waiting(bench: Bench) -> Waiting:
    """The phase of `make bench` (bench.run): on its PostgreSQL, over its jobs."""
    return measure(
        bench.pg.url, bench.workdir, bench.stack, bench.args.waiting_trials, bench.args.duration
    )


def summary(result: Waiting) -> str:
    direct = result.schedule_to_worker.get("direct (LISTEN)")
    polled = result.schedule_to_worker.get("PgBouncer, polling")
    listened = result.schedule_to_worker.get("PgBouncer + DATABASE_LISTEN_URL")

    def ms(latency, attr):
        return "n/a" if latency is None else f"{getattr(latency, attr):.1f}"

    ratio = result.get_ratio
    return (
        f"schedule_to_worker_ms_p50={ms(direct, 'p50_ms')}"
        f" schedule_to_worker_ms_p99={ms(direct, 'p99_ms')}"
        f" schedule_to_worker_pgbouncer_ms_p50={ms(polled, 'p50_ms')}"
        f" schedule_to_worker_pgbouncer_ms_p99={ms(polled, 'p99_ms')}"
        f" schedule_to_worker_pgbouncer_listen_ms_p99={ms(listened, 'p99_ms')}"
        f" get_with_1000_waiters_vs_idle={'n/a' if ratio is None else f'{ratio:.2f}'}"
        f" waiting_kib_per_request="
        f"{'n/a' if result.kib_per_waiter is None else f'{result.kib_per_waiter:.1f}'}"
    )


def section(result: Waiting | None) -> list[str]:
    """The report's lines (bench.report)."""
    if result is None:
        return []
    rows = [
        f"| {label} | {lat.p50_ms:.1f} | {lat.p99_ms:.1f} | {lat.trials} | {lat.heartbeat_first} |"
        for label, lat in result.schedule_to_worker.items()
    ]
    lines = [
        "",
        "## Waiting without polling",
        "",
        "POST /jobs answered -> the waiting heartbeat's answer (ms):",
        "",
        "| set-up | p50 | p99 | trials | heartbeat first |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    if result.get_idle is not None and result.get_waiting is not None:
        lines += [
            f"GET /jobs/{{id}} (wrk -c4): {result.get_idle.rps:.0f} req/s"
            f" (p99 {result.get_idle.p99_ms:.2f} ms) idle,"
            f" {result.get_waiting.rps:.0f} req/s (p99 {result.get_waiting.p99_ms:.2f} ms)"
            f" with {result.waiting_seen} heartbeats waiting (means of {ROUNDS} runs each):"
            f" {result.get_ratio:.2f}x (median of the pairs:"
            f" {', '.join(f'{r:.2f}' for r in result.get_ratios)})."
            f" RSS {result.kib_per_waiter:.1f} KiB per waiting request;"
            f" {result.held_connections} database connections of the service meanwhile.",
        ]
    lines += [f"- {problem}" for problem in result.problems[:10]]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200, help="trials per set-up (default 200)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    args = parser.parse_args()
    ensure_wrk()
    workdir = Path(tempfile.mkdtemp(prefix="jobs-bench-waiting-"))
    workdir.chmod(0o711)  # as root, devdb runs the server as another user
    try:
        with ExitStack() as stack:
            say(f"Starting PostgreSQL in {workdir}")
            pg = start_postgres(workdir)
            stack.callback(pg.destroy)
            db = connect(pg.url)
            with db.cursor() as cur:
                cur.execute((ROOT / "schema.sql").read_text())
                cur.execute(
                    "INSERT INTO jobs (node_id, status, descriptor)"
                    " SELECT 'node-' || (i %% 50), 'COMPLETED', jsonb_build_object('n', i)"
                    " FROM generate_series(1, %s) i",
                    (JOBS,),
                )
                cur.execute("VACUUM ANALYZE jobs")
            result = measure(pg.url, workdir, stack, args.trials, args.duration)
    except BaseException:
        print(f"Bench failed; the servers' logs are kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(section(result)))
    print(f"bench: {summary(result)}")


if __name__ == "__main__":
    main()
