"""The local PostgreSQL used by `make run`, the tests and the benchmarks (dev/postgres.py)."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg2
import pytest

from dev.postgres import LocalPostgres

from support.databases import query

ROOT = Path(__file__).resolve().parent.parent


def test_an_outage_and_recovery_keep_port_and_data(pg_factory):
    server = pg_factory()
    assert server.running
    assert query(server.url, "SELECT 1") == (1,)
    query(server.url, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
    url = server.url

    server.stop()
    assert not server.running
    with pytest.raises(psycopg2.OperationalError, match="refused"):
        psycopg2.connect(url, connect_timeout=2)

    server.start()
    assert server.url == url
    assert query(url, "SELECT x FROM kept") == (7,)


def test_stop_twice_and_start_twice_are_harmless(pg_factory):
    server = pg_factory()
    server.start()
    server.stop()
    server.stop()
    assert not server.running


def test_throwaway_settings(pg_factory):
    url = pg_factory().url
    assert query(url, "SHOW fsync") == ("off",)
    assert query(url, "SHOW synchronous_commit") == ("off",)
    assert query(url, "SHOW max_connections") == ("200",)
    assert query(url, "SHOW listen_addresses") == ("127.0.0.1",)


def test_throwaway_servers_are_copies_of_one_initdb_and_their_data_their_own(pg_factory):
    system_id = "SELECT system_identifier FROM pg_control_system()"
    first, second = pg_factory(), pg_factory()
    # One initdb per machine (dev/postgres.py's template): the same cluster identity.
    assert query(first.url, system_id) == query(second.url, system_id)
    query(first.url, "CREATE TABLE only_here (x int)")
    assert query(second.url, "SELECT to_regclass('only_here')") == (None,)


def test_a_persistent_datadir_comes_back_on_its_port_and_alter_system_wins():
    datadir = tempfile.mkdtemp(prefix="jobs-test-pg-")
    first = LocalPostgres(datadir)  # durable, as for `make run`
    try:
        with first:
            assert query(first.url, "SHOW fsync") == ("on",)
            query(first.url, "ALTER SYSTEM SET max_connections = 150")
        # A new instance (a later `make run`) reads the remembered port.
        again = LocalPostgres(datadir)
        assert again.url == first.url
        with again:
            assert query(again.url, "SHOW max_connections") == ("150",)
            # Another one finds the running server and leaves it be.
            assert LocalPostgres(datadir).start().url == first.url
    finally:
        first.destroy()


def test_a_failed_start_reports_the_server_log():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = LocalPostgres(tempfile.mkdtemp(prefix="jobs-test-pg-"), port=port)
        try:
            with pytest.raises(RuntimeError, match="Address already in use"):
                server.start()
            assert not server.running
        finally:
            server.destroy()


def test_serve_stops_the_command_then_the_database():
    """`make run` and Ctrl-C: the signal goes to the command, then PostgreSQL is stopped."""
    datadir = tempfile.mkdtemp(prefix="jobs-test-pg-")
    command = (
        "import os, signal, sys, time;"
        "signal.signal(signal.SIGINT, lambda *_: sys.exit(3));"
        "print('ready', os.environ['DATABASE_URL'], flush=True);"
        "time.sleep(60)"
    )
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    serve = subprocess.Popen(
        [sys.executable, "-m", "dev.postgres", "serve", "--datadir", datadir, "--",
         sys.executable, "-c", command],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = ""
        for line in serve.stdout:
            if line.startswith("ready"):
                break
        url = line.split()[1]
        assert query(url, "SELECT count(*) FROM jobs") == (0,)  # init-db ran

        serve.send_signal(signal.SIGINT)
        out, err = serve.communicate(timeout=60)
        assert serve.returncode == 3, err
        assert "Traceback" not in err
        assert "PostgreSQL stopped" in out
        assert not LocalPostgres(datadir).running
    finally:
        serve.kill()
        LocalPostgres(datadir).destroy()
