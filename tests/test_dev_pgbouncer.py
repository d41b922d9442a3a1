"""The local PgBouncer the tests run the service through (dev/pgbouncer.py)."""

import psycopg2
import pytest

from support.databases import query


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_stock_pgbouncer_in_front_of_postgres(pg_factory, pgbouncer_factory, pool_mode):
    pg = pg_factory()
    bouncer = pgbouncer_factory(pg.url, pool_mode)
    assert query(bouncer.url, "SELECT 41 + 1") == (42,)
    # Stock settings: libpq `options` are refused, as by production's PgBouncer.
    with pytest.raises(psycopg2.OperationalError, match="unsupported startup parameter: options"):
        query(bouncer.url, "SELECT 1", options="-c statement_timeout=100")
    # A restart keeps the URL; stopping twice is harmless.
    url = bouncer.url
    bouncer.stop()
    bouncer.stop()
    with pytest.raises(psycopg2.OperationalError):
        query(url, "SELECT 1")
    bouncer.start()
    assert bouncer.url == url
    assert query(url, "SELECT 1") == (1,)
