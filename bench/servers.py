"""The processes under test: the throwaway PostgreSQL and the apps under gunicorn.

The floors (constant_app.py, naive_app.py) get the service's own worker
settings, read from gunicorn.conf.py: its worker class (gevent), keep-alive,
and the same worker count, so that the ratios compare request handling alone.
"""

from __future__ import annotations

import os
import runpy
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2

from bench.load import request

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# The server is throwaway; these make it behave like a provisioned one
# (not 128 MB of cache, no checkpoint storms while seeding) and let the
# harness capture the SQL that the apps run (see plans.Plans).
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
    production = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    port = free_port()
    return Launch(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(workers),
            "--worker-class",
            production["worker_class"],
            "--keep-alive",
            str(production["keepalive"]),
            "--worker-connections",
            str(production["worker_connections"]),
            "--bind",
            f"127.0.0.1:{port}",
            f"{module}:app",
        ],
        BENCH,
        port,
        # naive_app imports jobs.pool (its deadline variant).
        {"PYTHONPATH": str(ROOT)},
    )


def service_launch(workdir: Path, workers: int) -> Launch:
    """The service as production runs it: gunicorn.conf.py, wsgi:app, on a free port."""
    port = free_port()
    # Its metrics files default to a directory per port under /tmp that
    # outlives the server; in the workdir they go when the run ends.
    env = {
        "PORT": str(port),
        "WEB_CONCURRENCY": str(workers),
        "PROMETHEUS_MULTIPROC_DIR": str(workdir / f"metrics-{port}"),
    }
    return Launch(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        ROOT,
        port,
        env,
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
    from dev import postgres as devdb

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
