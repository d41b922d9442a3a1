"""Fixtures in the style of Flask's tutorial: app, client, runner; and apps, audit,
db_conn, world and targets (jobs that refused requests must leave as they are),
refuser, blackhole, the PostgreSQL and PgBouncer factories.

The database is real PostgreSQL: DATABASE_URL when it is set, otherwise a
throwaway server started here for the session and removed afterwards. Under
pytest-xdist (`make test` runs the suite with ``-n``) every worker is a
session of its own: without DATABASE_URL it starts its own server, with it
it uses a database of its own on that server (``<name>_gw0``, ... created
when missing; see support.databases.database_of_worker).

JOBS_TEST_DATABASE_VIA=pgbouncer-transaction (or pgbouncer-session) puts a
stock PgBouncer in that pool mode between every test's app and that database
(``database_url``); `make test` runs the API and race tests that way too.
``postgres_url`` is always the database itself.
"""

import fcntl
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from _pytest.nodeid import coerce_node_id

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dev import pgbouncer as devpgbouncer  # noqa: E402
from dev.pgbouncer import LocalPgBouncer  # noqa: E402
from dev.postgres import LocalPostgres  # noqa: E402

from support.databases import (  # noqa: E402
    Blackhole,
    Refuser,
    database_of_worker,
    give_back,
    init_db,
    kept_connection,
    truncate,
)
from support.races import audit_trail  # noqa: E402
from support.refusals import built_targets, built_world  # noqa: E402
from support.service import KeptApp, drop_pool, make_app  # noqa: E402


@pytest.hookimpl(trylast=True)  # after pytest's own ordering (fixtures' parameters)
def pytest_collection_modifyitems(config, items):
    """Node IDs that pytest-xdist can tell apart and group. pytest 9 keeps an item's ID in
    ``_id``, and two plugins expect otherwise:

    - schemathesis names the items of test_fuzz.py ``test_api[GET /jobs]`` and so on,
      but gives all 19 the one ID ``test_api``: xdist, which schedules by ID, ran one;
    - xdist 3.8's ``--dist loadgroup`` sends the tests of an ``xdist_group`` to one
      worker by an ``@group`` suffix on their IDs, which it writes where pytest 9 no
      longer reads (``_nodeid``): every group was spread over the workers.
    """
    together_alone(items)
    counts = Counter(item.nodeid for item in items)
    loadgroup = getattr(config.option, "loadgroup", False)  # on xdist's workers
    for item in items:
        nodeid = item.nodeid
        if counts[nodeid] > 1:
            nodeid = f"{nodeid.rpartition('::')[0]}::{item.name}"
        groups = sorted(
            {
                str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                for m in item.iter_markers("xdist_group")
            }
        )
        if loadgroup and groups and "@" not in nodeid:
            nodeid = f"{nodeid}@{'_'.join(groups)}"
        if nodeid != item.nodeid:
            item._id = coerce_node_id(nodeid)


def together_alone(items) -> None:
    """The ``alone`` tests one after another, so that the run waits for the other
    workers' tests to end once for them all rather than once for each (each wait
    cost up to the longest test running then; BENCHMARKS.md, "The test suite"):
    those outside an ``xdist_group`` form the group ``alone``, and each module's
    come after its other tests."""
    for item in items:
        if item.get_closest_marker("alone") and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group("alone"))
    files = {item.path: n for n, item in reversed(list(enumerate(items)))}
    items.sort(key=lambda item: (files[item.path], bool(item.get_closest_marker("alone"))))


NEXT_IS_ALONE = pytest.StashKey[bool]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    item.stash[NEXT_IS_ALONE] = bool(nextitem and nextitem.get_closest_marker("alone"))


# The gate and the lock, held from an ``alone`` test to the next when it follows at once.
_held_alone: list = []


@pytest.fixture(autouse=True)
def _alone_or_together(request, tmp_path_factory):
    """Under pytest-xdist, a test marked ``alone`` runs while no other test does.

    A test whose verdict is a time bound tight enough that the other workers
    busy on two cores could break it (``@pytest.mark.alone``) waits for the tests
    running on the other workers to finish and keeps new ones from starting: it
    takes the run's lock exclusively, every other test takes it shared. The gate
    in front of the lock keeps a waiting ``alone`` test from being starved by a
    stream of shared holders. Module fixtures (a gunicorn of the module's) stay up.
    An ``alone`` test followed at once by another (``together_alone``) hands both on.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    alone = request.node.get_closest_marker("alone") is not None
    if _held_alone:
        assert alone, "the lock was handed on to a test that is not alone"
        gate, lock = _held_alone.pop()
    else:
        # The workers' temporary directories (popen-gw0, ...) share the run's own.
        run = tmp_path_factory.getbasetemp().parent
        gate = open(run / "alone.gate", "a")  # noqa: SIM115 (may outlive the fixture)
        lock = open(run / "alone.lock", "a")  # noqa: SIM115
        fcntl.flock(gate, fcntl.LOCK_EX)
        if alone:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the gate stays shut until it is done
        else:
            fcntl.flock(lock, fcntl.LOCK_SH)
            fcntl.flock(gate, fcntl.LOCK_UN)
    try:
        yield
    finally:
        if alone and request.node.stash.get(NEXT_IS_ALONE, False):
            _held_alone.append((gate, lock))
        else:
            gate.close()  # closing the files releases both
            lock.close()


@pytest.fixture(scope="session")
def pg_factory():
    """Make extra throwaway PostgreSQL servers (tests of outages stop and start them)."""
    servers = []

    def make():
        server = LocalPostgres(tempfile.mkdtemp(prefix="jobs-test-pg-"), durable=False)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.destroy()


@pytest.fixture(scope="module")
def pg(pg_factory):
    """A throwaway PostgreSQL of the module's own, with the schema (outage tests stop it)."""
    server = pg_factory()
    init_db(server.url)
    return server


@pytest.fixture
def restart_pg(pg):
    """Whatever the test does to ``pg``, it is running again afterwards."""
    yield pg
    pg.start()


@pytest.fixture(scope="session")
def postgres_url(pg_factory):
    """The session's PostgreSQL, reached directly."""
    url = os.environ.get("DATABASE_URL")
    if not url:
        return pg_factory().url
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... under pytest-xdist
    return database_of_worker(url, worker) if worker else url


VIA_POOL_MODES = {
    "direct": None,
    "pgbouncer-transaction": "transaction",
    "pgbouncer-session": "session",
}


@pytest.fixture(scope="session")
def database_url(postgres_url, pgbouncer_factory):
    """What the apps under test connect to: see JOBS_TEST_DATABASE_VIA above."""
    via = os.environ.get("JOBS_TEST_DATABASE_VIA") or "direct"
    if via not in VIA_POOL_MODES:
        raise pytest.UsageError(f"JOBS_TEST_DATABASE_VIA must be one of {sorted(VIA_POOL_MODES)}")
    pool_mode = VIA_POOL_MODES[via]
    return postgres_url if pool_mode is None else pgbouncer_factory(postgres_url, pool_mode).url


@pytest.fixture(scope="session")
def _schema(database_url):
    init_db(database_url)
    return database_url


@pytest.fixture(scope="session")
def _kept_app():
    kept = KeptApp()
    yield kept
    kept.discard()


@pytest.fixture
def app(_schema, _kept_app):
    """The app on the session's database, emptied for the test (the process's one
    app, lent as a new one would be: support.service.KeptApp)."""
    truncate(_schema)
    app = _kept_app.lend(_schema)
    yield app
    _kept_app.take_back()


@pytest.fixture
def apps(app):
    """``apps(**config)``: more apps with settings of the test's own on the same (emptied)
    database, or on another DATABASE_URL given in ``config``; their pools are dropped
    afterwards."""
    made = []

    def make(**config):
        made.append(make_app(app.config["DATABASE_URL"], **config))
        return made[-1]

    yield make
    for each in made:
        drop_pool(each)


@pytest.fixture
def audit(app):
    """Every status change from the test's start on, recorded by the database
    (support.races.Audit); ``app`` has emptied it first."""
    with audit_trail(app.config["DATABASE_URL"]) as trail:
        yield trail


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def world(client):
    """Jobs 1..12 in every status, with files, events and an idempotency key
    (support.refusals.built_world): {id: status}."""
    return built_world(client)


@pytest.fixture
def targets(client):
    """Jobs in the statuses a body could act on (support.refusals.built_targets): {status: id}."""
    return built_targets(client)


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def refuser():
    """A database that accepts and hangs up at once (support.databases.Refuser)."""
    listener = Refuser()
    yield listener
    listener.close()


@pytest.fixture
def blackhole():
    """A database that accepts and never answers (support.databases.Blackhole)."""
    listener = Blackhole()
    yield listener
    listener.close()


@pytest.fixture
def db_conn(_schema):
    """A plain connection (autocommit) for looking at (or locking) the database from
    outside the app: the process's, as new for each test (support.databases.kept_connection)."""
    conn = kept_connection(_schema, "db_conn")
    yield conn
    give_back(conn)


# ---- PgBouncer in front of the session's PostgreSQL ----------------------------


def require_pgbouncer() -> None:
    """Skip (fail under CI=true) when Debian's pgbouncer is not installed."""
    if devpgbouncer.available():
        return
    reason = (
        f"PgBouncer is not installed ({devpgbouncer.BINARY}): `make test` installs it "
        "as root (apt-get install pgbouncer); the tests through PgBouncer did not run"
    )
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pgbouncer_factory():
    """Start PgBouncers (stock settings, a pool mode each) in front of a PostgreSQL URL."""
    bouncers = []

    def make(upstream_url: str, pool_mode: str = "transaction") -> LocalPgBouncer:
        require_pgbouncer()
        workdir = tempfile.mkdtemp(prefix=f"jobs-test-pgbouncer-{pool_mode}-")
        bouncer = LocalPgBouncer(upstream_url, workdir, pool_mode)
        bouncers.append(bouncer)
        bouncer.start()
        return bouncer

    yield make
    for bouncer in bouncers:
        bouncer.destroy()
