"""A primary and a hot standby on this box, for test_failover and test_replicas.

Built with dev/standby.py from the binaries of dev/postgres.py: the primary
is a throwaway LocalPostgres with the schema, the standby a pg_basebackup -R
copy of it streaming from it. Building a pair takes a few seconds: a module
builds one and shares it between its tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import psycopg2
import pytest
from helpers import init_db

from dev import postgres as devdb
from dev.postgres import LocalPostgres
from dev.standby import LocalStandby, make_synchronous


def require_standby() -> None:
    """Skip (fail under CI=true) when pg_basebackup is not among the PostgreSQL binaries."""
    binary = devdb.bin_dir() / "pg_basebackup"
    if os.access(binary, os.X_OK):
        return
    reason = f"pg_basebackup is not installed ({binary}): the replication tests did not run"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@dataclass
class Pair:
    primary: LocalPostgres
    standby: LocalStandby

    @property
    def failover_url(self) -> str:
        """Both hosts in libpq's syntax: the one that accepts writes is used."""
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
            "/postgres?target_session_attrs=read-write"
        )

    def destroy(self) -> None:
        for server in (self.standby, self.primary):
            server.destroy()


@contextlib.contextmanager
def primary_and_standby(synchronous: bool = False):
    """A Pair with the schema applied (on the primary, replayed on the standby)."""
    require_standby()
    primary = LocalPostgres(tempfile.mkdtemp(prefix="jobs-test-primary-"), durable=False)
    standby = LocalStandby(primary, tempfile.mkdtemp(prefix="jobs-test-standby-"))
    pair = Pair(primary, standby)
    try:
        primary.start()
        init_db(primary.url)
        standby.start()
        if synchronous:
            make_synchronous(primary)
        standby.wait_caught_up()
        yield pair
    finally:
        pair.destroy()
        for server in (primary, standby):
            shutil.rmtree(server.datadir, ignore_errors=True)


def query(url: str, sql: str, params=None) -> list[tuple]:
    conn = psycopg2.connect(url, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def wait_for(predicate, timeout: float = 10, what: str = "the condition"):
    """Poll ``predicate`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.02)
