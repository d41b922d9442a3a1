"""Run the real service under gunicorn for a test, and talk to it over HTTP.

    with serving(database_url) as server:
        call = server.caller()
        status, body = call("GET", "/jobs/1")

``Server`` runs ``gunicorn -c gunicorn.conf.py wsgi:app`` exactly as
production does (CONTRACT.md §6), on a free port, with its own
PROMETHEUS_MULTIPROC_DIR and log file; ``start`` waits for ``/healthz`` and
``stop`` sends SIGTERM (gunicorn's graceful shutdown), then kills the process
group it started if that takes too long. Always stop it: use ``serving`` or
a fixture with a ``finally``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_caller(port: int, host: str = "127.0.0.1", headers: dict | None = None, timeout=30):
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
    """One gunicorn instance of the service (a master and ``workers`` sync workers)."""

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

    def caller(self, **kwargs):
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
