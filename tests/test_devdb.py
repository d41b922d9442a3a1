"""The local PostgreSQL used by `make run`, the tests and the benchmarks."""

import psycopg2
import pytest


def test_stop_and_start_keeps_port_and_data(pg_factory):
    server = pg_factory()
    conn = psycopg2.connect(server.url)
    conn.autocommit = True
    conn.cursor().execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
    conn.close()
    port = server.port

    server.stop()
    assert not server.running
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(server.url, connect_timeout=2)

    server.start()
    assert server.port == port
    conn = psycopg2.connect(server.url)
    with conn.cursor() as cur:
        cur.execute("SELECT x FROM kept")
        assert cur.fetchone() == (7,)
    conn.close()


def test_stop_twice_is_harmless(pg_factory):
    server = pg_factory()
    server.stop()
    server.stop()
    assert not server.running
