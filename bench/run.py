"""`make bench`: the Jobs service under load, measured against its floors in one run.

    python bench/run.py [--duration 10] [--connections 4] [--service auto|app|naive]
                        [--jobs 1000000] [--bulk-delete 500000] [--leak-requests 100000]

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
- the duration of DELETE /jobs?status=completed over 500,000 jobs, and the
  GET /jobs/{id} p99 that wrk sees meanwhile;
- a worker's RSS after 1,000 and after 100,000 requests.

It prints the tables, writes them with the plans to bench/results/latest.md
(the source for BENCHMARKS.md), and prints the summary line last.

--service: ``auto`` (default) measures the service when wsgi.py exists and
prints n/a for it otherwise; ``app`` insists on it; ``naive`` serves
naive_app.py in its place, which exercises the whole harness before the
service exists.

The SQL behind a request is captured from the server, not taken from the
app's code: while a capture is on, the server logs every statement and
auto_explain logs the plan of every execution with its actual rows, timing
and buffers (EXPLAIN (ANALYZE, BUFFERS) of the very run, generic plans of
prepared statements included), read back through pg_read_file. pgbench
replays a request's statements with their values written in: an EXECUTE of
a prepared statement becomes its PREPARE'd body with the arguments in place
of $1, $2, ..., run with pgbench -M prepared as the service runs it.

Everything shares two cores: wrk runs one thread, and numbers are only
compared within the same run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg2
import seed

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LOAD_LUA = BENCH / "load.lua"
RESULTS = BENCH / "results" / "latest.md"
sys.path.insert(0, str(ROOT))  # for devdb.py, imported where used

PROGRESS_TABLES, PROGRESS_FILES = 10, 10_000
REORG_FROM, REORG_FILES = 5_000, 100  # rewrite files 5000..5099 of table_0

# The server is throwaway; these make it behave like a provisioned one
# (not 128 MB of cache, no checkpoint storms while seeding) and let the
# harness capture the SQL that the apps run (see Plans).
SERVER_SETTINGS = {
    "shared_buffers": "1GB",
    "max_wal_size": "8GB",
    "shared_preload_libraries": "auto_explain",
    "auto_explain.log_min_duration": "-1",
    "auto_explain.log_format": "json",
    # Only while a capture sets log_min_duration to 0: off, they cost nothing.
    "auto_explain.log_analyze": "on",
    "auto_explain.log_buffers": "on",
    "logging_collector": "on",
    "log_line_prefix": "%m [%p] ",
    "log_rotation_age": "0",
    "log_rotation_size": "0",
}


STARTED = time.monotonic()


def say(message: str) -> None:
    """Progress on the console, with the time since the start of the run."""
    print(f"[{time.monotonic() - STARTED:4.0f} s] {message}", flush=True)


# --------------------------------------------------------------------------
# Load generators


@dataclass
class Load:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx/3xx responses plus socket errors


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _wrk_ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)([a-z]+)", text).groups()
    return float(number) * _UNITS_MS[unit]


def parse_wrk(output: str) -> Load:
    def find(pattern: str) -> re.Match:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"unexpected wrk output:\n{output}")
        return match

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return Load(
        requests=int(find(r"^\s*(\d+) requests in")[1]),
        rps=float(find(r"^Requests/sec:\s+([\d.]+)")[1]),
        p50_ms=_wrk_ms(find(r"^\s+50%\s+(\S+)")[1]),
        p99_ms=_wrk_ms(find(r"^\s+99%\s+(\S+)")[1]),
        errors=(int(non_2xx[1]) if non_2xx else 0)
        + (sum(map(int, sockets.groups())) if sockets else 0),
    )


def wrk_argv(
    url: str, seconds: int, connections: int, script_args: list[str] | None = None
) -> list[str]:
    # One thread: the servers under test need the cores more than wrk does.
    argv = ["wrk", "--latency", "-t1", f"-c{connections}", f"-d{seconds}s", url]
    if script_args is not None:
        argv[1:1] = ["-s", str(LOAD_LUA)]
        argv += ["--", *script_args]
    return argv


def id_script(ids: range, *paths: str, stop_after: int = 0, marker: str = "-") -> list[str]:
    """load.lua's arguments: ``paths`` in turn, each {id} drawn from ``ids``."""
    return [str(stop_after), marker, str(ids.start), str(ids[-1]), str(ids.step), *paths]


def run_wrk(url: str, seconds: int, connections: int, script_args: list[str] | None = None) -> Load:
    done = subprocess.run(
        wrk_argv(url, seconds, connections, script_args), capture_output=True, text=True, check=True
    )
    return parse_wrk(done.stdout)


def run_wrk_until(
    url: str, connections: int, script_args: list[str], marker: Path, seconds: int = 3600
) -> Load:
    """Run wrk until load.lua creates ``marker`` (its STOP_AFTER count) or ``seconds``."""
    marker.unlink(missing_ok=True)
    wrk = subprocess.Popen(
        wrk_argv(url, seconds, connections, script_args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not marker.exists() and wrk.poll() is None:
        time.sleep(0.05)
    return interrupt_wrk(wrk)


def interrupt_wrk(wrk: subprocess.Popen) -> Load:
    """Stop a running wrk the way Ctrl-C does: it still prints its statistics."""
    if wrk.poll() is None:
        wrk.send_signal(signal.SIGINT)
    out, err = wrk.communicate(timeout=30)
    if wrk.returncode != 0:
        raise RuntimeError(f"wrk failed ({wrk.returncode}): {err}")
    return parse_wrk(out)


@dataclass
class Probe:
    p50_ms: float
    samples: int
    bad: dict[int, int] = field(default_factory=dict)  # unexpected status -> count


SINGLE_CLIENT_REQUESTS = 200


def single_client(
    port: int,
    path: str,
    max_requests: int = SINGLE_CLIENT_REQUESTS,
    max_seconds: float = 5.0,
    warmup: int = 5,
) -> Probe:
    """Latency one client sees, one request at a time (no queueing behind others).

    Capped in time as well as count, so a slow floor (the naive app reading a
    whole table per request) still finishes with a few dozen samples.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    timings, bad = [], {}
    deadline = time.monotonic() + max_seconds
    for i in range(warmup + max_requests):
        started = time.perf_counter()
        # gunicorn's sync workers close every connection after the response;
        # http.client reconnects by itself, and the connect is part of what
        # a client pays.
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            bad[response.status] = bad.get(response.status, 0) + 1
        if i >= warmup:
            timings.append(elapsed)
            if time.monotonic() > deadline:
                break
    conn.close()
    return Probe(statistics.median(timings) * 1000, len(timings), bad)


def request(port: int, method: str, path: str, body=None) -> tuple[int, float]:
    """One request; returns its status and duration in seconds."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    started = time.perf_counter()
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    response = conn.getresponse()
    response.read()
    elapsed = time.perf_counter() - started
    conn.close()
    return response.status, elapsed


def get_json(port: int, path: str):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return payload


def pgbench(
    url: str,
    statements: list[str],
    seconds: int,
    connections: int,
    workdir: Path,
    prepared: bool = False,
) -> float:
    """Transactions per second of ``statements`` run back to back, as a script.

    ``prepared``: each statement is prepared once per connection, as the
    service does (-M prepared), rather than sent as text every time.
    """
    import devdb

    script = workdir / "pgbench.sql"
    script.write_text("".join(s.strip().rstrip(";") + ";\n" for s in statements))
    done = subprocess.run(
        [
            str(devdb.bin_dir() / "pgbench"),
            "-n",
            "-Mprepared" if prepared else "-Msimple",
            f"-c{connections}",
            "-j1",
            f"-T{seconds}",
            "-f",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(re.search(r"tps = ([\d.]+)", done.stdout)[1])


# --------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def workers(self) -> list[int]:
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return sorted(map(int, children))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # gunicorn: graceful shutdown
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Launch:
    """How to start one app under gunicorn."""

    argv: list[str]
    cwd: Path
    port: int
    env: dict[str, str] = field(default_factory=dict)


def floor_launch(module: str, workers: int) -> Launch:
    # The service's own settings for the floors: sync workers, same count.
    port = free_port()
    return Launch(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(workers),
            "--worker-class",
            "sync",
            "--bind",
            f"127.0.0.1:{port}",
            f"{module}:app",
        ],
        BENCH,
        port,
    )


def start_server(
    name: str, launch: Launch, env: dict[str, str], workdir: Path, ready_path: str
) -> Server:
    log = workdir / f"{name}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            launch.argv,
            cwd=launch.cwd,
            env={**os.environ, **launch.env, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(name, launch.port, process)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited at start-up:\n{log.read_text()[-3000:]}")
        try:
            request(launch.port, "GET", ready_path)
            return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{name} did not answer within 30 s:\n{log.read_text()[-3000:]}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


# --------------------------------------------------------------------------
# PostgreSQL


def start_postgres(workdir: Path):
    import devdb

    pg = devdb.LocalPostgres(str(workdir / "pgdata"), durable=False)
    pg.start()
    conn = connect(pg.url)
    with conn.cursor() as cur:
        cur.execute("LOAD 'auto_explain'")  # so ALTER SYSTEM knows its settings
        for name, value in SERVER_SETTINGS.items():
            cur.execute(f"ALTER SYSTEM SET {name} = %s", (value,))
    conn.close()
    pg.stop()  # shared_buffers, the preload and the log collector need a restart
    pg.start()
    return pg


def connect(url: str):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    return conn


@dataclass
class Captured:
    """One statement another session ran: as sent, as pgbench can replay it, its plans."""

    sent: str
    replay: str
    prepared: bool
    plan_json: dict | None = None
    plan_text: str = ""

    def shown(self) -> str:
        if not self.prepared:
            return self.sent.strip()
        return f"{self.sent.strip()}\n-- which runs:\n{self.replay.strip()}"


class Plans:
    """The SQL that other sessions run during an action, and its plans.

    auto_explain is preloaded but off (log_min_duration = -1); a capture
    turns it and log_statement on with a configuration reload, which every
    idle backend applies before its next statement, so the apps keep their
    connections. An action is captured twice, once per plan format.
    """

    ENTRY = re.compile(r"^\S+ \S+ \S+ \[(\d+)\] (LOG|DETAIL):  (.*)$")

    def __init__(self, conn):
        self.conn = conn
        with conn.cursor() as cur:
            cur.execute("SELECT pg_current_logfile()")
            self.logfile = cur.fetchone()[0]
        if self.logfile is None:
            raise RuntimeError("the server has no log file (logging_collector is off)")

    def _log_size(self) -> int:
        with self.conn.cursor() as cur:
            cur.execute("SELECT size FROM pg_stat_file(%s)", (self.logfile,))
            return cur.fetchone()[0]

    def _set_logging(self, on: bool, plan_format: str = "json") -> None:
        with self.conn.cursor() as cur:
            cur.execute("ALTER SYSTEM SET auto_explain.log_min_duration = %s", (0 if on else -1,))
            cur.execute("ALTER SYSTEM SET auto_explain.log_format = %s", (plan_format,))
            cur.execute("ALTER SYSTEM SET log_statement = %s", ("all" if on else "none",))
            cur.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)  # backends take the reload between statements

    def _read(self, action: Callable[[], object], plan_format: str) -> list[tuple[str, str]]:
        """(kind, text) of each log entry of the other sessions during ``action()``."""
        self._set_logging(True, plan_format)
        start = self._log_size()
        try:
            action()
        finally:
            self._set_logging(False)
        # The collector writes asynchronously: wait until the log stops growing.
        end = self._log_size()
        while True:
            time.sleep(0.2)
            size = self._log_size()
            if size == end:
                break
            end = size
        with self.conn.cursor() as cur:
            cur.execute("SELECT pg_read_file(%s, %s, %s)", (self.logfile, start, end - start))
            text = cur.fetchone()[0]
        ours = self.conn.get_backend_pid()
        entries, lines = [], text.splitlines()
        for i, line in enumerate(lines):
            match = self.ENTRY.match(line)
            if not match or int(match[1]) == ours:
                continue
            # An entry continues on the following lines, each indented by one tab.
            body = [match[3]]
            for following in lines[i + 1 :]:
                if not following.startswith("\t"):
                    break
                body.append(following[1:])
            entries.append((match[2], "\n".join(body)))
        return entries

    def capture(self, action: Callable[[], object]) -> list[Captured]:
        """The statements of ``action()`` (run twice) with their executed plans."""
        captured: list[Captured] = []
        for kind, text in self._read(action, "json"):
            if kind == "LOG" and text.startswith("statement: "):
                sent = text.removeprefix("statement: ")
                captured.append(Captured(sent, sent, prepared=False))
            elif kind == "DETAIL" and text.startswith("prepare: ") and captured:
                last = captured[-1]
                last.replay = replay_execute(last.sent, text.removeprefix("prepare: "))
                last.prepared = True
            elif kind == "LOG" and text.startswith("duration: "):
                plan = json.loads(text.split("\n", 1)[1])
                executed = [c for c in captured if c.plan_json is None]
                if executed:
                    executed[-1].plan_json = plan["Plan"]
        plans = [
            plan_tree(text)
            for kind, text in self._read(action, "text")
            if kind == "LOG" and text.startswith("duration: ")
        ]
        with_plans = [c for c in captured if c.plan_json is not None]
        for entry, plan in zip(with_plans, plans, strict=False):
            entry.plan_text = plan
        return with_plans


def plan_tree(entry: str) -> str:
    """The plan of a text-format auto_explain entry, without its Query Text."""
    lines = entry.splitlines()
    root = next(i for i, line in enumerate(lines) if i and re.match(r"^\S.*\(cost=", line))
    return "\n".join(lines[root:])


def split_arguments(text: str) -> list[str]:
    """Top-level comma-separated SQL expressions (commas in quotes or brackets stay)."""
    parts, depth, quoted, current = [], 0, False, []
    for char in text:
        if quoted:
            quoted = char != "'"
        elif char == "'":
            quoted = True
        elif char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return parts


def replay_execute(execute: str, prepare: str) -> str:
    """``EXECUTE name (args)`` as plain SQL: the PREPARE'd body with each $n replaced."""
    args = split_arguments(execute.strip().rstrip(";").split("(", 1)[1].rsplit(")", 1)[0])
    header = re.match(r"PREPARE\s+\w+\s*(\(([^)]*)\))?\s+AS\s+", prepare, re.IGNORECASE)
    types = split_arguments(header[2]) if header[2] else []
    body = prepare[header.end() :]
    for n in range(len(args), 0, -1):  # $10 before $1
        cast = f"::{types[n - 1]}" if n <= len(types) else ""
        body = re.sub(rf"\${n}(?!\d)", f"({args[n - 1]}){cast}", body)
    return body


def jobs_rows_read(plan: dict) -> int:
    """Rows of ``jobs`` a plan looked at: returned by its scans or filtered out by them.

    A plan that walks an index across the table filtering nearly everything
    out reads the whole table as surely as a Seq Scan does, and shows up here.
    """

    def nodes(node):
        yield node
        for child in node.get("Plans", []):
            yield from nodes(child)

    return round(
        sum(
            (
                n["Actual Rows"]
                + n.get("Rows Removed by Filter", 0)
                + n.get("Rows Removed by Index Recheck", 0)
            )
            * n["Actual Loops"]
            for n in nodes(plan)
            if n.get("Relation Name") == "jobs"
        )
    )


# --------------------------------------------------------------------------
# The run


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
    def __init__(self, args, workdir: Path, stack: ExitStack):
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
        self.servers = {
            "constant": self.serve("constant", floor_launch("constant_app", 2)),
            "naive": self.serve("naive", floor_launch("naive_app", 2)),
        }
        service = self.service_launch(workers=2)
        if service is not None:
            self.servers["service"] = self.serve("service", service)

    # -- servers

    def service_launch(self, workers: int) -> Launch | None:
        """How to start the service, or None when it is absent and may be."""
        if self.args.service == "naive":
            return floor_launch("naive_app", workers)
        if not (ROOT / "wsgi.py").exists():
            if self.args.service == "app":
                raise SystemExit("--service app: wsgi.py does not exist yet")
            self.notes.append("The service (wsgi.py) does not exist yet: its rows read n/a.")
            return None
        port = free_port()
        # Its metrics files default to a directory per port under /tmp that
        # outlives the server; in the workdir they go when the run ends.
        env = {
            "PORT": str(port),
            "WEB_CONCURRENCY": str(workers),
            "PROMETHEUS_MULTIPROC_DIR": str(self.workdir / f"metrics-{port}"),
        }
        return Launch(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            ROOT,
            port,
            env,
        )

    def serve(self, name: str, launch: Launch) -> Server:
        # /jobs/1: a path every app answers, with a database round trip where
        # there is a database, so the first measured request opens nothing.
        server = start_server(name, launch, {"DATABASE_URL": self.pg.url}, self.workdir, "/jobs/1")
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

    def throughput(self) -> None:
        ids = range(1, self.scenarios["mixed"].jobs + 1)
        endpoints = {
            "GET /jobs?limit=50": ("/jobs?limit=50", None),
            "GET /jobs/{id}": ("/", id_script(ids, "/jobs/{id}")),
        }
        seconds, connections = self.args.duration, self.args.connections
        for app, server in self.servers.items():
            for endpoint, (path, script) in endpoints.items():
                if app == "constant" and endpoint != "GET /jobs/{id}":
                    continue
                run_wrk(server.url(path), min(2, seconds), connections, script)  # warm-up
                load = run_wrk(server.url(path), seconds, connections, script)
                self.loads[(app, endpoint)] = load
                say(
                    f"{app:8} {endpoint:20} {load.rps:8.0f} req/s  p50 {load.p50_ms:.2f} ms"
                    f"  p99 {load.p99_ms:.2f} ms  errors {load.errors}"
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
                server.url(),
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
        script = id_script(ids, "/jobs/{id}")
        run_wrk(self.service.url(), min(2, self.args.duration), 2, script)  # warm-up
        # Two connections: one per worker, one of which is busy deleting.
        wrk = subprocess.Popen(
            wrk_argv(self.service.url(), 3600, 2, script),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(0.2)  # let wrk connect before the delete starts
            status, seconds = request(self.service.port, "DELETE", "/jobs?status=completed")
        except (OSError, http.client.HTTPException) as exc:
            # Most likely gunicorn's timeout killing the worker mid-delete.
            self.notes.append(f"DELETE /jobs?status=completed got no answer: {exc!r}")
            status, seconds = "none", None
        finally:
            load = interrupt_wrk(wrk)
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


# --------------------------------------------------------------------------
# Report


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def probe_ms(probe: Probe | None) -> str:
    """A p50, and the statuses other than 200 that came with it."""
    if probe is None:
        return "n/a"
    notes = [f"{count}x HTTP {status}" for status, count in probe.bad.items()]
    if probe.samples < SINGLE_CLIENT_REQUESTS:  # cut short by the time cap
        notes.append(f"{probe.samples} requests")
    return f"{probe.p50_ms:.2f}" + (f" ({', '.join(notes)})" if notes else "")


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    )


def verdict(value: float | None, ok: bool) -> str:
    return "n/a" if value is None else ("yes" if ok else "NO")


def git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, Linux {platform.release()}"


def report(bench: Bench) -> tuple[str, str]:
    """The Markdown report and the one-line summary."""
    args, loads = bench.args, bench.loads

    def rps(app, endpoint):
        load = loads.get((app, endpoint))
        return load and load.rps

    service_list = loads.get(("service", "GET /jobs?limit=50"))
    list_vs_naive = ratio(rps("service", "GET /jobs?limit=50"), rps("naive", "GET /jobs?limit=50"))
    get_vs_constant = ratio(rps("service", "GET /jobs/{id}"), rps("constant", "GET /jobs/{id}"))
    skew_p50 = [s.service.p50_ms for s in bench.skews if s.service]
    skew_spread = ratio(max(skew_p50), min(skew_p50)) if skew_p50 else None
    skew_max = max(skew_p50) if skew_p50 else None
    whole_table = [s.label for s in bench.skews if s.reads_table()]
    service_progress = [v.p50_ms for k, v in bench.progress.items() if k.startswith("service")]
    progress_p50 = max(service_progress) if service_progress else None
    delete_s, delete_p99 = bench.delete.get("seconds"), bench.delete.get("p99_ms")
    rss_growth = (
        100 * (bench.rss["after_all_kib"] / bench.rss["after_1k_kib"] - 1) if bench.rss else None
    )

    service_name = {"naive": "naive_app.py standing in for the service"}.get(
        args.service, "wsgi:app with gunicorn.conf.py"
    )
    out = [
        "# Jobs service benchmark",
        "",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; commit {git_commit()}",
        f"- Machine: {machine()}",
        f"- Service: {service_name}; floors: bench/constant_app.py and bench/naive_app.py"
        " under gunicorn, 2 sync workers",
        f"- Load: wrk -t1 -c{args.connections}, {args.duration} s per run after a warm-up;"
        f" single-client p50 over up to {SINGLE_CLIENT_REQUESTS} sequential requests",
        f"- Reproduce: `make bench` (or `python bench/run.py --duration {args.duration}`)",
        f"- Wall time: {(time.monotonic() - STARTED) / 60:.1f} min; seeding: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in bench.seed_seconds.items()),
        "",
        "## Targets",
        "",
        table(
            ["target", "measured", "goal", "met"],
            [
                [
                    "GET /jobs?limit=50 vs naive view",
                    f"{fmt(list_vs_naive)}x",
                    ">= 2x",
                    verdict(list_vs_naive, (list_vs_naive or 0) >= 2),
                ],
                [
                    f"GET /jobs?limit=50 p99 at {args.connections} connections",
                    f"{fmt(service_list and service_list.p99_ms)} ms",
                    "<= 10 ms",
                    verdict(service_list, service_list is not None and service_list.p99_ms <= 10),
                ],
                [
                    "GET /jobs/{id} vs constant view",
                    f"{fmt(get_vs_constant)}x",
                    ">= 0.75x",
                    verdict(get_vs_constant, (get_vs_constant or 0) >= 0.75),
                ],
                [
                    "skew listings: slowest / fastest p50",
                    f"{fmt(skew_spread)}x",
                    "<= 2x",
                    verdict(skew_spread, (skew_spread or 99) <= 2),
                ],
                [
                    "skew listings: slowest p50",
                    f"{fmt(skew_max)} ms",
                    "< 5 ms",
                    verdict(skew_max, (skew_max or 99) < 5),
                ],
                [
                    "skew listings: plans reading the whole table",
                    ", ".join(whole_table) or ("none" if skew_p50 else "n/a"),
                    "none",
                    verdict(skew_max, not whole_table),
                ],
                [
                    "progress p50, 10 x 10,000 files (worst of before/after reorg)",
                    f"{fmt(progress_p50)} ms",
                    "<= 20 ms",
                    verdict(progress_p50, (progress_p50 or 99) <= 20),
                ],
                [
                    f"bulk delete of {args.bulk_delete:,} jobs",
                    f"{fmt(delete_s, 1)} s",
                    "reported",
                    "n/a" if delete_s is None else "-",
                ],
                [
                    "GET /jobs/{id} p99 during the bulk delete",
                    f"{fmt(delete_p99)} ms",
                    "< 50 ms",
                    verdict(delete_p99, (delete_p99 or 99) < 50),
                ],
                [
                    f"worker RSS growth, 1,000 -> {args.leak_requests:,} requests",
                    f"{fmt(rss_growth, 1)} %",
                    "within 10 %",
                    verdict(rss_growth, abs(rss_growth or 99) <= 10),
                ],
            ],
        ),
        "",
        f"## Throughput ({bench.scenarios['mixed'].description})",
        "",
        table(
            ["app", "endpoint", "req/s", "p50 ms", "p99 ms", "errors"],
            [
                [
                    app,
                    endpoint,
                    f"{load.rps:.0f}",
                    fmt(load.p50_ms),
                    fmt(load.p99_ms),
                    str(load.errors),
                ]
                for (app, endpoint), load in loads.items()
            ]
            + [
                [
                    f"pgbench -c{args.connections}",
                    f"{app}'s list SQL" + (" (prepared)" if app == "service" else ""),
                    f"{tps:.0f} tps",
                    "",
                    "",
                    "",
                ]
                for app, tps in bench.tps.items()
            ],
        ),
        "",
        "## Skew-proof listing (single client)",
        "",
        table(
            [
                "listing",
                "table",
                "service p50 ms",
                "naive p50 ms",
                "jobs rows the service's plan read",
            ],
            [
                [
                    f"{s.label}: `{s.path}`",
                    s.scenario,
                    probe_ms(s.service),
                    probe_ms(s.naive),
                    "n/a"
                    if not s.plans
                    else f"{sum(rows for _, rows in s.plans):,} of {s.table_rows:,}"
                    + (" (a scan)" if s.reads_table() else ""),
                ]
                for s in bench.skews
            ],
        ),
        "",
        "## Progress, bulk delete, memory",
        "",
        table(
            ["measurement", "value"],
            [
                *([f"progress p50 ms, {k}", probe_ms(v)] for k, v in bench.progress.items()),
                [
                    "reorg registration (100 files, POST)",
                    f"HTTP {bench.delete['reorg_status']}"
                    f" in {bench.delete['reorg_s'] * 1000:.0f} ms"
                    if "reorg_status" in bench.delete
                    else "n/a",
                ],
                [
                    "bulk delete",
                    f"HTTP {bench.delete['status']} in {fmt(delete_s, 1)} s,"
                    f" {bench.delete['completed_left']} completed and {bench.delete['jobs_left']:,}"
                    " jobs left"
                    if "status" in bench.delete
                    else "n/a",
                ],
                [
                    "GET /jobs/{id} during the delete (wrk -c2)",
                    f"{bench.delete['reads']} reads, p50 {bench.delete['p50_ms']:.2f} ms,"
                    f" p99 {bench.delete['p99_ms']:.2f} ms, errors {bench.delete['errors']}"
                    if "status" in bench.delete
                    else "n/a",
                ],
                [
                    "worker RSS (one worker)",
                    f"{bench.rss['after_1k_kib']:,} KiB after 1,000 requests,"
                    f" {bench.rss['after_all_kib']:,} KiB after {args.leak_requests:,}"
                    if bench.rss
                    else "n/a",
                ],
            ],
        ),
    ]
    if bench.notes:
        out += ["", "## Notes", "", *(f"- {note}" for note in bench.notes)]
    plans = [(s, p) for s in bench.skews for p in s.plans]
    if plans:
        out += ["", "## Plans of the skew listings (the service's SQL, EXPLAIN ANALYZE, BUFFERS)"]
        for skew, (text, _) in plans:
            out += ["", f"### {skew.label} ({skew.scenario})", "", "```", text, "```"]
    summary = (
        f"bench: list_vs_naive={fmt(list_vs_naive)} get_vs_constant={fmt(get_vs_constant)}"
        f" skew_spread={fmt(skew_spread)} skew_max_p50_ms={fmt(skew_max)}"
        f" progress_p50_ms={fmt(progress_p50)} delete_500k_s={fmt(delete_s, 1)}"
        f" read_p99_during_delete_ms={fmt(delete_p99)} rss_growth_pct={fmt(rss_growth, 1)}"
    )
    return "\n".join(out) + "\n", summary


# --------------------------------------------------------------------------


def ensure_wrk() -> None:
    """wrk comes from Debian's packages; install it on first use."""
    if shutil.which("wrk"):
        return
    say("wrk is missing: installing it with apt-get")
    if subprocess.run(["apt-get", "install", "-y", "-q", "wrk"]).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True)


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
    args = parser.parse_args()
    ensure_wrk()
    workdir = Path(tempfile.mkdtemp(prefix="jobs-bench-"))
    # As root, devdb runs the server as another user, who must reach its datadir.
    workdir.chmod(0o711)
    try:
        with ExitStack() as stack:
            say(f"Starting PostgreSQL and the apps in {workdir}")
            bench = Bench(args, workdir, stack)
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
            bench.pgbench_lists()
            bench.progress_and_reorg(progress_job)
            bench.leak(progress_job)
            bench.seed("bulk_delete")
            bench.bulk_delete()
    except BaseException:
        print(f"Bench failed; servers' logs are kept in {workdir}", file=sys.stderr)
        raise
    markdown, summary = report(bench)
    shutil.rmtree(workdir, ignore_errors=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(markdown)
    print()
    print(markdown)
    print(f"Written to {RESULTS.relative_to(ROOT)}")
    print(summary)


if __name__ == "__main__":
    main()
