"""The production command (docs/API.md, Running the service), run as plain processes:

    flask --app app init-db
    gunicorn -c gunicorn.conf.py wsgi:app      # PORT, WEB_CONCURRENCY=2

Metrics summed over both workers (also after one is SIGKILLed and replaced),
graceful shutdown finishing an in-flight request, the logs of the real
processes (one JSON access line per request on stdout, no token anywhere),
and the container's HEALTHCHECK command from the Dockerfile.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg2
import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from dev.gunicorn import Server, free_port, http_caller, serving

from support.races import wait_until_blocked
from support.service import parse_metrics, scrape_metrics

# Under pytest-xdist, on one worker: its PostgreSQL and gunicorn are the module's.
pytestmark = pytest.mark.xdist_group("gunicorn")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ADMIN = "gunicorn-admin-5e0c1f2a9b7d"
WORKER = "gunicorn-worker-8a3b6c4d2e1f"
WRONG = "gunicorn-wrong-0f9e8d7c6b5a"


def production_env(database_url: str) -> dict[str, str]:
    """The environment of `flask --app app init-db`: the variables production sets."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ADMIN_TOKEN", "WORKER_TOKEN", "PROMETHEUS_MULTIPROC_DIR", "GRACEFUL_TIMEOUT")
    }
    env.update({"DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1"})
    return env


def flask_init_db(database_url: str) -> subprocess.CompletedProcess:
    """The real command, `flask --app app init-db`, as a process."""
    return subprocess.run(
        [str(BIN / "flask"), "--app", "app", "init-db"],
        cwd=ROOT,
        env=production_env(database_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def production(**env: str) -> dict:
    """dev.gunicorn.Server's options for `gunicorn -c gunicorn.conf.py wsgi:app` as
    production runs it: the gunicorn script, two workers, stdout and stderr kept apart,
    and neither PROMETHEUS_MULTIPROC_DIR nor GRACEFUL_TIMEOUT set, so gunicorn.conf.py's
    own defaults hold (a fresh metrics directory in the temp directory: here one of this
    instance's own, see ``metrics_dir``)."""
    workdir = Path(tempfile.mkdtemp(prefix="jobs-test-gunicorn-"))
    (workdir / "tmp").mkdir()
    return {
        "workdir": workdir,
        "gunicorn": [str(BIN / "gunicorn")],
        "separate_stderr": True,
        "env": {
            "PROMETHEUS_MULTIPROC_DIR": None,
            "GRACEFUL_TIMEOUT": None,
            "TMPDIR": str(workdir / "tmp"),
            **env,
        },
    }


def metrics_dir(server: Server) -> Path:
    """The metrics directory gunicorn.conf.py made for a ``production`` server."""
    (path,) = (server.workdir / "tmp").glob("jobs-service-metrics-*")
    return path


def caller(server: Server, token: str | None = ADMIN):
    """A Call to ``server``, with ``token`` as the bearer token (None: no Authorization)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return server.caller(headers=headers, timeout=30)


@pytest.fixture(scope="module")
def database(pg_factory):
    """A PostgreSQL of this module's own, empty: init-db really creates the schema."""
    server = pg_factory()
    result = flask_init_db(server.url)
    assert result.returncode == 0, result.stderr
    assert "Initialized the database." in result.stdout
    return server.url


@pytest.fixture(scope="module")
def server(database):
    with serving(database, **production(ADMIN_TOKEN=ADMIN, WORKER_TOKEN=WORKER)) as instance:
        yield instance


def test_init_db_then_serve_jobs(server, database):
    call = caller(server)
    status, job = call("POST", "/jobs", {"node_id": "gunicorn-1", "descriptor": {"k": [1, 2]}})
    assert status == 201, job
    status, listed = call("GET", "/jobs?status=all&limit=1000")
    assert status == 200
    assert job in listed["jobs"]
    assert call("GET", f"/jobs/{job['id']}") == (200, job)
    # Both workers serve, each with its own connections: a burst in parallel.
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: call("GET", f"/jobs/{job['id']}"), range(40)))
    assert all(r == (200, job) for r in results)
    # init-db again (every deploy runs it): idempotent, nothing lost.
    again = flask_init_db(database)
    assert again.returncode == 0, again.stderr
    assert call("GET", f"/jobs/{job['id']}") == (200, job)
    # Auth from the environment: the worker token may read, not create.
    assert caller(server, WORKER)("GET", "/jobs")[0] == 200
    assert caller(server, WORKER)("POST", "/jobs", {"node_id": "x"})[0] == 403
    assert caller(server, None)("GET", "/jobs")[0] == 401


# ---- Metrics across workers ------------------------------------------------------

COUNT = "jobs_http_requests_total"
HIST_COUNT = "jobs_http_request_duration_seconds_count"


def healthz_count(samples) -> float:
    labels = frozenset({"method": "GET", "route": "/healthz", "status": "200"}.items())
    return samples.get((COUNT, labels), 0.0)


def healthz_latency_count(samples) -> float:
    labels = frozenset({"method": "GET", "route": "/healthz"}.items())
    return samples.get((HIST_COUNT, labels), 0.0)


def per_worker_healthz(metrics_dir: Path) -> dict[int, float]:
    """Each worker's own count, read from its own file of the multiprocess directory."""
    counts = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(re.fullmatch(r"counter_(\d+)\.db", path.name).group(1))
        with tempfile.TemporaryDirectory() as alone:
            shutil.copy(path, alone)
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=alone)
            counts[pid] = healthz_count(parse_metrics(generate_latest(registry).decode()))
    return counts


def hit_healthz(server, n: int) -> None:
    call = caller(server, None)
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: call("GET", "/healthz")[0], range(n)))
    assert statuses == [200] * n


def test_metrics_sum_over_workers_and_survive_a_killed_worker(server):
    before = scrape_metrics(server.port)
    base = healthz_count(before)
    base_per_worker = per_worker_healthz(metrics_dir(server))
    workers = server.workers()
    assert len(workers) == 2
    sent = 0
    # Until both workers have answered some of them (the kernel picks who accepts).
    for _ in range(10):
        hit_healthz(server, 100)
        sent += 100
        counts = per_worker_healthz(metrics_dir(server))
        if all(counts.get(pid, 0) > base_per_worker.get(pid, 0) for pid in workers):
            break
    else:
        pytest.fail(f"one worker served everything: {counts}")
    samples = scrape_metrics(server.port)
    assert healthz_count(samples) == base + sent
    assert healthz_latency_count(samples) - healthz_latency_count(before) == sent
    assert sum(counts.values()) == base + sent
    assert {pid for pid, c in counts.items() if c} >= workers

    # SIGKILL one worker: gunicorn replaces it; its samples are kept, not lost or doubled.
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = server.workers()
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the killed worker was not replaced: {server.workers()}")
    replacement = (now - workers).pop()
    assert healthz_count(scrape_metrics(server.port)) == base + sent
    hit_healthz(server, 50)
    samples = scrape_metrics(server.port)
    assert healthz_count(samples) == base + sent + 50
    assert healthz_latency_count(samples) - healthz_latency_count(before) == sent + 50
    counts = per_worker_healthz(metrics_dir(server))
    assert counts[victim] > 0, "the dead worker's counts were dropped"
    assert sum(counts.values()) == base + sent + 50
    assert set(counts) <= workers | {replacement} | set(base_per_worker)
    # child_exit marked it dead: no live gauge file of the dead pid is left behind.
    assert not list(metrics_dir(server).glob(f"gauge_live*_{victim}.db"))
    assert "Traceback" not in server.stderr()
    assert server.process.poll() is None


# ---- Logs of the real processes ----------------------------------------------------


def test_access_lines_on_stdout_and_no_token_anywhere(server):
    job = caller(server)("POST", "/jobs", {"node_id": "logs-1"})[1]
    requests = []
    tokens = {
        "admin": f"Bearer {ADMIN}",
        "worker": f"Bearer {WORKER}",
        "wrong": f"Bearer {WRONG}",
        "raw": ADMIN,
        "basic": f"Basic {WORKER}",
    }
    paths = [
        ("GET", "/jobs"),
        ("GET", f"/jobs/{job['id']}"),
        ("GET", "/jobs/abc"),
        ("PUT", f"/jobs/{job['id']}/stop"),
        ("DELETE", "/jobs?status=terminal"),
        ("GET", "/no/such/route"),
        ("GET", "/metrics"),
    ]
    for name, value in tokens.items():
        for i, (method, path) in enumerate(paths):
            rid = f"log-{name}-{i}"
            call = http_caller(server.port, headers={"Authorization": value, "X-Request-ID": rid})
            status, _ = call(method, path)
            requests.append((rid, method, status))
    time.sleep(0.2)
    out, err = server.log(), server.stderr()
    for secret in (ADMIN, WORKER, WRONG):
        assert secret not in out and secret not in err
    # Every stdout line is a JSON object; each request has exactly one access line.
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    access = {}
    for e in entries:
        if e.get("logger") == "jobs.access":
            access.setdefault(e["request_id"], []).append(e)
    for rid, method, status in requests:
        assert [(e["method"], e["status"]) for e in access.get(rid, [])] == [(method, status)]
        assert rid not in err
    # Tokens are set: no "open API" warning from either worker.
    assert "ADMIN_TOKEN is not set" not in out


# ---- Graceful shutdown -------------------------------------------------------------


def test_sigterm_lets_an_in_flight_request_finish(database):
    # No tokens: the open service, as many run it.
    with serving(database, **production()) as instance:
        call = caller(instance, None)
        status, job = call("POST", "/jobs", {"node_id": "graceful-1"})
        assert status == 201
        result = {}
        holder = psycopg2.connect(database)
        try:
            with holder.cursor() as cur:
                cur.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")

            def slow_request():
                result["answer"] = call("GET", f"/jobs/{job['id']}")
                result["at"] = time.monotonic()

            thread = threading.Thread(target=slow_request)
            thread.start()
            wait_until_blocked(database)
            sigterm_at = time.monotonic()
            instance.process.send_signal(signal.SIGTERM)
            time.sleep(2)  # the request is still waiting on the lock
            assert thread.is_alive()
            assert instance.process.poll() is None, "the master exited mid-request"
        finally:
            holder.rollback()
            holder.close()
        thread.join(15)
        assert result.get("answer") == (200, job)
        returncode = instance.process.wait(15)
        exited_at = time.monotonic()
        assert returncode == 0, instance.stderr()
        # gunicorn's own lines, the workers' farewells included, format cleanly.
        assert "Traceback" not in instance.stderr()
        assert "Logging error" not in instance.stderr()
        assert "Worker exiting" in instance.stderr()
        assert result["at"] - sigterm_at >= 2
        assert exited_at - sigterm_at < 10
        out = instance.log()
        assert '"status":200' in out and '"route":"/jobs/<job_id>"' in out
        # Open: each worker warned at start-up.
        assert out.count("ADMIN_TOKEN is not set") == 2


# ---- The container's HEALTHCHECK -----------------------------------------------------


def healthcheck_command() -> list[str]:
    dockerfile = ROOT / "Dockerfile"
    if not dockerfile.exists():
        pytest.skip("no Dockerfile yet")
    text = dockerfile.read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK\b.*?\bCMD\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert match, "the Dockerfile declares no exec-form HEALTHCHECK"
    argv = json.loads(match.group(1))
    assert argv[0] in ("python", "python3"), argv
    assert "/healthz" in " ".join(argv)
    return [sys.executable, *argv[1:]]


def run_check(argv, port: int) -> int:
    env = {k: v for k, v in os.environ.items() if k != "PORT"}
    env["PORT"] = str(port)
    return subprocess.run(argv, env=env, capture_output=True, timeout=20, check=False).returncode


def test_container_healthcheck(server, pg_factory):
    argv = healthcheck_command()
    assert run_check(argv, server.port) == 0
    # Nothing listening: unhealthy.
    assert run_check(argv, free_port()) != 0
    # Liveness only: a database outage does not make the container unhealthy.
    pg = pg_factory()
    init = flask_init_db(pg.url)
    assert init.returncode == 0, init.stderr
    try:
        with serving(pg.url, **production()) as instance:
            pg.stop()
            assert http_caller(instance.port)("GET", "/readyz")[0] == 503
            assert run_check(argv, instance.port) == 0
    finally:
        pg.destroy()
