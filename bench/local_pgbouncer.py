"""STAND-IN for the top-level devpgbouncer.py, until that lands on main.

Only the interface the bench relies on (run.py imports devpgbouncer first
and falls back to this file):

    LocalPgBouncer(upstream_url, workdir, pool_mode).start() -> url
    LocalPgBouncer(...).stop()

A throwaway PgBouncer (Debian's package, /usr/sbin/pgbouncer) on a free
port of 127.0.0.1, in front of ``upstream_url``, with trust authentication
as the throwaway PostgreSQL has. Delete this file once devpgbouncer.py exists.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

from servers import free_port

# PgBouncer refuses to run as root; as root it switches to the user that
# devdb.py runs PostgreSQL as.
SERVER_USERS = ("postgres", "jobsdb")


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(found).exists():
        raise RuntimeError("pgbouncer is missing (Debian: apt-get install pgbouncer)")
    return found


class LocalPgBouncer:
    def __init__(self, upstream_url: str, workdir: str, pool_mode: str = "transaction"):
        if pool_mode not in ("transaction", "session"):
            raise ValueError(f"pool_mode must be transaction or session, not {pool_mode!r}")
        self.upstream = urlsplit(upstream_url)
        self.workdir = Path(workdir)
        self.pool_mode = pool_mode
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> str:
        """Start it; returns the URL clients use, once it accepts connections."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        user = self.upstream.username or "postgres"
        database = self.upstream.path.lstrip("/") or "postgres"
        (self.workdir / "userlist.txt").write_text(f'"{user}" ""\n')
        config = self.workdir / "pgbouncer.ini"
        config.write_text(
            f"""[databases]
{database} = host={self.upstream.hostname} port={self.upstream.port} dbname={database}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.workdir / "userlist.txt"}
pool_mode = {self.pool_mode}
max_client_conn = 200
default_pool_size = 20
logfile = {self.workdir / "pgbouncer.log"}
pidfile = {self.workdir / "pgbouncer.pid"}
; psycopg2 sends these; without being listed PgBouncer refuses the connection.
; Ignored, "options" (the service's statement_timeout, plan_cache_mode) is not
; applied: see the service's own PgBouncer support.
ignore_startup_parameters = extra_float_digits, options
"""
        )
        argv = [pgbouncer_binary(), str(config)]
        if os.geteuid() == 0:
            account = _unprivileged_user()
            os.chown(self.workdir, account.pw_uid, account.pw_gid)
            for path in self.workdir.iterdir():
                os.chown(path, account.pw_uid, account.pw_gid)
            argv[1:1] = ["-u", account.pw_name]
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=(self.workdir / "stderr.log").open("w")
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited at start-up:\n{self._logs()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"pgbouncer did not listen within 10 s:\n{self._logs()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # immediate: the bench is done with it
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _logs(self) -> str:
        return "".join(
            (self.workdir / name).read_text()[-2000:]
            for name in ("stderr.log", "pgbouncer.log")
            if (self.workdir / name).exists()
        )


def _unprivileged_user() -> pwd.struct_passwd:
    for name in SERVER_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    raise RuntimeError(f"none of the users {SERVER_USERS} exists to run pgbouncer as")
