"""The service through PgBouncer: the list and get throughput with its
DATABASE_URL pointing at a local PgBouncer in transaction pooling mode, in
front of the same PostgreSQL, over the same table as the direct figures
(run.throughput) of the same run.

PgBouncer is Debian's package (`make bench` installs it when missing),
started by devpgbouncer.LocalPgBouncer as the tests start it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.console import say
from dev.pgbouncer import LocalPgBouncer

if TYPE_CHECKING:
    from bench.context import Bench

POOL_MODE = "transaction"


def through_pgbouncer(bench: Bench) -> None:
    """Fill ``bench.pgbouncer_loads``: endpoint -> wrk result through PgBouncer."""
    if bench.service is None:
        return
    bouncer = LocalPgBouncer(bench.pg.url, str(bench.workdir / "pgbouncer"), POOL_MODE)
    url = bouncer.start()
    bench.stack.callback(bouncer.stop)  # registered first, so stopped after the service
    say(f"PgBouncer ({POOL_MODE} pooling) at {url}")
    server = bench.serve("service-pgbouncer", bench.service_launch(workers=2), database_url=url)
    try:
        for endpoint in bench.throughput_endpoints():
            load = bench.wrk_endpoint("pgbouncer", server, endpoint)
            bench.pgbouncer_loads[endpoint] = load
            if load.errors:
                bench.notes.append(
                    f"Through PgBouncer, {load.errors} of {load.requests} requests to {endpoint}"
                    " failed: its ratio to the direct figure reads n/a."
                )
    finally:
        server.stop()
        bouncer.stop()
