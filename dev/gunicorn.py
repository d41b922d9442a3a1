"""An app under gunicorn, as a process of its own: the one launcher of the tests and the bench.

    with serving(database_url) as server:
        call = server.caller()
        status, body = call("GET", "/jobs/1")

``Server`` runs ``gunicorn -c gunicorn.conf.py wsgi:app`` exactly as production
does, on a free port, with its own PROMETHEUS_MULTIPROC_DIR and log file;
``start`` waits for /healthz and for all of its workers, and ``stop`` sends
SIGTERM (gunicorn's graceful shutdown), then kills the process group it
started if that takes too long. Always stop it: use ``serving`` or a
``finally``.

Other apps (the bench's floors) and other command lines go through the same
class: ``app``, ``config`` (None: no config file), ``args`` (more options,
before the app), ``cwd``, ``env`` (a value of None removes that variable),
``ready_path``, and ``separate_stderr`` to keep stdout (the app's JSON lines)
apart from stderr (gunicorn's own).
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
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

Call = Callable[..., tuple[int, object]]  # call(method, path, body=None) -> (status, JSON or None)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (until someone binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    """The ``count`` children of ``master_pid``, once there are exactly that many."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = worker_pids(master_pid)
        if len(pids) == count:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"expected {count} workers, found {worker_pids(master_pid)}")


class Server:
    """One gunicorn instance (a master and ``workers`` workers)."""

    def __init__(
        self,
        database_url: str,
        port: int | None = None,
        workers: int = 2,
        env: dict[str, str | None] | None = None,
        *,
        app: str = "wsgi:app",
        config: str | None = "gunicorn.conf.py",
        args: Sequence[str] = (),
        cwd: Path = ROOT,
        gunicorn: Sequence[str] = (sys.executable, "-m", "gunicorn"),
        workdir: Path | None = None,
        separate_stderr: bool = False,
        ready_path: str = "/healthz",
        name: str = "gunicorn",
    ):
        self.name = name
        self.port = port or free_port()
        self.workers_count = workers
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix=f"jobs-{name}-{self.port}-"))
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.log_path = workdir / ("stdout" if separate_stderr else "server.log")
        self.stderr_path = workdir / "stderr" if separate_stderr else None
        self.argv = [
            *gunicorn,
            *(["-c", config] if config else []),
            *args,
            app,
        ]
        self.cwd = cwd
        self.ready_path = ready_path
        merged = {
            **{k: v for k, v in os.environ.items() if k not in ("ADMIN_TOKEN", "WORKER_TOKEN")},
            "DATABASE_URL": database_url,
            "PORT": str(self.port),
            "WEB_CONCURRENCY": str(workers),
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics"),
            "GRACEFUL_TIMEOUT": "5",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.env = {k: v for k, v in merged.items() if v is not None}
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def caller(self, **kwargs) -> Call:
        return http_caller(self.port, **kwargs)

    def launch(self) -> Server:
        """Start the process without waiting; ``wait_ready`` (or ``start``) waits."""
        with contextlib.ExitStack() as files:
            out = files.enter_context(open(self.log_path, "wb"))
            err = (
                files.enter_context(open(self.stderr_path, "wb"))
                if self.stderr_path
                else subprocess.STDOUT
            )
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,  # the child keeps its own copies
                stderr=err,
                start_new_session=True,  # its own process group, so stop() reaches the workers
            )
        return self

    def wait_ready(self, timeout: float = 30) -> Server:
        """Until ``ready_path`` answers (any HTTP status below 500) and every worker is up."""
        deadline = time.monotonic() + timeout
        call = http_caller(self.port, timeout=2)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.tail()}"
                )
            with contextlib.suppress(OSError):
                if call("GET", self.ready_path)[0] < 500:
                    wait_for_workers(self.process.pid, self.workers_count)
                    return self
            time.sleep(0.05)
        raise RuntimeError(
            f"{self.name} did not answer {self.ready_path} in {timeout}s:\n{self.tail()}"
        )

    def start(self, timeout: float = 30) -> Server:
        self.launch()
        try:
            return self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM the master (graceful), then SIGKILL its process group if it lingers."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(5)

    def workers(self) -> set[int]:
        return worker_pids(self.process.pid)

    def log(self) -> str:
        """Everything written to stdout (and to stderr, unless kept apart)."""
        return _read(self.log_path)

    def stderr(self) -> str:
        assert self.stderr_path is not None, "stderr is kept apart only with separate_stderr"
        return _read(self.stderr_path)

    def tail(self) -> str:
        """The end of the log(s), for an error message."""
        text = self.log()[-5000:]
        if self.stderr_path is not None:
            text += "\n--- stderr ---\n" + self.stderr()[-5000:]
        return text

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


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
