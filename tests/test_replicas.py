"""Reading from replicas (docs/API.md, Production topology, Replica reads).

A primary and a hot standby on this box (tests/support/replication.py), the standby
in DATABASE_REPLICA_URL. The operators' reads go to the standby: with its
replay paused, a job just created is not there yet (404, missing from the
lists), and once the standby is more than REPLICA_MAX_LAG_S behind the reads
go to the primary, which has it. Writes and everything a worker depends on
stay on the primary. A standby that is down never fails a read; an idle
primary does not make a caught-up standby look stale. Through PgBouncer in
front of the standby too, each target detecting the pooler for itself.
"""

from __future__ import annotations

import http.client
import time

import pytest

from dev.gunicorn import Server, wait_for_workers
from jobs import db, settings
from jobs.api import endpoint

from support.databases import query_rows
from support.replication import primary_and_standby
from support.service import assert_error, metric_samples, metric_value
from support.waiting import until

# Under pytest-xdist, on one worker: its primary and standby are the module's.
pytestmark = pytest.mark.xdist_group("replicas")

MAX_LAG_S = 4.0  # room for a loaded box between the pause and the reads it checks
CHECK_S = 0.05
# The routes whose reads may go to a replica: the operators' reads, nothing else.
REPLICA_ROUTES = {
    ("GET", "/jobs"),
    ("GET", "/jobs/<job_id>"),
    ("GET", "/jobs/<job_id>/progress"),
    ("GET", "/jobs/<job_id>/events"),
    ("GET", "/jobs/<job_id>/events/<event_id>"),
    ("GET", "/workers"),
    ("GET", "/workers/<node_id>"),
}


@pytest.fixture(scope="module")
def pair():
    with primary_and_standby() as pair:
        yield pair


@pytest.fixture
def standby(pair):
    """The standby, replaying and caught up after the test whatever it did."""
    yield pair.standby
    pair.standby.start()
    pair.standby.resume_replay()
    pair.standby.wait_caught_up()


@pytest.fixture
def replica_app(pair, apps):
    """``replica_app(replica_urls=None, **config)``: an app on the pair's primary reading
    from ``replica_urls`` (the standby by default); conftest's ``apps`` closes its pool
    and its replicas' connections afterwards."""

    def make(replica_urls=None, **config):
        return apps(
            DATABASE_URL=pair.primary.url,
            DATABASE_REPLICA_URL=tuple(replica_urls or [pair.standby.url]),
            REPLICA_MAX_LAG_S=MAX_LAG_S,
            REPLICA_CHECK_S=CHECK_S,
            **config,
        )

    return make


def checked(app) -> None:
    """Every replica checked now and found fresh (the service checks in the background,
    as reads come in)."""

    def fresh() -> bool:
        with app.app_context():
            replica_set = db.get_replicas()
            replica_set.check_all()
            now = time.monotonic()
            return all(
                not r.down and r.age(now) is not None and r.age(now) < MAX_LAG_S / 2
                for r in replica_set.replicas
            )

    until(fresh, what="the replicas found fresh")


def reads(client) -> tuple[float, float, float, float]:
    """The read and fallback counters: (primary, replica, lag, down)."""
    samples = metric_samples(client)
    return (
        metric_value(samples, "jobs_db_reads_total", target="primary"),
        metric_value(samples, "jobs_db_reads_total", target="replica"),
        metric_value(samples, "jobs_replica_fallbacks_total", reason="lag"),
        metric_value(samples, "jobs_replica_fallbacks_total", reason="down"),
    )


def lag_gauge(client) -> float:
    return metric_value(metric_samples(client), "jobs_replica_lag_seconds", replica="1")


def since(before, after) -> tuple[float, ...]:
    return tuple(b - a for a, b in zip(before, after, strict=True))


def new_job_and_worker(client, primary_url: str, name: str) -> tuple[int, int]:
    """A job (with a file) and a registered worker ``name``, written on the primary:
    (job id, the id of its first event)."""
    response = client.post("/jobs", json={"node_id": name})
    assert response.status_code == 201, response.get_json()
    job_id = response.get_json()["id"]
    assert client.put(f"/workers/{name}").status_code == 200
    file = {"file_name": f"{name}.parquet", "start_block": 1, "end_block": 9, "size_bytes": 5}
    assert client.post(f"/jobs/{job_id}/tables/blocks/files", json=file).status_code == 201
    sql = "SELECT min(id) FROM job_events WHERE job_id = %s"
    ((event_id,),) = query_rows(primary_url, sql, (job_id,))
    return job_id, event_id


def visible(client, job_id: int, event_id: int, name: str) -> dict[str, bool]:
    """Whether each read route sees the job and the worker."""
    listed = client.get("/jobs?status=all&limit=1000").get_json()["jobs"]
    workers = client.get("/workers").get_json()["workers"]
    found = {
        "list": any(job["id"] == job_id for job in listed),
        "workers": any(worker["node_id"] == name for worker in workers),
    }
    for path in (
        f"/jobs/{job_id}",
        f"/jobs/{job_id}/progress",
        f"/jobs/{job_id}/events",
        f"/jobs/{job_id}/events/{event_id}",
        f"/workers/{name}",
    ):
        response = client.get(path)
        assert response.status_code in (200, 404), (path, response.get_json())
        found[path] = response.status_code == 200
    return found


def test_exactly_the_operators_reads_are_declared_for_replicas():
    declared = {(m, r.rule) for r in endpoint.routes if r.replica for m in r.methods}
    assert declared == REPLICA_ROUTES


def test_reads_go_to_the_replica_until_it_lags_then_to_the_primary(pair, standby, replica_app):
    app = replica_app()
    client = app.test_client()
    old_job, old_event = new_job_and_worker(client, pair.primary.url, "w-old")
    standby.wait_caught_up()
    checked(app)
    before = reads(client)
    assert all(visible(client, old_job, old_event, "w-old").values())
    primary, replica, lag, down = since(before, reads(client))
    assert (primary, lag, down) == (0, 0, 0)
    assert replica == 7

    standby.pause_replay()
    paused_at = time.monotonic()
    with app.app_context():  # the freshest the replica is known to be; only later ones to come
        (fresh_as_of,) = [r.fresh_as_of for r in db.get_replicas().replicas]
    job_id, event_id = new_job_and_worker(client, pair.primary.url, "w-new")
    # Writes and a worker's routes are on the primary: they see the new job.
    assert client.post("/workers/w-new/heartbeat").status_code == 200
    assert client.put(f"/jobs/{job_id}/status", json={"status": "RUNNING"}).status_code == 200
    # The reads do not: the replica has not replayed it.
    before = reads(client)
    seen = visible(client, job_id, event_id, "w-new")
    assert time.monotonic() - paused_at < MAX_LAG_S, "too slow to tell"
    assert not any(seen.values()), seen
    assert_error(client.get(f"/jobs/{job_id}"), 404, "JOB_NOT_FOUND")
    assert since(before, reads(client)) == (0, 8, 0, 0)

    # Past REPLICA_MAX_LAG_S the replica is skipped: the reads go to the primary.
    until(lambda: client.get(f"/jobs/{job_id}").status_code == 200, what="a read on the primary")
    # Not before REPLICA_MAX_LAG_S from the last check that found it caught up (a
    # moment before the pause: up to MAX_LAG_S / 2 and the time since checked()).
    assert time.monotonic() - fresh_as_of > MAX_LAG_S
    before = reads(client)
    assert all(visible(client, job_id, event_id, "w-new").values())
    assert client.get(f"/jobs/{job_id}").get_json()["status"] == "RUNNING"
    assert since(before, reads(client)) == (8, 0, 8, 0)
    assert lag_gauge(client) > MAX_LAG_S

    # Replaying again, the replica answers again.
    standby.resume_replay()
    standby.wait_caught_up()
    checked(app)
    before = reads(client)
    assert all(visible(client, job_id, event_id, "w-new").values())
    assert since(before, reads(client)) == (0, 7, 0, 0)


def test_an_idle_primary_keeps_a_caught_up_replica_fresh(pair, standby, replica_app):
    app = replica_app()
    client = app.test_client()
    standby.wait_caught_up()
    checked(app)
    before = reads(client)
    # No writes for longer than REPLICA_MAX_LAG_S: the positions still match.
    deadline = time.monotonic() + MAX_LAG_S * 1.5
    while time.monotonic() < deadline:
        assert client.get("/jobs").status_code == 200
        time.sleep(CHECK_S)
    primary, replica, lag, down = since(before, reads(client))
    assert (primary, lag, down) == (0, 0, 0), (primary, replica, lag, down)
    assert replica > 10


def test_a_replica_down_never_fails_a_read(pair, standby, replica_app):
    app = replica_app()
    client = app.test_client()
    job_id, _ = new_job_and_worker(client, pair.primary.url, "w-down")
    standby.wait_caught_up()
    checked(app)
    assert client.get(f"/jobs/{job_id}").status_code == 200  # a replica connection is pooled

    standby.stop()
    before = reads(client)
    for _ in range(20):
        response = client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.get_json()
        assert client.get("/jobs").status_code == 200
    primary, replica, lag, down = since(before, reads(client))
    assert (primary, replica, lag) == (40, 0, 0)
    assert down == 40  # the first read failed on the replica and ran again on the primary
    until(lambda: lag_gauge(client) == float("inf"), what="the replica's lag unknown")

    standby.start()
    standby.wait_caught_up()

    def on_the_replica() -> bool:
        assert client.get("/jobs").status_code == 200
        return since(before, reads(client))[1] > 0

    until(on_the_replica, what="reads on the replica again")


def test_a_frozen_replica_costs_one_deadline_then_reads_go_to_the_primary(
    pair, standby, replica_app
):
    app = replica_app(STATEMENT_TIMEOUT_MS=300, DB_CONNECT_TIMEOUT_S=1)
    client = app.test_client()
    job_id, _ = new_job_and_worker(client, pair.primary.url, "w-frozen")
    standby.wait_caught_up()
    checked(app)
    assert client.get(f"/jobs/{job_id}").status_code == 200
    before = reads(client)
    standby.freeze()
    try:
        started = time.monotonic()
        response = client.get(f"/jobs/{job_id}")
        # The replica's deadline (300 ms + 1 s), then the primary.
        assert response.status_code == 200, response.get_json()
        assert 1.2 < time.monotonic() - started < 2.5
        started = time.monotonic()
        for _ in range(10):
            assert client.get(f"/jobs/{job_id}").status_code == 200
        assert time.monotonic() - started < 1.0  # skipped at once while it is down
        assert since(before, reads(client)) == (11, 0, 0, 11)
    finally:
        standby.thaw()
    checked(app)
    assert client.get(f"/jobs/{job_id}").status_code == 200
    assert since(before, reads(client))[1] == 1


def test_replica_reads_through_pgbouncer(pair, standby, replica_app, pgbouncer_factory):
    bouncer = pgbouncer_factory(standby.url, "transaction")
    app = replica_app([bouncer.url])
    client = app.test_client()
    standby.wait_caught_up()
    checked(app)
    before = reads(client)
    assert client.get("/jobs").status_code == 200
    assert since(before, reads(client))[:2] == (0, 1)
    # Each target found out for itself whether it reaches PostgreSQL directly.
    with app.app_context():
        (replica,) = db.get_replicas().replicas
        assert replica.pool._idle and not any(c.direct for c in replica.pool._idle)
        assert db.get_pool()._idle and all(c.direct for c in db.get_pool()._idle)

    standby.pause_replay()
    job_id, event_id = new_job_and_worker(client, pair.primary.url, "w-bouncer")
    assert not any(visible(client, job_id, event_id, "w-bouncer").values())
    until(lambda: client.get(f"/jobs/{job_id}").status_code == 200, what="a read on the primary")


def test_replicas_under_gunicorn(pair, standby):
    """The checks run in gevent's workers too: reads reach the replica, and fall back."""
    env = {
        "DATABASE_REPLICA_URL": standby.url,
        "REPLICA_MAX_LAG_S": str(MAX_LAG_S),
        "REPLICA_CHECK_S": str(CHECK_S),
    }
    server = Server(pair.primary.url, workers=2, env=env).start()
    try:
        wait_for_workers(server.process.pid, 2)
        call = server.caller()

        def replica_reads() -> float:
            for _ in range(4):
                assert call("GET", "/jobs")[0] == 200
            text = _metrics(server)
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith('jobs_db_reads_total{target="replica"}')
            )

        until(lambda: replica_reads() >= 20, what="reads on the replica")
        standby.pause_replay()
        status, job = call("POST", "/jobs", {"node_id": "w-gunicorn"})
        assert status == 201
        seen = [call("GET", f"/jobs/{job['id']}")[0] for _ in range(6)]
        assert 404 in seen, seen  # answered by the replica, which has not replayed it
        until(
            lambda: all(call("GET", f"/jobs/{job['id']}")[0] == 200 for _ in range(6)),
            what="reads on the primary",
        )
        assert "Traceback" not in server.log()
    finally:
        server.stop()
        server.cleanup()


def _metrics(server) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def test_the_replica_settings():
    def read(**environ):
        cfg = settings.from_environment(environ)
        assert settings.problems(cfg) == []
        return cfg["DATABASE_REPLICA_URL"], cfg["REPLICA_MAX_LAG_S"], cfg["REPLICA_CHECK_S"]

    assert read() == (None, 5, 1)
    multi = "postgresql://u:secret@db2:5432,db3:5432/jobs?target_session_attrs=standby"
    assert read(DATABASE_REPLICA_URL=multi)[0] == (multi,)
    one, two = "postgresql://db2/jobs", "postgres://db3/jobs?sslmode=require"
    for text in (f"{one} {two}", f"{one},{two}", f" {one} ,\n {two} "):
        assert read(DATABASE_REPLICA_URL=text)[0] == (one, two), text
    assert read(REPLICA_MAX_LAG_S="0.5", REPLICA_CHECK_S="0.2")[1:] == (0.5, 0.2)
    rule = settings.BY_NAME["DATABASE_REPLICA_URL"].rule
    for bad in (
        f"{one} host=db3 password=hunter2",  # not a URL
        f"{one} postgresql://db3/jobs?password=hunter2&bogus=1",  # not libpq's
        " ".join([one] * 9),  # too many
    ):
        with pytest.raises(settings.SettingsError) as refused:
            read(DATABASE_REPLICA_URL=bad)
        assert str(refused.value) == (
            f"DATABASE_REPLICA_URL: not allowed (the value is not shown): expected {rule}"
        )
    for name, bad in (
        ("REPLICA_MAX_LAG_S", "0"),
        ("REPLICA_MAX_LAG_S", "3601"),
        ("REPLICA_CHECK_S", "61"),
    ):
        with pytest.raises(settings.SettingsError, match=f"^{name}: '{bad}' is out of range"):
            read(**{name: bad})
    # A test's (or a running app's) own values are held to the same rules.
    base = settings.from_environment({})
    assert settings.problems({**base, "DATABASE_REPLICA_URL": (one, two)}) == []
    assert settings.problems({**base, "DATABASE_REPLICA_URL": ("db2",)}) == [
        f"DATABASE_REPLICA_URL: expected {rule}"
    ]


def test_without_replicas_every_read_is_the_primarys(client):
    before = reads(client)
    assert client.get("/jobs").status_code == 200
    assert client.get("/jobs/1").status_code == 404
    assert client.post("/jobs", json={"node_id": "n"}).status_code == 201
    assert since(before, reads(client)) == (2, 0, 0, 0)
