"""Helpers shared by the test modules; the fixtures (app, client, runner, ...) are in conftest.py.

Test modules import from here and never from each other. What is here, in order:

- Values and bodies: ``MAX_ID``, ``block_hash``, ``file_entry``, ``expected_progress``.
- Answers: ``assert_error`` (the error shape of every 4xx/5xx; returns the message).
- The status machine, written out from the API reference: ``STATUSES``, ``ACTIVE``,
  ``TERMINAL``, ``REPORTABLE``, ``WORKER_MOVES``, ``STOPPABLE``, ``LEGAL_MOVES``,
  ``LEASE_MOVES`` (what a lost worker's lease expiry does).
- Workers: ``lose_worker`` (its heartbeat pushed into the past), ``sweep_leases``
  (the lease chore, run once in process).
- The canonical chain recomputed from its definition: ``reference_chain`` (its files),
  ``reference_progress`` (its summary).
- Databases that fail on purpose: ``closed_database_url``, ``Refuser``, ``Blackhole``;
  ``init_db`` for a database of a test's own.
- The real service under gunicorn (as production runs it): ``Server``, ``serving``,
  ``http_caller``, ``free_port``, ``worker_pids``, ``wait_for_workers``.
- Requests through a ``Call``, the same over the Flask test client (``flask_caller``)
  and over HTTP (``http_caller``): ``create_job``, ``move_to``, ``job_statuses``,
  ``events_of``, ``history_problems``.
- Racing requests: ``race`` runs tasks in threads released together;
  ``wait_until_blocked`` waits for requests to queue on a lock; ``audit_trail``
  records every status change in the database.
- Race workloads shared by test_races.py (in process) and test_scaleout.py (two
  gunicorn instances): ``run_chaos``, ``race_retries_against_deletes``,
  ``race_completed_against_failed``, ``race_idempotent_creations``. They send
  requests and return what they saw; the tests make the assertions.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import psycopg2
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from jobs import db
from jobs.chores import leases

ROOT = Path(__file__).resolve().parent.parent

# ---- Values and bodies ---------------------------------------------------------------

MAX_ID = 2**63 - 1  # the largest job ID, block number and size: PostgreSQL's bigint


def block_hash(n: int) -> str:
    """A well-formed block hash (0x and 64 hex digits), distinct for each ``n``."""
    return "0x" + f"{n:064x}"


def file_entry(
    name: str,
    start: int,
    end: int,
    size: int = 1,
    block_hash: str | None = None,
    prev_hash: str | None = None,
) -> dict:
    """One file of POST /jobs/{id}/tables/{table}/files; hashes left out when None."""
    body = {"file_name": name, "start_block": start, "end_block": end, "size_bytes": size}
    if block_hash is not None:
        body["block_hash"] = block_hash
    if prev_hash is not None:
        body["prev_hash"] = prev_hash
    return body


def expected_progress(start, current, files_count: int, total_size_bytes: int) -> dict:
    """One table's entry of GET /jobs/{id}/progress."""
    return {
        "start_block": start,
        "current_block": current,
        "files_count": files_count,
        "total_size_bytes": total_size_bytes,
    }


# ---- Answers ------------------------------------------------------------------------

LEAKS_IN_MESSAGES = ("Traceback", "psycopg2", "SELECT ", "INSERT ", 'File "')


def assert_error(response, status: int, code: str) -> str:
    """A Flask test response is exactly the error shape; returns its message.

    JSON ``{"error_code", "error_message"}`` and nothing else, the code given,
    a message that says something and leaks no stack trace or SQL.
    """
    assert response.status_code == status, (response.status_code, response.data[:400])
    assert response.mimetype == "application/json", response.headers
    body = json.loads(response.data)
    assert set(body) == {"error_code", "error_message"}, body
    assert body["error_code"] == code, body
    message = body["error_message"]
    assert isinstance(message, str) and message.strip(), body
    for leak in LEAKS_IN_MESSAGES:
        assert leak not in message, body
    return message


# ---- The status machine (docs/API.md), written out rather than taken from schemas.py ----

STATUSES = ("SCHEDULED", "RUNNING", "STOP_REQUESTED", "STOPPING", "COMPLETED", "STOPPED", "FAILED")
ACTIVE = ("SCHEDULED", "RUNNING", "STOP_REQUESTED", "STOPPING")
TERMINAL = ("COMPLETED", "STOPPED", "FAILED")
# Everything a worker may report (PUT /jobs/{id}/status).
REPORTABLE = ("RUNNING", "COMPLETED", "FAILED", "STOPPING", "STOPPED", "SCHEDULED")
# The transition table, row by row: from -> the statuses a worker may report.
WORKER_MOVES = {
    "SCHEDULED": {"RUNNING", "FAILED"},
    "RUNNING": {"COMPLETED", "FAILED"},
    "STOP_REQUESTED": {"FAILED", "STOPPING"},
    "STOPPING": {"FAILED", "STOPPED"},
    "FAILED": {"SCHEDULED"},
    "COMPLETED": set(),
    "STOPPED": set(),
}
# The statuses an operator's stop (PUT|POST /jobs/{id}/stop) moves to STOP_REQUESTED.
STOPPABLE = {"SCHEDULED", "RUNNING"}
# Every legal move (from, to): the workers' and the operators'.
LEGAL_MOVES = {(f, t) for f, tos in WORKER_MOVES.items() for t in tos} | {
    (f, "STOP_REQUESTED") for f in STOPPABLE
}
# The moves a lease expiry makes when the job's registered worker is LOST.
LEASE_MOVES = {("RUNNING", "FAILED"), ("STOP_REQUESTED", "STOPPED"), ("STOPPING", "STOPPED")}


# ---- The canonical chain, recomputed --------------------------------------------------


def _links(tip: dict, file: dict) -> bool:
    if file["start_block"] != tip["end_block"] + 1:
        return False
    if tip.get("block_hash") is None or file.get("prev_hash") is None:
        return True
    return file["prev_hash"].lower() == tip["block_hash"].lower()


def reference_chain(files: list[dict]) -> list[dict]:
    """The files of one table's canonical chain, in order; ``files`` in registration order.

    Written from the definition alone and built differently from ``chain.walk``:
    the chain grows greedily, each step choosing, among every file that starts
    right after the tip and links to it by hash, the one registered last.
    """
    if not files:
        return []
    lowest = min(f["start_block"] for f in files)
    # Registration order: a higher index is registered later, so it wins a tie.
    first = max(i for i, f in enumerate(files) if f["start_block"] == lowest)
    picked = [files[first]]
    while True:
        tip = picked[-1]
        linking = [i for i, f in enumerate(files) if _links(tip, f)]
        if not linking:
            break
        picked.append(files[max(linking)])
    return picked


def reference_progress(files: list[dict]) -> dict:
    """One table's progress entry; ``files`` is every file in registration order."""
    picked = reference_chain(files)
    if not picked:
        return expected_progress(None, None, 0, 0)
    return expected_progress(
        picked[0]["start_block"],
        picked[-1]["end_block"],
        len(picked),
        sum(f["size_bytes"] for f in picked),
    )


# ---- Databases that fail on purpose, and databases of a test's own ----------------------


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (until someone binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_database_url() -> str:
    """A PostgreSQL URL where nothing listens: connection refused."""
    return f"postgresql://postgres@127.0.0.1:{free_port()}/jobs"


class _Listener:
    """A TCP server on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.held: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def url(self, dbname: str = "jobs") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _serve(self):
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()
        for conn in self.held:
            with contextlib.suppress(OSError):
                conn.close()


class Refuser(_Listener):
    """Accepts, then hangs up at once: libpq fails immediately (``accepted`` counts tries)."""

    def handle(self, conn):
        conn.close()


class Blackhole(_Listener):
    """Accepts and never answers nor closes: to libpq, a server that vanished without a RST."""

    def handle(self, conn):
        self.held.append(conn)


def init_db(database_url: str) -> None:
    """``flask init-db`` in process: the schema, on a database of a test's own."""
    app = create_app({"TESTING": True, "DATABASE_URL": database_url})
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output


# ---- The real service under gunicorn --------------------------------------------------
#
#     with serving(database_url) as server:
#         call = server.caller()
#         status, body = call("GET", "/jobs/1")
#
# ``Server`` runs ``gunicorn -c gunicorn.conf.py wsgi:app`` exactly as production
# does, on a free port, with its own PROMETHEUS_MULTIPROC_DIR and log file;
# ``start`` waits for /healthz and ``stop`` sends SIGTERM (gunicorn's graceful
# shutdown), then kills the process group it started if that takes too long.
# Always stop it: use ``serving`` or a fixture with a ``finally``.

Call = Callable[..., tuple[int, object]]  # call(method, path, body=None) -> (status, JSON or None)


def http_caller(
    port: int, host: str = "127.0.0.1", headers: dict | None = None, timeout=30
) -> Call:
    """``call(method, path, body=None) -> (status, parsed JSON or None)``, one connection each."""

    def call(method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        sent = dict(headers or {})
        if data is not None:
            sent["Content-Type"] = "application/json"
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return response.status, parsed

    return call


class Server:
    """One gunicorn instance of the service (a master and ``workers`` workers)."""

    def __init__(
        self,
        database_url: str,
        port: int | None = None,
        workers: int = 2,
        env: dict[str, str] | None = None,
    ):
        self.port = port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"jobs-gunicorn-{self.port}-"))
        self.log_path = self.workdir / "server.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("ADMIN_TOKEN", "WORKER_TOKEN")},
            "DATABASE_URL": database_url,
            "PORT": str(self.port),
            "WEB_CONCURRENCY": str(workers),
            "PROMETHEUS_MULTIPROC_DIR": str(self.workdir / "metrics"),
            "GRACEFUL_TIMEOUT": "5",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def caller(self, **kwargs) -> Call:
        return http_caller(self.port, **kwargs)

    def launch(self) -> Server:
        """Start the process without waiting; ``wait_ready`` (or ``start``) waits."""
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() can reach the workers
        )
        return self

    def wait_ready(self, timeout: float = 30) -> Server:
        deadline = time.monotonic() + timeout
        call = http_caller(self.port, timeout=2)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if call("GET", "/healthz")[0] == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"gunicorn did not answer /healthz in {timeout}s:\n{self.log()}")

    def start(self, timeout: float = 30) -> Server:
        self.launch()
        try:
            return self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM the master (graceful), then SIGKILL its process group if it lingers."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                code = self.process.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def serving(database_url: str, count: int = 1, **kwargs):
    """Start ``count`` instances (in parallel), yield one Server or a list; always stop them."""
    servers = [Server(database_url, **kwargs) for _ in range(count)]
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready()
        yield servers[0] if count == 1 else servers
    finally:
        for server in servers:
            server.stop()
            server.cleanup()


@contextlib.contextmanager
def table_locked(url: str, *tables: str):
    """Hold an ACCESS EXCLUSIVE lock on ``tables`` (default: jobs) from another
    connection inside the block."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"LOCK TABLE {', '.join(tables or ('jobs',))} IN ACCESS EXCLUSIVE MODE")
        yield conn
    finally:
        conn.rollback()
        conn.close()


def worker_pids(master_pid: int) -> set[int]:
    """The children of ``master_pid`` (gunicorn's workers, PostgreSQL's backends), from /proc."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            # pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
            if int(stat.rsplit(")", 1)[1].split()[1]) == master_pid:
                pids.add(int(entry.name))
    return pids


def wait_for_workers(master_pid: int, count: int, timeout: float = 15) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = worker_pids(master_pid)
        if len(pids) == count:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"expected {count} workers, found {worker_pids(master_pid)}")


# ---- Requests through a Call -----------------------------------------------------------

# How to bring a new (SCHEDULED) job to each status ("stop" is the operator's
# stop); RETRIED is a job that failed and was scheduled again.
SETUP_PATHS = {
    "SCHEDULED": [],
    "RUNNING": ["RUNNING"],
    "STOP_REQUESTED": ["stop"],
    "STOPPING": ["stop", "STOPPING"],
    "COMPLETED": ["RUNNING", "COMPLETED"],
    "FAILED": ["RUNNING", "FAILED"],
    "STOPPED": ["stop", "STOPPING", "STOPPED"],
    "RETRIED": ["FAILED", "SCHEDULED"],
}


def flask_caller(app) -> Call:
    """A ``Call`` over the app's test client."""
    client = app.test_client()

    def call(method: str, path: str, body=None):
        kwargs = {} if body is None else {"json": body}
        response = client.open(path, method=method, **kwargs)
        return response.status_code, response.get_json(silent=True)

    return call


def create_job(call: Call, node_id: str = "worker-01", **extra) -> dict:
    """A new job (setup: fails the test unless it is created)."""
    code, body = call("POST", "/jobs", {"node_id": node_id, "descriptor": {}, **extra})
    assert code == 201, body
    return body


def move_to(call: Call, job_id: int, status: str) -> None:
    """Bring a new job to ``status`` along SETUP_PATHS (setup: every step must succeed)."""
    for step in SETUP_PATHS[status]:
        if step == "stop":
            code, body = call("PUT", f"/jobs/{job_id}/stop")
        else:
            code, body = call("PUT", f"/jobs/{job_id}/status", {"status": step})
        assert code == 200, body


def job_statuses(call: Call) -> dict[int, str]:
    """Every job that exists, id -> status, through the paginated listing."""
    jobs: dict[int, str] = {}
    path = "/jobs?status=all&limit=1000"
    while True:
        code, body = call("GET", path)
        assert code == 200, body
        jobs.update((j["id"], j["status"]) for j in body["jobs"])
        if body["next_cursor"] is None:
            return jobs
        path = f"/jobs?status=all&limit=1000&last_job_id={body['next_cursor']}"


def events_of(call: Call, job_id: int) -> list[dict]:
    code, body = call("GET", f"/jobs/{job_id}/events")
    assert code == 200, body
    return body["events"]


def history_problems(
    job_id: int, status: str, events: list[dict], moves: set = LEGAL_MOVES
) -> list[str]:
    """What keeps ``events`` from being a legal path ending in ``status`` (none: legal).

    A legal path: created SCHEDULED, only ``moves`` (no repeats), ending in
    ``status``, event IDs and timestamps ascending.
    """
    types = [e["event_type"] for e in events]
    if not types:
        return [f"job {job_id} has no events"]
    problems = []
    if types[0] != "SCHEDULED":
        problems.append(f"job {job_id} did not start SCHEDULED: {types}")
    for before, after in pairwise(types):
        if (before, after) not in moves:
            problems.append(f"job {job_id}: illegal {before}->{after}: {types}")
    if types[-1] != status:
        problems.append(f"job {job_id} is {status} but its events end in {types[-1]}: {types}")
    ids = [e["id"] for e in events]
    if ids != sorted(set(ids)):
        problems.append(f"job {job_id}: event ids out of order: {ids}")
    stamps = [e["created_at"] for e in events]
    if stamps != sorted(stamps):
        problems.append(f"job {job_id}: event times out of order: {stamps}")
    return problems


def illegal_histories(call: Call, statuses: dict[int, str]) -> list[str]:
    """``history_problems`` of each job in ``statuses`` (id -> its current status)."""
    return [
        problem
        for job_id, status in statuses.items()
        for problem in history_problems(job_id, status, events_of(call, job_id))
    ]


def _error_code(body) -> str | None:
    return body.get("error_code") if isinstance(body, dict) else None


# ---- Workers and leases ------------------------------------------------------------------


def lose_worker(database_url: str, node_id: str, seconds: float = 3600) -> None:
    """Make a registered worker LOST at once: its last heartbeat ``seconds`` earlier."""
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE workers SET heartbeat_at = heartbeat_at - make_interval(secs => %s)"
                " WHERE node_id = %s",
                (seconds, node_id),
            )
            assert cur.rowcount == 1, f"worker {node_id} is not registered"
    finally:
        conn.close()


def sweep_leases(app) -> dict[str, int]:
    """Run the lease chore once in process, unclaimed: the jobs it moved, by new status."""
    with app.app_context(), db.transaction() as cur:
        return leases.expire_leases(cur, app.config)


# ---- Racing requests -------------------------------------------------------------------


def race(make_call: Callable[[], Call], tasks: list[Callable], timeout: float = 60) -> list:
    """Run ``task(call, barrier)`` for each task in its own thread, all released together.

    Returns each task's result, in order. The barrier is passed on so a task can
    meet the others again (lock-step rounds). An exception in a task (or a
    thread still running after ``timeout``) fails the caller.
    """
    barrier = threading.Barrier(len(tasks))
    results: list = [None] * len(tasks)
    errors: list[BaseException] = []

    def run(i: int, task) -> None:
        try:
            call = make_call()
            barrier.wait(timeout=timeout)
            results[i] = task(call, barrier)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i, t), daemon=True) for i, t in enumerate(tasks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(t.is_alive() for t in threads), "a racing thread hung"
    if errors:
        real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        raise (real or errors)[0]
    return results


def wait_until_blocked(database_url: str, count: int = 1, timeout: float = 10.0) -> None:
    """Wait until ``count`` of the service's backends wait on a lock."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = 'jobs-service' AND wait_event_type = 'Lock'"
                )
                if cur.fetchone()[0] >= count:
                    return
            time.sleep(0.01)
        raise AssertionError(f"{count} requests did not block on a lock in {timeout}s")
    finally:
        conn.close()


def reporter(job_id: int, what: str, detail=None):
    """A task reporting ``what`` (or requesting a stop): returns (what, code, body)."""

    def task(call, barrier):
        if what == "stop":
            return what, *call("PUT", f"/jobs/{job_id}/stop")
        return what, *call("PUT", f"/jobs/{job_id}/status", {"status": what, "detail": detail})

    return task


def poster(path: str, payload, tag=None):
    """A task POSTing ``payload``: returns (tag, code, body)."""

    def task(call, barrier):
        return tag, *call("POST", path, payload)

    return task


# ---- The audit trail: every status change, recorded by the database --------------------

AUDIT_SETUP = """
DROP TRIGGER IF EXISTS race_audit ON jobs;
DROP TABLE IF EXISTS race_audit;
CREATE TABLE race_audit (
    seq bigserial PRIMARY KEY, job_id bigint NOT NULL, op text NOT NULL,
    old_status text, new_status text
);
CREATE OR REPLACE FUNCTION race_audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO race_audit (job_id, op, old_status) VALUES (OLD.id, 'DELETE', OLD.status);
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO race_audit (job_id, op, new_status) VALUES (NEW.id, 'INSERT', NEW.status);
    ELSIF OLD.status IS DISTINCT FROM NEW.status THEN
        INSERT INTO race_audit (job_id, op, old_status, new_status)
        VALUES (NEW.id, 'UPDATE', OLD.status, NEW.status);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER race_audit AFTER INSERT OR UPDATE OR DELETE ON jobs
    FOR EACH ROW EXECUTE FUNCTION race_audit_row();
"""

AUDIT_TEARDOWN = """
DROP TRIGGER IF EXISTS race_audit ON jobs;
DROP TABLE IF EXISTS race_audit;
DROP FUNCTION IF EXISTS race_audit_row();
"""


class Audit:
    """What really happened to each job, recorded by a row trigger on ``jobs``.

    Changes to one job are serialised by its row lock and the trigger runs
    under it, so per job the ``seq`` order is the real order.
    """

    def __init__(self, conn):
        self.conn = conn

    def history(self) -> dict[int, list[tuple[str, str | None, str | None]]]:
        with self.conn.cursor() as cur:
            cur.execute("SELECT job_id, op, old_status, new_status FROM race_audit ORDER BY seq")
            rows = cur.fetchall()
        out: dict[int, list] = defaultdict(list)
        for job_id, op, old, new in rows:
            out[job_id].append((op, old, new))
        return out

    def problems(self, call: Call, legal: set = LEGAL_MOVES) -> list[str]:
        """Where the record breaks a rule (none: it keeps them all).

        The rules: every status change a legal move, every deletion of a job that
        was terminal at that instant, nothing after a deletion, a deleted job no
        longer listed, and each remaining job listed with its last status and
        its events exactly its status changes.
        """
        existing = job_statuses(call)
        problems = []
        for job_id, rows in self.history().items():
            problem = self._job_problem(call, job_id, rows, existing, legal)
            if problem:
                problems.append(problem)
        return problems

    @staticmethod
    def _job_problem(
        call: Call, job_id: int, rows: list, existing: dict[int, str], legal: set
    ) -> str | None:
        if rows[0] != ("INSERT", None, "SCHEDULED"):
            return f"job {job_id} was not created SCHEDULED: {rows}"
        status: str | None = "SCHEDULED"
        moves = []
        for op, old, new in rows[1:]:
            if status is None:
                return f"job {job_id} changed after its deletion: {rows}"
            if op not in ("UPDATE", "DELETE") or old != status:
                return f"job {job_id}: inconsistent record {rows}"
            if op == "DELETE":
                if old not in TERMINAL:
                    return f"job {job_id} was deleted while {old}: {rows}"
                status = None
            elif (old, new) not in legal:
                return f"job {job_id}: illegal {old}->{new}: {rows}"
            else:
                moves.append(new)
                status = new
        if status is None:
            return f"job {job_id} was deleted but is listed" if job_id in existing else None
        if existing.get(job_id) != status:
            return f"job {job_id} is listed as {existing.get(job_id)}, was last {status}: {rows}"
        types = [e["event_type"] for e in events_of(call, job_id)]
        if types != ["SCHEDULED", *moves]:
            return f"job {job_id}: events {types} vs status changes {rows}"
        return None


@contextlib.contextmanager
def audit_trail(database_url: str):
    """An ``Audit`` of the test's requests: the trigger exists inside the block only."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(AUDIT_SETUP)
        yield Audit(conn)
    finally:
        with conn.cursor() as cur:
            cur.execute(AUDIT_TEARDOWN)
        conn.close()


# ---- Workload: stops vs status reports vs deletes --------------------------------------


@dataclass
class ChaosRecord:
    """What the clients of ``run_chaos`` sent and saw."""

    initial: dict[int, str] = field(default_factory=dict)  # id -> status set up
    ever_terminal: set[int] = field(default_factory=set)  # set up or reported terminal
    gone: set[int] = field(default_factory=set)  # named by a 204 delete
    answers: list[tuple] = field(default_factory=list)  # (op, target, sent, code, body)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, op: str, target, sent, code: int, body) -> None:
        with self.lock:
            self.answers.append((op, target, sent, code, body))

    def never_terminal(self) -> set[int]:
        return set(self.initial) - self.ever_terminal

    def outcomes(self) -> Counter:
        """How often each (op, status code) was answered."""
        return Counter((op, code) for op, _, _, code, _ in self.answers)


def run_chaos(
    setup_call: Call,
    make_call: Callable[[], Call],
    threads: int = 16,
    rounds: int = 3,
    steps: int = 20,
    per_status: int = 3,
    seed: int = 0,
) -> ChaosRecord:
    """Rounds of ``threads`` clients stopping, reporting and deleting at random, in lock-step.

    Each round sets up ``per_status`` jobs in every status of SETUP_PATHS; every
    step of every thread is a fresh pile-up on those jobs.
    """
    rec = ChaosRecord()
    for r in range(rounds):
        jobs = {}
        for status in SETUP_PATHS:
            for _ in range(per_status):
                job_id = create_job(setup_call)["id"]
                move_to(setup_call, job_id, status)
                jobs[job_id] = status
        rec.initial.update(jobs)
        rec.ever_terminal.update(j for j, s in jobs.items() if s in TERMINAL or s == "RETRIED")
        tasks = [
            _chaos_task(sorted(jobs), rec, steps, seed * 1000 + r * 100 + t) for t in range(threads)
        ]
        race(make_call, tasks)
    return rec


def _chaos_task(job_ids: list[int], rec: ChaosRecord, steps: int, seed: int):
    def task(call, barrier):
        rng = random.Random(seed)
        for _ in range(steps):
            barrier.wait(timeout=30)  # lock-step: every step is a fresh pile-up
            _chaos_step(call, rng, job_ids, rec)

    return task


def _chaos_step(call: Call, rng: random.Random, job_ids: list[int], rec: ChaosRecord) -> None:
    op = rng.choices(
        ["stop", "report", "delete", "bulk_status", "bulk_ids"], weights=[20, 45, 15, 4, 12]
    )[0]
    if op == "stop":
        job_id = rng.choice(job_ids)
        code, body = call(rng.choice(["PUT", "POST"]), f"/jobs/{job_id}/stop")
        rec.note(op, job_id, None, code, body)
    elif op == "report":
        job_id = rng.choice(job_ids)
        to = rng.choice(REPORTABLE)
        if rng.random() < 0.6:
            # An informed worker: read the status, then report a legal next move
            # (which a concurrent request may already have made illegal).
            code, body = call("GET", f"/jobs/{job_id}")
            if code == 200:
                nexts = sorted(WORKER_MOVES[body["status"]])
                to = rng.choice(nexts) if nexts else to
        code, body = call("PUT", f"/jobs/{job_id}/status", {"status": to})
        if code == 200 and to in TERMINAL:
            with rec.lock:
                rec.ever_terminal.add(job_id)
        rec.note(op, job_id, to, code, body)
    elif op == "delete":
        job_id = rng.choice(job_ids)
        code, body = call("DELETE", f"/jobs/{job_id}")
        if code == 204:
            with rec.lock:
                rec.gone.add(job_id)
        rec.note(op, job_id, None, code, body)
    elif op == "bulk_status":
        token = rng.choice(["terminal", "completed", "stopped", "error", "failed", "TERMINAL"])
        code, body = call("DELETE", f"/jobs?status={token}")
        rec.note(op, token, None, code, body)
    else:
        chosen = sorted(rng.sample(job_ids, rng.randint(1, 4)))
        code, body = call("DELETE", "/jobs", {"job_ids": chosen})
        if code == 204:
            with rec.lock:
                rec.gone.update(chosen)
        rec.note(op, tuple(chosen), None, code, body)


def wrong_chaos_answers(rec: ChaosRecord) -> list[tuple]:
    """The answers of ``run_chaos`` that no interleaving allows (none: all allowed).

    - a stop: 200 with the job, no longer SCHEDULED or RUNNING (the stop moved it,
      or a stop cannot move it), or 404 JOB_NOT_FOUND;
    - a status report: 200 with the job in the reported status, 409
      INVALID_STATE_TRANSITION, or 404 JOB_NOT_FOUND;
    - a delete of one job: 204, or 409 JOB_CONFLICT naming an active status;
    - a delete by status: 204;
    - a delete by IDs: 204, or 409 JOB_CONFLICT.
    """
    wrong = []
    for op, target, sent, code, body in rec.answers:
        error = _error_code(body)
        if op == "stop":
            ok = (
                code == 200
                and body["id"] == target
                and body["status"] not in ("SCHEDULED", "RUNNING")
            ) or (code, error) == (404, "JOB_NOT_FOUND")
        elif op == "report":
            ok = (
                (code == 200 and (body["id"], body["status"]) == (target, sent))
                or (code, error) == (409, "INVALID_STATE_TRANSITION")
                or (code, error) == (404, "JOB_NOT_FOUND")
            )
        elif op == "delete":
            ok = code == 204 or (
                (code, error) == (409, "JOB_CONFLICT")
                and any(s in body["error_message"] for s in ACTIVE)
            )
        elif op == "bulk_status":
            ok = code == 204
        else:
            ok = code == 204 or (code, error) == (409, "JOB_CONFLICT")
        if not ok:
            wrong.append((op, target, sent, code, body))
    return wrong


# ---- Workload: a retry (FAILED -> SCHEDULED) vs every kind of delete ---------------------


@dataclass
class RetryRace:
    jobs: list[int]  # the jobs raced for, in order
    retried: set[int]  # the jobs a retry moved back to SCHEDULED (answered 200)
    answers: list[tuple]  # (who, job_id, code, body); who: fail, retry, delete_*


def race_retries_against_deletes(make_call: Callable[[], Call], n_jobs: int = 30) -> RetryRace:
    """Job by job in lock-step: one thread fails the job, then 6 threads retry it while
    12 delete it (by status, by IDs, alone)."""
    setup = make_call()
    jobs = []
    for _ in range(n_jobs):
        job_id = create_job(setup)["id"]
        move_to(setup, job_id, "RUNNING")
        jobs.append(job_id)
    retried: set[int] = set()
    answers: list[tuple] = []
    lock = threading.Lock()

    def note(who, job_id, code, body):
        with lock:
            answers.append((who, job_id, code, body))
            if who == "retry" and code == 200:
                retried.add(job_id)

    def step_through(call, barrier, prepare: bool):
        # Lock-step over the jobs: one turns FAILED, then everyone goes for it.
        for job_id in jobs:
            barrier.wait(timeout=30)
            if prepare:
                note("fail", job_id, *call("PUT", f"/jobs/{job_id}/status", {"status": "FAILED"}))
            barrier.wait(timeout=30)
            yield job_id

    def retrier(prepare: bool = False):
        def task(call, barrier):
            for job_id in step_through(call, barrier, prepare):
                note(
                    "retry", job_id, *call("PUT", f"/jobs/{job_id}/status", {"status": "SCHEDULED"})
                )

        return task

    def deleter(kind, seed):
        def task(call, barrier):
            rng = random.Random(seed)
            for job_id in step_through(call, barrier, False):
                if kind == "status":
                    token = rng.choice(["terminal", "error"])
                    answer = call("DELETE", f"/jobs?status={token}")
                elif kind == "ids":
                    chosen = sorted({job_id, *rng.sample(jobs, rng.randint(0, 2))})
                    answer = call("DELETE", "/jobs", {"job_ids": chosen})
                else:
                    answer = call("DELETE", f"/jobs/{job_id}")
                note(f"delete_{kind}", job_id, *answer)

        return task

    tasks = [retrier(prepare=True)] + [retrier()] * 5
    tasks += [deleter(kind, i) for i, kind in enumerate(["status", "ids", "single"] * 4)]
    race(make_call, tasks)
    return RetryRace(jobs, retried, answers)


def wrong_retry_race_answers(result: RetryRace) -> list[tuple]:
    """Answers no interleaving allows: failing a RUNNING job is 200; a retry is 200
    (SCHEDULED) or 404 (deleted first); a delete by status is 204; by IDs or alone,
    204 or 409."""
    wrong = []
    for who, job_id, code, body in result.answers:
        if who == "fail":
            ok = code == 200
        elif who == "retry":
            ok = (code == 200 and body["status"] == "SCHEDULED") or code == 404
        elif who == "delete_status":
            ok = code == 204
        else:
            ok = code in (204, 409)
        if not ok:
            wrong.append((who, job_id, code, body))
    return wrong


# ---- Workload: two workers, two outcomes -----------------------------------------------


@dataclass
class OneJobRound:
    job_id: int
    answers: list[tuple]  # (what was sent, code, body), one per racing request
    events: list[dict]  # the job's events afterwards
    job: dict | None  # GET /jobs/{id} afterwards


def race_completed_against_failed(make_call: Callable[[], Call], rounds: int) -> list[OneJobRound]:
    """Per round, 8 workers report COMPLETED and 8 FAILED (detail {"w": status}) on one
    RUNNING job."""
    setup = make_call()
    out = []
    for _ in range(rounds):
        job_id = create_job(setup)["id"]
        move_to(setup, job_id, "RUNNING")
        tasks = [reporter(job_id, to, {"w": to}) for to in ["COMPLETED", "FAILED"] * 8]
        answers = race(make_call, tasks)
        out.append(
            OneJobRound(
                job_id, answers, events_of(setup, job_id), setup("GET", f"/jobs/{job_id}")[1]
            )
        )
    return out


# ---- Workload: idempotent creation ------------------------------------------------------


@dataclass
class CreationRound:
    payload: dict  # what all 20 requests sent
    answers: list[tuple]  # (None, code, body), one per request
    events: dict[int, list[dict]]  # the events of each job answered


def race_idempotent_creations(make_call: Callable[[], Call], rounds: int) -> list[CreationRound]:
    """Per round, 20 identical POST /jobs with one idempotency_key at once."""
    setup = make_call()
    out = []
    for n in range(rounds):
        key = f"deploy-{n}-{'k' * n}"
        payload = {"node_id": f"worker-{n}", "descriptor": {"n": n}, "idempotency_key": key}
        answers = race(make_call, [poster("/jobs", payload)] * 20)
        ids = {body["id"] for _, code, body in answers if code in (200, 201)}
        out.append(CreationRound(payload, answers, {i: events_of(setup, i) for i in ids}))
    return out


# ---- Every route once ----------------------------------------------------------------------

_route_plan_names = itertools.count()


def seed_two_jobs(call: Call) -> tuple[int, int]:
    """Two new jobs, ``a`` and ``b``, for route_plan."""
    ids = []
    for node in ("plan-a", "plan-b"):
        status, job = call("POST", "/jobs", {"node_id": node})
        assert status == 201, job
        ids.append(job["id"])
    return ids[0], ids[1]


def route_plan(a: int, b: int) -> list[tuple]:
    """Every API route once, as (method, path, body, status while the database
    answers, the route's *_ERROR when it does not). On the two jobs of
    seed_two_jobs it stops ``a`` and starts ``b``; the file registration is
    entry 8. Each call registers a file of a new name."""
    n = next(_route_plan_names)
    a_file = {"file_name": f"plan{n}", "start_block": n, "end_block": n, "size_bytes": 1}
    return [
        ("GET", "/jobs?status=all", None, 200, "LIST_JOBS_ERROR"),
        ("POST", "/jobs", {"node_id": "plan-w"}, 201, "CREATE_JOB_ERROR"),
        ("GET", f"/jobs/{a}", None, 200, "GET_JOB_ERROR"),
        ("GET", f"/jobs/{a}/progress", None, 200, "GET_JOB_ERROR"),
        ("GET", f"/jobs/{a}/events", None, 200, "GET_JOB_EVENTS_ERROR"),
        ("PUT", f"/jobs/{a}/stop", None, 200, "STOP_JOB_ERROR"),
        ("POST", f"/jobs/{a}/stop", None, 200, "STOP_JOB_ERROR"),
        ("PUT", f"/jobs/{b}/status", {"status": "RUNNING"}, 200, "UPDATE_JOB_STATUS_ERROR"),
        ("POST", f"/jobs/{a}/tables/blocks/files", a_file, 201, "REGISTER_FILES_ERROR"),
        ("DELETE", "/jobs/987654321", None, 204, "DELETE_JOB_ERROR"),
        ("DELETE", "/jobs?status=terminal", None, 204, "DELETE_JOBS_BY_STATUS_ERROR"),
        ("DELETE", "/jobs", {"job_ids": [987654321]}, 204, "DELETE_JOBS_ERROR"),
        # A page size that is not prepared: the same SQL, planned per request.
        ("GET", "/jobs?status=all&limit=7", None, 200, "LIST_JOBS_ERROR"),
        ("GET", f"/jobs/{a}/events/987654321", None, 404, "GET_JOB_EVENT_ERROR"),
        ("PUT", "/workers/plan-w", None, 200, "REGISTER_WORKER_ERROR"),
        ("POST", "/workers/plan-w/heartbeat", None, 200, "WORKER_HEARTBEAT_ERROR"),
        ("GET", "/workers", None, 200, "SCHEDULER_LIST_WORKERS_ERROR"),
        ("GET", "/workers/plan-w", None, 200, "SCHEDULER_GET_WORKER_ERROR"),
        ("DELETE", "/workers/plan-w", None, 204, "DELETE_WORKER_ERROR"),
    ]


# ---- Apps and metrics ------------------------------------------------------------------------


def make_app(database_url: str, **config):
    """The app with test settings of its own over the environment's."""
    return create_app({"TESTING": True, "DATABASE_URL": database_url, **config})


def metric_samples(client) -> dict[tuple[str, frozenset], float]:
    """/metrics through ``client``, as {(sample name, frozenset of labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric_value(samples, name, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# ---- What a race's record must show (used by test_races and test_scaleout) -------------------


def chaos_problems(setup: Call, rec) -> list[str]:
    """Everything wrong with a run_chaos record, beside the answers no interleaving allows:
    an active job deleted, a deleted job still listed, an illegal history, or a run that
    never exercised the guards (only 404s)."""
    existing = job_statuses(setup)
    problems = [f"wrong answer: {wrong}" for wrong in wrong_chaos_answers(rec)]
    problems += [
        f"deleted although never terminal: {j}" for j in rec.never_terminal() - set(existing)
    ]
    problems += [f"still listed after a 204 delete: {j}" for j in rec.gone & set(existing)]
    problems += [f"illegal history: {h}" for h in illegal_histories(setup, existing)]
    outcomes = rec.outcomes()
    for wanted in [("report", 200), ("report", 409), ("delete", 204), ("stop", 200)]:
        if not outcomes[wanted]:
            problems.append(f"never happened: {wanted} (outcomes {dict(outcomes)})")
    return problems


def idempotent_round_problems(round_) -> list[str]:
    """One round of race_idempotent_creations: exactly one 201 and nineteen 200s, all
    answering the same job, as sent, with its one SCHEDULED event."""
    problems = []
    codes = sorted(code for _, code, _ in round_.answers)
    if codes != [200] * 19 + [201]:
        problems.append(f"codes {codes}")
    bodies = [body for _, _, body in round_.answers]
    job = bodies[0]
    if any(body != job for body in bodies):
        problems.append(f"different answers {bodies}")
    sent = round_.payload
    if (job["status"], job["node_id"], job["descriptor"]) != (
        "SCHEDULED",
        sent["node_id"],
        sent["descriptor"],
    ):
        problems.append(f"not the job sent: {job}")
    events = [e["event_type"] for e in round_.events[job["id"]]]
    if events != ["SCHEDULED"]:
        problems.append(f"events {events}")
    return problems


def one_winner_problems(round_) -> list[str]:
    """One round of race_completed_against_failed: exactly one outcome won (200), every
    other report got a 409 naming it, and the job has exactly the winner's event."""
    won = {to for to, code, _ in round_.answers if code == 200}
    if len(won) != 1:
        return [f"winners {sorted(won)}: {round_.answers}"]
    (winner,) = won
    problems = []
    for to, code, body in round_.answers:
        if to == winner and (code, body.get("status")) != (200, winner):
            problems.append(f"the winner's answer {code} {body}")
        elif to != winner and (
            (code, body.get("error_code")) != (409, "INVALID_STATE_TRANSITION")
            or winner not in body["error_message"]
        ):
            problems.append(f"a loser's answer {code} {body}")
    events = [e["event_type"] for e in round_.events]
    if events != ["SCHEDULED", "RUNNING", winner] or round_.events[-1]["detail"] != {"w": winner}:
        problems.append(f"events {round_.events}")
    if round_.job["status"] != winner:
        problems.append(f"job {round_.job}")
    return problems


def retry_race_problems(setup: Call, result) -> list[str]:
    """A race_retries_against_deletes result: both sides won somewhere, no retried
    (active again, for good) job was deleted or left in another status, and the
    histories are legal."""
    existing = job_statuses(setup)
    problems = [f"wrong answer: {wrong}" for wrong in wrong_retry_race_answers(result)]
    if not result.retried:
        problems.append("no retry won against the deletes; the race did not happen")
    if len(result.retried) >= len(result.jobs):
        problems.append("no delete won against the retries")
    problems += [f"a retried job was deleted: {j}" for j in result.retried - set(existing)]
    survivors = set(existing) & set(result.jobs)
    problems += [f"not retried yet not deleted: {j}" for j in survivors - result.retried]
    problems += [
        f"retried job {j} is {existing[j]}"
        for j in result.retried & set(existing)
        if existing[j] != "SCHEDULED"
    ]
    scheduled = {job_id: "SCHEDULED" for job_id in result.retried}
    problems += [f"illegal history: {h}" for h in illegal_histories(setup, scheduled)]
    return problems
