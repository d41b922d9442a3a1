"""A local PgBouncer in front of a PostgreSQL, for the tests and the benchmarks.

PgBouncer is not a Python package: the binary is Debian's `pgbouncer`
(/usr/sbin/pgbouncer; `make test` installs it when missing and root). The
settings are PgBouncer's stock ones except where it listens, how clients
authenticate (trust, on 127.0.0.1 only) and the pool mode, so that what works
here works against a stock PgBouncer in production. In particular
ignore_startup_parameters keeps its default: a client that sends libpq
`options` is refused, as production's would be.

PgBouncer refuses to run as root; as root it runs as the same unprivileged
user as devdb's PostgreSQL.

    python -m dev.pgbouncer --upstream postgresql://postgres@127.0.0.1:5432/postgres \
        [--pool-mode transaction|session] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from dev import postgres as devdb

BINARY = "/usr/sbin/pgbouncer"
POOL_MODES = ("transaction", "session", "statement")
CONFIG_FILE = "pgbouncer.ini"
AUTH_FILE = "userlist.txt"
LOG_FILE = "pgbouncer.log"
START_TIMEOUT_S = 15
STOP_TIMEOUT_S = 10


def available() -> bool:
    return os.access(BINARY, os.X_OK)


class LocalPgBouncer:
    """One PgBouncer process in front of ``upstream_url``, its files in ``workdir``.

    start() returns the URL to give the service (the upstream's user and
    database, PgBouncer's host and port). stop() and start() may be called any
    number of times, in any order; the port is kept across restarts.
    """

    def __init__(self, upstream_url: str, workdir, pool_mode: str = "transaction"):
        if pool_mode not in POOL_MODES:
            raise ValueError(f"pool_mode must be one of {POOL_MODES}")
        parts = urlsplit(upstream_url)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 5432
        self.user = unquote(parts.username or "postgres")
        self.password = unquote(parts.password) if parts.password else None
        self.dbname = unquote(parts.path.lstrip("/")) or self.user
        self.pool_mode = pool_mode
        self.workdir = Path(workdir).absolute()
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._user = devdb._server_user() if os.geteuid() == 0 else None

    def __repr__(self) -> str:
        return f"LocalPgBouncer({self.pool_mode!r}, port={self.port})"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.dbname}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> str:
        """Start PgBouncer (if not running); returns once it accepts connections."""
        if self.running:
            return self.url
        if not available():
            raise RuntimeError(f"PgBouncer is not installed ({BINARY}): apt-get install pgbouncer")
        self._prepare_workdir()
        log = self.workdir / LOG_FILE
        for attempt in range(3):
            if self.port is None:
                self.port = devdb._free_port()
            self._write(CONFIG_FILE, self._config())
            log_offset = log.stat().st_size if log.exists() else 0
            with log.open("ab") as out:
                # Foreground (no -d): the handle is ours to signal and reap.
                self.process = subprocess.Popen(
                    [BINARY, str(self.workdir / CONFIG_FILE)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd="/",
                    start_new_session=True,  # a Ctrl-C meant for us is not its to take
                    **self._as_user(),
                )
            if self._wait_listening():
                return self.url
            self.stop()
            new_log = devdb._read_from(log, log_offset)
            if "Address already in use" in new_log and attempt < 2:
                self.port = None  # another process took it between our pick and its bind
                continue
            raise RuntimeError(
                f"PgBouncer did not start on port {self.port} ({self.workdir}):\n{new_log[-3000:]}"
            )
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Immediate shutdown (SIGTERM): clients are disconnected. A no-op if not running."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)
        self.process = None

    def destroy(self) -> None:
        """Stop and delete the workdir."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalPgBouncer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def log(self) -> str:
        return devdb._read_from(self.workdir / LOG_FILE, 0)[-5000:]

    # -- internals

    def _config(self) -> str:
        target = f"host={self.upstream_host} port={self.upstream_port} dbname={self.dbname}"
        return (
            "; Written by dev/pgbouncer.py at every start. Stock settings but these.\n"
            "[databases]\n"
            f"{self.dbname} = {target}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            # Only 127.0.0.1 can reach it; the user must still be in the auth file.
            "auth_type = trust\n"
            f"auth_file = {self.workdir / AUTH_FILE}\n"
            f"pool_mode = {self.pool_mode}\n"
            f"admin_users = {self.user}\n"
        )

    def _prepare_workdir(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o700)
        if self._user is not None:
            devdb._allow_traverse(self.workdir.parent)
            os.chown(self.workdir, self._user.pw_uid, self._user.pw_gid)
        # The password, if any, is what PgBouncer logs in to the server with.
        quoted = self.password.replace('"', '""') if self.password else ""
        self._write(AUTH_FILE, f'"{self.user}" "{quoted}"\n')

    def _write(self, name: str, text: str) -> None:
        path = self.workdir / name
        path.write_text(text)
        path.chmod(0o600)
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _as_user(self) -> dict:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def _wait_listening(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return True
            time.sleep(0.02)
        return False


def main(argv: list[str] | None = None) -> int | str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upstream", required=True, help="the PostgreSQL URL to pool")
    parser.add_argument("--pool-mode", choices=POOL_MODES, default="transaction")
    parser.add_argument("--workdir", help="default: a new temporary directory")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="jobs-pgbouncer-")
    bouncer = LocalPgBouncer(args.upstream, workdir, args.pool_mode)
    try:
        print(bouncer.start(), flush=True)
    except RuntimeError as e:
        return f"devpgbouncer: {e}"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        bouncer.process.wait()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        bouncer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
