"""Waiting without polling (docs/API.md, Waiting without polling): long-polled
heartbeats, events after an id with a wait and in pages, and the follow stream.

Through real gunicorn, two instances on one database: a request waiting on one
instance is woken by a change made through the other, within a second, by
every cause a worker must hear of. The events' paging and the refusals of bad
input run in process. A waiting request holds no database connection, a
waiting worker is never LOST, and SIGTERM answers waits at once. The same
waits through PgBouncer in transaction mode (polling, or LISTEN on
DATABASE_LISTEN_URL) are at the end; `.ci/run` also runs this whole module
with every instance behind PgBouncer.
"""

from __future__ import annotations

import json
import signal
import time

import psycopg2
import pytest

from dev.gunicorn import Server, serving
from jobs import waiting
from jobs.store import jobs as job_store

from support.databases import init_db, lose_worker
from support.retrying import register
from support.service import (
    assert_error,
    create_job,
    events_of,
    move_to,
    served_metric,
    sweep_leases,
)
from support.waiting import (
    Background,
    EventStreamReader,
    until,
    until_requests_wait,
    until_waiting,
)

# Under pytest-xdist, on one worker: its gunicorn instances are the module's.
pytestmark = pytest.mark.xdist_group("waiting")

WAKE_S = 1.0  # a wake-up reaches the waiter within this of the change's answer


@pytest.fixture(scope="module")
def instances(database_url):
    init_db(database_url)
    with serving(database_url, count=2, workers=2, env={"FOLLOW_KEEPALIVE_S": "1"}) as pair:
        yield pair


@pytest.fixture
def a_b(app, instances):
    """The two instances' callers (``app`` has emptied the tables)."""
    return instances[0].caller(), instances[1].caller()


@pytest.fixture
def hubs():
    """Hubs made by in-process apps are closed afterwards."""
    made = []
    yield made
    for app in made:
        hub = app.extensions.get("jobs_waiting")
        if hub is not None:
            hub.close()


def woken_in(request: Background, changed_at: float) -> float:
    request.join()
    return request.answered_at - changed_at


# ---- Heartbeats ---------------------------------------------------------------------


def test_a_heartbeat_waiting_on_one_instance_hears_of_a_job_created_on_another(a_b, db_conn):
    a, b = a_b
    register(a, "w-1")
    beat = Background(a, "POST", "/workers/w-1/heartbeat?wait=20")
    until_waiting(db_conn, "w-1")
    job = create_job(b, "w-1")
    changed_at = time.monotonic()
    assert woken_in(beat, changed_at) < WAKE_S
    status, body = beat.result
    assert status == 200
    assert set(body) == {"node_id", "heartbeat_at", "scheduled", "stop_requested", "leases"}
    assert (body["node_id"], body["scheduled"], body["stop_requested"]) == ("w-1", [job["id"]], [])


def automatic_retry(db_conn, job_id: int) -> None:
    """What the automatic retry writes: FAILED -> SCHEDULED and one SCHEDULED event."""
    with db_conn.cursor() as cur:
        cur.execute(
            """
            WITH moved AS (
                UPDATE jobs SET status = 'SCHEDULED', updated_at = clock_timestamp()
                WHERE id = %s AND status = 'FAILED' RETURNING *
            )
            INSERT INTO job_events (job_id, created_at, event_type, node_id, detail)
            SELECT id, updated_at, 'SCHEDULED', node_id, '{"reason": "retry", "attempt": 2}'
            FROM moved
            """,
            (job_id,),
        )
        assert cur.rowcount == 1


def test_every_cause_wakes_a_waiting_heartbeat(a_b, db_conn):
    """Created, moved to it, retried (by an operator or automatically), a stop requested."""
    a, b = a_b
    jobs = {}

    def created(node):
        jobs[node] = create_job(b, node)["id"]
        return "scheduled"

    def moved_to_it(node):
        jobs[node] = create_job(b, "elsewhere")["id"]
        status, body = b(
            "PUT", f"/jobs/{jobs[node]}/status", {"status": "SCHEDULED", "node_id": node}
        )
        assert status == 200, body
        return "scheduled"

    def retried(node):
        status, body = b("PUT", f"/jobs/{jobs[node]}/status", {"status": "SCHEDULED"})
        assert status == 200, body
        return "scheduled"

    def retried_automatically(node):
        automatic_retry(db_conn, jobs[node])
        return "scheduled"

    def stop_requested(node):
        assert b("PUT", f"/jobs/{jobs[node]}/stop")[0] == 200
        return "stop_requested"

    def failed(node):
        jobs[node] = create_job(b, node)["id"]
        move_to(b, jobs[node], "FAILED")

    def running(node):
        jobs[node] = create_job(b, node)["id"]
        move_to(b, jobs[node], "RUNNING")

    causes = [
        ("w-created", None, created),
        ("w-moved", None, moved_to_it),
        ("w-retried", failed, retried),
        ("w-auto", failed, retried_automatically),
        ("w-stop", running, stop_requested),
    ]
    for node, setup, cause in causes:
        register(a, node)
        if setup:
            setup(node)
        beat = Background(a, "POST", f"/workers/{node}/heartbeat?wait=20")
        until_waiting(db_conn, node)
        listed = cause(node)
        assert woken_in(beat, time.monotonic()) < WAKE_S, node
        status, body = beat.result
        assert status == 200, body
        assert body[listed] == [jobs[node]], (node, body)


def test_a_heartbeat_waits_out_its_time_and_answers_the_usual_body(a_b, db_conn):
    a, b = a_b
    register(a, "w-idle")
    job = create_job(b, "w-idle")
    move_to(b, job["id"], "RUNNING")  # nothing to start or stop: it waits
    started = time.monotonic()
    beat = Background(a, "POST", "/workers/w-idle/heartbeat?wait=1")
    until_waiting(db_conn, "w-idle")
    arrival = b("GET", "/workers/w-idle")[1]["heartbeat_at"]
    status, body = beat.join()
    assert 0.9 < beat.answered_at - started < 1 + WAKE_S
    assert status == 200
    assert body == {
        "node_id": "w-idle",
        "heartbeat_at": body["heartbeat_at"],
        "scheduled": [],
        "stop_requested": [],
        "leases": [{"job_id": job["id"], "attempt": 1, "status": "RUNNING"}],
    }
    # Set when it arrived, and again when it answered.
    assert arrival < body["heartbeat_at"] == b("GET", "/workers/w-idle")[1]["heartbeat_at"]
    with db_conn.cursor() as cur:
        cur.execute("SELECT waiting_until FROM workers WHERE node_id = 'w-idle'")
        assert cur.fetchone() == (None,)
    # wait=0 is the plain heartbeat, as is no wait at all.
    for path in ("/workers/w-idle/heartbeat?wait=0", "/workers/w-idle/heartbeat"):
        started = time.monotonic()
        assert a("POST", path)[1]["scheduled"] == []
        assert time.monotonic() - started < 0.5
    # A worker with something to start is answered at once.
    create_job(b, "w-idle")
    started = time.monotonic()
    assert len(a("POST", "/workers/w-idle/heartbeat?wait=30")[1]["scheduled"]) == 1
    assert time.monotonic() - started < 0.5
    assert a("POST", "/workers/nobody/heartbeat?wait=5")[0] == 404


def test_a_waiting_worker_is_never_lost(app, a_b, db_conn, database_url):
    """Whatever its heartbeat_at says, on every replica, and the lease sweep leaves it alone."""
    a, b = a_b
    register(a, "w-wait")
    job = create_job(b, "w-wait")
    move_to(b, job["id"], "RUNNING")
    beat = Background(a, "POST", "/workers/w-wait/heartbeat?wait=2")
    until_waiting(db_conn, "w-wait")
    lose_worker(database_url, "w-wait")  # its heartbeat an hour old
    for call in (a, b):
        assert call("GET", "/workers/w-wait")[1]["status"] == "ALIVE"
        assert {w["node_id"]: w["status"] for w in call("GET", "/workers")[1]["workers"]} == {
            "w-wait": "ALIVE"
        }
    assert sweep_leases(app) == {}
    assert b("GET", f"/jobs/{job['id']}")[1]["status"] == "RUNNING"
    assert beat.join()[0] == 200
    assert b("GET", "/workers/w-wait")[1]["status"] == "ALIVE"  # it answered: fresh again
    # A mark left by a replica that died mid-wait runs out: then the worker is LOST.
    with db_conn.cursor() as cur:
        cur.execute(
            "UPDATE workers SET heartbeat_at = now() - interval '1 hour',"
            " waiting_until = now() - interval '1 second' WHERE node_id = 'w-wait'"
        )
    assert b("GET", "/workers/w-wait")[1]["status"] == "LOST"
    sweep_leases(app)  # (or the instances' own sweep, after that answer)
    assert b("GET", f"/jobs/{job['id']}")[1]["status"] == "FAILED"


# ---- Events: after, wait, deletes -----------------------------------------------------


def test_events_after_an_id_wait_for_the_next_one(instances, a_b):
    a, b = a_b
    job_id = create_job(b, "w-ev")["id"]
    (first,) = events_of(b, job_id)
    # after alone filters, without waiting.
    started = time.monotonic()
    assert a("GET", f"/jobs/{job_id}/events?after={first['id']}") == (
        200,
        {"job_id": job_id, "events": [], "next_cursor": None},
    )
    assert time.monotonic() - started < 0.5
    assert a("GET", f"/jobs/{job_id}/events?after={first['id']}&wait=0")[1]["events"] == []

    waiter = Background(a, "GET", f"/jobs/{job_id}/events?after={first['id']}&wait=20")
    until_requests_wait(instances[0], "events")
    move_to(b, job_id, "RUNNING")
    assert woken_in(waiter, time.monotonic()) < WAKE_S
    status, body = waiter.result
    assert status == 200
    assert [e["event_type"] for e in body["events"]] == ["RUNNING"]
    assert body["events"] == events_of(b, job_id)[1:]
    assert body["next_cursor"] is None

    # wait without after: what comes after the latest event at arrival.
    waiter = Background(a, "GET", f"/jobs/{job_id}/events?wait=20")
    until_requests_wait(instances[0], "events")
    assert (
        b("PUT", f"/jobs/{job_id}/status", {"status": "COMPLETED", "detail": {"rows": 7}})[0] == 200
    )
    assert woken_in(waiter, time.monotonic()) < WAKE_S
    (completed,) = waiter.result[1]["events"]
    assert (completed["event_type"], completed["detail"]) == ("COMPLETED", {"rows": 7})

    # Nothing comes: an empty page after the wait.
    started = time.monotonic()
    assert a("GET", f"/jobs/{job_id}/events?wait=1") == (
        200,
        {"job_id": job_id, "events": [], "next_cursor": None},
    )
    assert 0.9 < time.monotonic() - started < 1 + WAKE_S
    assert a("GET", "/jobs/987654321/events?wait=5")[1]["error_code"] == "JOB_NOT_FOUND"


def test_a_job_deleted_while_waited_on_answers_404_within_a_second(instances, a_b):
    a, b = a_b
    job_id = create_job(b, "w-del")["id"]
    move_to(b, job_id, "COMPLETED")
    waiter = Background(a, "GET", f"/jobs/{job_id}/events?wait=20")
    until_requests_wait(instances[0], "events")
    assert b("DELETE", f"/jobs/{job_id}")[0] == 204
    deleted_at = time.monotonic()
    assert woken_in(waiter, deleted_at) < WAKE_S
    assert waiter.result == (
        404,
        {"error_code": "JOB_NOT_FOUND", "error_message": f"job {job_id} not found"},
    )
    # A bulk delete wakes its waiters too.
    job_id = create_job(b, "w-del")["id"]
    move_to(b, job_id, "FAILED")
    waiter = Background(a, "GET", f"/jobs/{job_id}/events?wait=20")
    until_requests_wait(instances[0], "events")
    assert b("DELETE", "/jobs?status=error")[0] == 204
    assert woken_in(waiter, time.monotonic()) < WAKE_S
    assert waiter.result[0] == 404


# ---- The follow stream --------------------------------------------------------------------


def test_the_follow_stream_sends_history_then_each_event_live_and_ends_at_the_end(instances, a_b):
    _, b = a_b
    job_id = create_job(b, "w-follow")["id"]
    move_to(b, job_id, "RUNNING")
    stream = EventStreamReader(instances[0].port, f"/jobs/{job_id}/events?follow=true")
    try:
        assert stream.status == 200
        assert stream.header("Content-Type") == "text/event-stream"
        assert stream.header("Cache-Control") == "no-store"
        so_far = [stream.next_frame(), stream.next_frame()]
        assert [f.event for f in so_far] == ["SCHEDULED", "RUNNING"]
        time.sleep(1.3)  # FOLLOW_KEEPALIVE_S is 1 here: a comment comes meanwhile
        assert (
            b(
                "POST",
                f"/jobs/{job_id}/tables/t/files",
                {
                    "file_name": "f",
                    "start_block": 0,
                    "end_block": 9,
                    "size_bytes": 1,
                },
            )[0]
            == 201
        )  # no event: nothing sent
        assert b("PUT", f"/jobs/{job_id}/stop")[0] == 200
        changed_at = time.monotonic()
        live = stream.next_frame()
        assert time.monotonic() - changed_at < WAKE_S
        assert live.event == "STOP_REQUESTED"
        move_to(b, job_id, "STOPPING")
        assert b("PUT", f"/jobs/{job_id}/status", {"status": "STOPPED"})[0] == 200
        rest = stream.frames_until_end()
        assert stream.ended, "the stream ends after the job's terminal event"
        assert stream.comments >= 2  # the first line, and a keep-alive
    finally:
        stream.close()
    frames = [*so_far, live, *rest]
    events = events_of(b, job_id)
    assert (
        [f.event for f in frames]
        == [e["event_type"] for e in events]
        == [
            "SCHEDULED",
            "RUNNING",
            "STOP_REQUESTED",
            "STOPPING",
            "STOPPED",
        ]
    )
    assert [int(f.id) for f in frames] == [e["id"] for e in events]
    assert [f.json() for f in frames] == events


def test_the_follow_stream_resumes_after_last_event_id(instances, a_b):
    _, b = a_b
    job_id = create_job(b, "w-resume")["id"]
    move_to(b, job_id, "RUNNING")
    events = events_of(b, job_id)
    stream = EventStreamReader(
        instances[1].port,
        f"/jobs/{job_id}/events?follow=true",
        headers={"Last-Event-ID": str(events[0]["id"])},
    )
    try:
        assert stream.next_frame().event == "RUNNING"
        move_to(b, job_id, "FAILED")  # FAILED, no retry pending: the end
        assert [f.event for f in stream.frames_until_end()] == ["FAILED"]
    finally:
        stream.close()
    # Resuming after the terminal event of a finished job: nothing, and the end.
    last = events_of(b, job_id)[-1]["id"]
    for headers, path in (
        ({"Last-Event-ID": str(last)}, f"/jobs/{job_id}/events?follow=true"),
        ({}, f"/jobs/{job_id}/events?follow=true&after={last}"),
        # The header wins over ?after= (a browser's EventSource repeats the URL).
        ({"Last-Event-ID": str(last)}, f"/jobs/{job_id}/events?follow=true&after=1"),
    ):
        stream = EventStreamReader(instances[0].port, path, headers=headers)
        try:
            assert stream.status == 200
            assert stream.frames_until_end() == []
        finally:
            stream.close()
    # A missing job, or a malformed Last-Event-ID: the route's JSON errors.
    for headers, path, status, code in (
        ({}, "/jobs/987654321/events?follow=true", 404, "JOB_NOT_FOUND"),
        (
            {"Last-Event-ID": "x1"},
            f"/jobs/{job_id}/events?follow=true",
            400,
            "INVALID_QUERY_PARAMETERS",
        ),
    ):
        stream = EventStreamReader(instances[0].port, path, headers=headers)
        try:
            assert stream.status == status
            assert stream.header("Content-Type") == "application/json"
            assert json.loads(stream.response.read())["error_code"] == code
        finally:
            stream.close()


# ---- What waiting holds -----------------------------------------------------------------


def test_waiting_requests_hold_no_database_connection(
    instances, a_b, db_conn, database_url, postgres_url
):
    """40 heartbeats wait on an instance whose 2 processes pool 4 connections each: had
    they held one each, most would have answered 500 after DB_POOL_TIMEOUT_S (5 s)."""
    a, b = a_b
    nodes = [f"w-many-{i}" for i in range(40)]
    with db_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO workers (node_id, created_at, registered_at, heartbeat_at)"
            " SELECT n, now(), now(), now() FROM unnest(%s::text[]) n",
            (nodes,),
        )
    beats = [Background(a, "POST", f"/workers/{n}/heartbeat?wait=2") for n in nodes]
    until_requests_wait(instances[0], "heartbeat", len(nodes))
    with db_conn.cursor() as cur:
        cur.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity"
            " WHERE application_name LIKE 'jobs-service%%' GROUP BY 1"
        )
        held = dict(cur.fetchall())
    if database_url == postgres_url:  # (through PgBouncer its server connections show)
        # Each process: at most its pool, plus one connection that listens.
        assert held.get("jobs-service", 0) <= 2 * 2 * 4, held  # two instances
        assert held.get("jobs-service-waiting", 0) <= 2 * 2, held
    create_job(b, nodes[7])
    for i, beat in enumerate(beats):
        status, body = beat.join()
        assert status == 200, body
        assert len(body["scheduled"]) == (1 if i == 7 else 0)
    assert beats[7].answered_at < min(beat.answered_at for beat in beats[8:])


def test_past_its_capacity_a_process_answers_503_not_a_hang(app, hubs):
    app.config["WAITERS_PER_PROCESS"] = 1
    hubs.append(app)
    client = app.test_client()
    assert client.put("/workers/w-cap").status_code == 200
    job_id = client.post("/jobs", json={"node_id": "w-cap"}).get_json()["id"]
    client.put(f"/jobs/{job_id}/status", json={"status": "RUNNING"})
    holder = Background(
        lambda m, p, b: app.test_client().open(p, method=m).status_code,
        "POST",
        "/workers/w-cap/heartbeat?wait=2",
    )
    until(lambda: waiting.of(app).count == 1, what="the first waiter")
    for path, method in (
        ("/workers/w-cap/heartbeat?wait=5", "POST"),
        (f"/jobs/{job_id}/events?wait=5", "GET"),
        (f"/jobs/{job_id}/events?follow=true", "GET"),
    ):
        started = time.monotonic()
        response = client.open(path, method=method)
        assert time.monotonic() - started < 0.5
        message = assert_error(response, 503, "SERVICE_BUSY")
        assert "waiting requests" in message
        assert response.headers["Retry-After"] == "1"
    # Without a wait the same routes answer as ever.
    assert client.post("/workers/w-cap/heartbeat").status_code == 200
    assert client.get(f"/jobs/{job_id}/events").status_code == 200
    assert holder.join() == 200
    assert waiting.of(app).count == 0


def test_sigterm_answers_waiting_requests_at_once(database_url, app):
    server = Server(database_url, workers=1, env={"GRACEFUL_TIMEOUT": "20"}).start()
    try:
        call = server.caller()
        register(call, "w-term")
        job_id = create_job(call, "w-other")["id"]
        beat = Background(call, "POST", "/workers/w-term/heartbeat?wait=30")
        polled = Background(call, "GET", f"/jobs/{job_id}/events?wait=30")
        stream = EventStreamReader(server.port, f"/jobs/{job_id}/events?follow=true")
        assert stream.next_frame().event == "SCHEDULED"
        until_requests_wait(server, "heartbeat")
        until_requests_wait(server, "events")
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert beat.join() == (200, beat.result[1])
        assert beat.result[1]["scheduled"] == []
        assert polled.join() == (200, {"job_id": job_id, "events": [], "next_cursor": None})
        assert stream.frames_until_end() == []  # the stream ends
        stream.close()
        assert time.monotonic() - signalled < 3
        assert server.process.wait(10) == 0
        assert time.monotonic() - signalled < 8  # not the 20 s graceful timeout
    finally:
        server.stop()
        server.cleanup()


# ---- In process: paging, input, the retry hook ---------------------------------------------


def add_events(db_conn, job_id: int, count: int, detail_bytes: int = 0) -> None:
    with db_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO job_events (job_id, event_type, node_id, detail)"
            " SELECT %s, 'RUNNING', 'w', CASE WHEN %s > 0"
            " THEN jsonb_build_object('blob', repeat('x', %s)) END"
            " FROM generate_series(1, %s)",
            (job_id, detail_bytes, detail_bytes, count),
        )


def test_events_come_in_pages(client, db_conn):
    job_id = client.post("/jobs", json={"node_id": "w"}).get_json()["id"]
    add_events(db_conn, job_id, 24)
    everything = client.get(f"/jobs/{job_id}/events").get_json()
    assert len(everything["events"]) == 25 and everything["next_cursor"] is None
    ids = [e["id"] for e in everything["events"]]
    assert ids == sorted(ids)
    pages, path = [], f"/jobs/{job_id}/events?limit=10"
    while True:
        body = client.get(path).get_json()
        pages.append([e["id"] for e in body["events"]])
        if body["next_cursor"] is None:
            break
        assert body["next_cursor"] == pages[-1][-1]
        path = f"/jobs/{job_id}/events?limit=10&after={body['next_cursor']}"
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [i for page in pages for i in page] == ids
    # A page that ends exactly at the last event says so.
    body = client.get(f"/jobs/{job_id}/events?limit=5&after={ids[19]}").get_json()
    assert ([e["id"] for e in body["events"]], body["next_cursor"]) == (ids[20:], None)
    body = client.get(f"/jobs/{job_id}/events?after={ids[-1]}&limit=1").get_json()
    assert body == {"job_id": job_id, "events": [], "next_cursor": None}
    # Events of other jobs never show.
    other = client.post("/jobs", json={"node_id": "w"}).get_json()["id"]
    assert [e["id"] for e in client.get(f"/jobs/{other}/events?after=1").get_json()["events"]] != []
    assert client.get(f"/jobs/{job_id}/events?after={ids[-1]}").get_json()["events"] == []


def test_a_page_of_events_ends_at_its_byte_budget(client, db_conn):
    """1 MiB per page: a job with 3 MB of details is read a few events at a time."""
    job_id = client.post("/jobs", json={"node_id": "w"}).get_json()["id"]
    add_events(db_conn, job_id, 8, detail_bytes=300_000)
    sizes, path = [], f"/jobs/{job_id}/events"
    while True:
        response = client.get(path)
        body = response.get_json()
        sizes.append(len(body["events"]))
        assert len(response.data) <= 1024 * 1024 + 1000
        if body["next_cursor"] is None:
            break
        after = body["next_cursor"]
        path = f"/jobs/{job_id}/events?after={after}"
    assert sizes == [4, 3, 2]  # 1 small + 3 big, then 3 big, then the last 2
    # An event larger than the budget still comes, alone.
    add_events(db_conn, job_id, 2, detail_bytes=1_100_000)
    sizes = []
    while after is not None:
        body = client.get(f"/jobs/{job_id}/events?after={after}").get_json()
        sizes.append([len(json.dumps(e["detail"])) // 100_000 for e in body["events"]])
        after = body["next_cursor"]
    assert sizes == [[3, 3], [11], [11]]


@pytest.mark.parametrize(
    "query, name",
    [
        ("wait=-1", "wait"),
        ("wait=61", "wait"),
        ("wait=1.5", "wait"),
        ("wait=abc", "wait"),
        ("wait=", "wait"),
        ("wait=05", "wait"),
        ("wait=%2B5", "wait"),
        ("wait=99999999999999999999", "wait"),
        ("after=0", "after"),
        ("after=abc", "after"),
        ("after=-3", "after"),
        ("after=9223372036854775808", "after"),
        ("follow=yes", "follow"),
        ("follow=TRUE", "follow"),
        ("follow=1", "follow"),
        ("follow=", "follow"),
        ("follow=true&wait=5", "wait"),
        ("follow=true&limit=5", "limit"),
        ("wait=1&wait=2", "wait"),
        ("since=3", "since"),
    ],
)
def test_bad_input_on_events_is_a_400_naming_the_parameter(client, query, name):
    job_id = client.post("/jobs", json={"node_id": "w"}).get_json()["id"]
    message = assert_error(
        client.get(f"/jobs/{job_id}/events?{query}"), 400, "INVALID_QUERY_PARAMETERS"
    )
    assert name in message


def test_bad_input_on_heartbeats_and_limits(client):
    client.put("/workers/w")
    for query in ("wait=61", "wait=-1", "wait=x", "wait=1e1", "wait=1&wait=2"):
        message = assert_error(
            client.post(f"/workers/w/heartbeat?{query}"), 400, "INVALID_QUERY_PARAMETERS"
        )
        assert "wait" in message
    job_id = client.post("/jobs", json={"node_id": "w"}).get_json()["id"]
    assert_error(client.get(f"/jobs/{job_id}/events?limit=0"), 400, "LIMIT_INVALID")
    assert "1000" in assert_error(
        client.get(f"/jobs/{job_id}/events?limit=1001"), 400, "LIMIT_TOO_LARGE"
    )
    assert_error(client.get("/jobs/0/events?wait=1"), 400, "INVALID_JOB_ID")
    assert_error(
        client.get(f"/jobs/{job_id}/events?follow=true", headers={"Last-Event-ID": "0"}),
        400,
        "INVALID_QUERY_PARAMETERS",
    )
    # follow=false is the list; the largest wait is accepted.
    assert client.get(f"/jobs/{job_id}/events?follow=false&limit=1").status_code == 200
    assert client.post("/workers/w/heartbeat?wait=60").status_code == 200  # has a job


def test_a_pending_automatic_retry_keeps_the_job_open(db_conn, client):
    """With retry_at (added with automatic retries) set on a FAILED job, the stream goes
    on; the column is made here in a transaction that is rolled back."""
    job_id = client.post("/jobs", json={"node_id": "w"}).get_json()["id"]
    client.put(f"/jobs/{job_id}/status", json={"status": "FAILED"})
    conn = psycopg2.connect(db_conn.dsn)
    try:
        with conn.cursor() as cur:
            assert job_store.events_page(cur, job_id, 0, 10).ended
            cur.execute("ALTER TABLE jobs ADD COLUMN IF NOT EXISTS retry_at timestamptz")
            assert job_store.events_page(cur, job_id, 0, 10).ended
            cur.execute(
                "UPDATE jobs SET retry_at = now() + interval '1 minute' WHERE id = %s", (job_id,)
            )
            assert not job_store.events_page(cur, job_id, 0, 10).ended
    finally:
        conn.rollback()
        conn.close()


def test_a_terminal_jobs_stream_in_process_is_its_history(client):
    job_id = client.post("/jobs", json={"node_id": "w"}).get_json()["id"]
    client.put(f"/jobs/{job_id}/status", json={"status": "RUNNING"})
    client.put(f"/jobs/{job_id}/status", json={"status": "COMPLETED"})
    response = client.get(f"/jobs/{job_id}/events?follow=true")
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    blocks = response.get_data(as_text=True).split("\n\n")
    assert blocks[0].startswith(":") and blocks[-1] == ""
    events = client.get(f"/jobs/{job_id}/events").get_json()["events"]
    frames = [block.split("\n") for block in blocks[1:-1]]
    assert [f[:2] for f in frames] == [
        [f"id: {e['id']}", f"event: {e['event_type']}"] for e in events
    ]
    assert [json.loads(f[2].removeprefix("data: ")) for f in frames] == events
    assert all(len(f) == 3 for f in frames)


# ---- Through PgBouncer in transaction mode ---------------------------------------------------


@pytest.fixture(scope="module")
def bouncer_pair(postgres_url, pgbouncer_factory, database_url):
    """One instance through PgBouncer that polls, one through it that LISTENs directly."""
    init_db(database_url)
    bouncer = pgbouncer_factory(postgres_url, "transaction").url
    polling = Server(bouncer, workers=1, env={"WAIT_POLL_INTERVAL_MS": "250"})
    listening = Server(bouncer, workers=1, env={"DATABASE_LISTEN_URL": postgres_url})
    servers = [polling, listening]
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready()
        yield polling, listening
    finally:
        for server in servers:
            server.stop()
            server.cleanup()


def connects(server, mode: str) -> float:
    return served_metric(server, "jobs_wait_connects_total", mode=mode)


def test_waiting_through_pgbouncer_polls_or_listens_directly(app, instances, bouncer_pair, db_conn):
    polling, listening = bouncer_pair
    other = instances[0].caller()
    for server, mode, node in ((polling, "poll", "w-poll"), (listening, "listen", "w-listen")):
        call = server.caller()
        register(call, node)
        beat = Background(call, "POST", f"/workers/{node}/heartbeat?wait=20")
        until_waiting(db_conn, node)
        job_id = create_job(other, node)["id"]
        assert woken_in(beat, time.monotonic()) < WAKE_S, mode
        assert beat.result[1]["scheduled"] == [job_id]
        assert connects(server, mode) >= 1, mode
        # Events and deletes are heard the same way.
        waiter = Background(call, "GET", f"/jobs/{job_id}/events?wait=20")
        until_requests_wait(server, "events")
        assert other("PUT", f"/jobs/{job_id}/status", {"status": "FAILED"})[0] == 200
        assert woken_in(waiter, time.monotonic()) < WAKE_S, mode
        assert [e["event_type"] for e in waiter.result[1]["events"]] == ["FAILED"]
        waiter = Background(call, "GET", f"/jobs/{job_id}/events?wait=20")
        until_requests_wait(server, "events")
        assert other("DELETE", f"/jobs/{job_id}")[0] == 204
        assert woken_in(waiter, time.monotonic()) < WAKE_S, mode
        assert waiter.result[0] == 404


def test_concurrent_waits_are_not_lost_between_wakes(a_b, db_conn):
    """Jobs created one after another, each as its worker's heartbeat waits again."""
    a, b = a_b
    register(a, "w-seq")
    seen = []
    for _ in range(5):
        beat = Background(a, "POST", "/workers/w-seq/heartbeat?wait=20")
        until_waiting(db_conn, "w-seq")
        job_id = create_job(b, "w-seq")["id"]
        status, body = beat.join()
        assert status == 200
        assert body["scheduled"] == [job_id]
        seen.append(job_id)
        move_to(b, job_id, "RUNNING")
        with db_conn.cursor() as cur:  # the answer cleared its mark: wait for the next
            cur.execute("SELECT waiting_until FROM workers WHERE node_id = 'w-seq'")
            assert cur.fetchone() == (None,)
    assert len(set(seen)) == 5
