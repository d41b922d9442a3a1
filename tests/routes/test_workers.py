"""The workers' routes and leases (docs/API.md, "Workers and leases"): the worker
registry (PUT, GET and DELETE /workers/{node_id}, GET /workers a page at a time),
heartbeats (POST /workers/{node_id}/heartbeat), the expiry of a LOST worker's
jobs. Moving a job to another worker is test_put_status.py's, GET /jobs?node_id=
test_get_jobs.py's, GET /jobs/{job_id}/events/{event_id} test_events.py's;
forgetting workers (WORKER_RETENTION) is test_bounded.py's.

Most tests make a worker LOST at once by pushing its heartbeat an hour into
the past (``lose_worker``) and run the lease chore in process
(``sweep_leases``): nothing waits for a clock. One test keeps a worker alive
across several short lease periods in real time, and one runs the real
service under gunicorn with WORKER_LOST_AFTER_S=4 and checks that a worker
that stops heartbeating has its RUNNING job FAILED within 14 s while traffic
goes on. Races run across two app instances on one database: each job ends in
exactly one status, every status change is a legal move with one event, and
no expiry is applied twice.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import re
import threading
import time

import psycopg2
import pytest

from app import create_app
from dev.gunicorn import serving
from jobs import chores
from jobs.chores import leases
from jobs.store import jobs as job_store
from jobs.store import workers as worker_store

from support.databases import closed_database_url, lose_worker
from support.oracle import LEASE_MOVES, LEGAL_MOVES, history_problems
from support.races import race, wait_until_blocked
from support.service import (
    assert_error,
    create_job,
    events_of,
    flask_caller,
    job_in,
    make_app,
    metric_samples,
    metric_value,
    move_to,
    register_worker,
    status_of,
    sweep_leases,
)

ADMIN = "workers-admin-token"
WORKER = "workers-worker-token"
TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"
WORKER_FIELDS = {"node_id", "info", "created_at", "registered_at", "heartbeat_at", "status"}
ALL_MOVES = LEGAL_MOVES | LEASE_MOVES | {("SCHEDULED", "SCHEDULED")}


def lost_events(events: list[dict]) -> list[dict]:
    return [e for e in events if (e["detail"] or {}).get("reason") == "worker_lost"]


def parse_time(text: str) -> datetime.datetime:
    moment = datetime.datetime.fromisoformat(text)
    assert moment.tzinfo is not None, text
    return moment


# ---- The registry --------------------------------------------------------------------


def test_register_creates_then_reregisters(client):
    info = {
        "version": "v0.0.22-15-g8b065bde",
        "commit_sha": "8b065bde9c1a2f3e4d5c6b7a8e9f0a1b2c3d4e5f",
        "commit_timestamp": "2025-01-15T14:30:00Z",
        "build_date": "2025-01-15T15:45:30Z",
    }
    first = register_worker(client, "worker-01", {"info": info})
    assert set(first) == WORKER_FIELDS
    assert first["node_id"] == "worker-01"
    assert first["info"] == info
    assert first["status"] == "ALIVE"
    assert first["created_at"] == first["registered_at"] == first["heartbeat_at"]
    for key in ("created_at", "registered_at", "heartbeat_at"):
        assert re.fullmatch(TIMESTAMP, first[key]) and parse_time(first[key])
    assert client.get("/workers/worker-01").get_json() == first

    # Again, without a body: created_at stays, the rest is new, info replaced.
    again = register_worker(client, "worker-01")
    assert again["created_at"] == first["created_at"]
    assert again["registered_at"] > first["registered_at"]
    assert again["heartbeat_at"] == again["registered_at"]
    assert again["info"] == {}
    partial = register_worker(client, "worker-01", {"info": {"version": "2"}})
    assert partial["info"] == {"version": "2"}
    assert register_worker(client, "worker-01", {})["info"] == {}


@pytest.mark.parametrize(
    "body",
    [
        {"info": {"version": 1}},
        {"info": {"version": None}},
        {"info": {"build_date": ["x"]}},
        {"info": {"version": "1", "extra": "x"}},
        {"info": "v1"},
        {"info": None},
        {"info": []},
        {"version": "1"},
        {"info": {}, "node_id": "worker-01"},
        [],
        "info",
        {"info": {"version": "a\u0000b"}},
    ],
)
def test_register_refuses_any_other_body(client, body):
    response = client.put("/workers/worker-01", json=body)
    assert_error(response, 400, "INVALID_PAYLOAD_FORMAT")
    assert_error(client.get("/workers/worker-01"), 404, "WORKER_NOT_FOUND")


def test_register_refuses_malformed_json(client):
    assert_error(client.put("/workers/w", data=b'{"info": '), 400, "INVALID_PAYLOAD_FORMAT")
    assert_error(client.get("/workers/w"), 404, "WORKER_NOT_FOUND")


@pytest.mark.parametrize("body", [b"null", b"{}", b" "])
def test_register_with_a_body_that_says_nothing_is_a_registration_without_info(client, body):
    """null and {} say nothing, on every route: the same as no body."""
    response = client.put("/workers/w", data=body)
    assert response.status_code == 200, response.data
    assert response.get_json()["info"] == {}


BAD_WORKER_IDS = ["1worker", "-w", "_w", "w%20x", "w+x", "w:1", "x" * 129, "%C3%A9t%C3%A9"]


@pytest.mark.parametrize("node_id", BAD_WORKER_IDS)
def test_malformed_worker_ids_are_refused(client, node_id):
    for method, path in [
        ("PUT", f"/workers/{node_id}"),
        ("GET", f"/workers/{node_id}"),
        ("POST", f"/workers/{node_id}/heartbeat"),
    ]:
        assert_error(client.open(path, method=method), 400, "INVALID_WORKER_ID")
    assert client.get("/workers").get_json() == {"workers": [], "next_cursor": None}


def test_the_longest_and_oddest_valid_ids_work(client):
    for node_id in ("x" * 128, "eu1.extractor_3", "W-01", "a"):
        assert register_worker(client, node_id)["node_id"] == node_id
        assert client.post(f"/workers/{node_id}/heartbeat").status_code == 200


def test_unknown_workers_are_not_found(client):
    assert_error(client.get("/workers/ghost"), 404, "WORKER_NOT_FOUND")
    assert_error(client.post("/workers/ghost/heartbeat"), 404, "WORKER_NOT_FOUND")
    # A job's node_id does not register a worker.
    create_job(flask_caller(client.application), "ghost")
    assert_error(client.post("/workers/ghost/heartbeat"), 404, "WORKER_NOT_FOUND")
    assert client.get("/workers").get_json() == {"workers": [], "next_cursor": None}


def test_heartbeat_lists_the_workers_jobs_to_start_and_stop(client):
    register_worker(client, "w1")
    scheduled = [job_in(client, "w1", "SCHEDULED") for _ in range(3)]
    stopping = [job_in(client, "w1", "STOP_REQUESTED") for _ in range(2)]
    for status in ("RUNNING", "STOPPING", "COMPLETED", "FAILED", "STOPPED"):
        job_in(client, "w1", status)
    job_in(client, "w2", "SCHEDULED")
    job_in(client, "w2", "STOP_REQUESTED")
    before = client.get("/workers/w1").get_json()["heartbeat_at"]

    beat = client.post("/workers/w1/heartbeat").get_json()
    # leases (the fencing tokens) are tested in test_attempts.py.
    assert set(beat) == {"node_id", "heartbeat_at", "scheduled", "stop_requested", "leases"}
    assert beat["node_id"] == "w1"
    assert beat["scheduled"] == scheduled
    assert beat["stop_requested"] == stopping
    assert beat["heartbeat_at"] > before
    assert client.get("/workers/w1").get_json()["heartbeat_at"] == beat["heartbeat_at"]
    # A retry moved to w1 is listed too, in id order.
    retried = job_in(client, "w2", "FAILED")
    client.put(f"/jobs/{retried}/status", json={"status": "SCHEDULED", "node_id": "w1"})
    assert client.post("/workers/w1/heartbeat").get_json()["scheduled"] == [*scheduled, retried]


def test_heartbeat_lists_at_most_1000_oldest_first(client, db_conn):
    register_worker(client, "busy")
    with db_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO jobs (node_id, status) SELECT 'busy', s FROM generate_series(1, 1001),"
            " unnest(ARRAY['SCHEDULED', 'STOP_REQUESTED']) s"
        )
        cur.execute("SELECT status, array_agg(id ORDER BY id) FROM jobs GROUP BY status")
        ids = dict(cur.fetchall())
    beat = client.post("/workers/busy/heartbeat").get_json()
    assert beat["scheduled"] == ids["SCHEDULED"][:1000]
    assert beat["stop_requested"] == ids["STOP_REQUESTED"][:1000]


def test_list_workers_most_recently_registered_first(client, database_url):
    for node_id in ("w-a", "w-b", "w-c"):
        register_worker(client, node_id)
    register_worker(client, "w-a")  # re-registered: first again
    client.post("/workers/w-b/heartbeat")  # a heartbeat does not reorder
    listing = client.get("/workers").get_json()
    assert [w["node_id"] for w in listing["workers"]] == ["w-a", "w-c", "w-b"]
    for worker in listing["workers"]:
        assert set(worker) == {"node_id", "heartbeat_at", "status"}
        assert worker["status"] == "ALIVE"
        assert (
            worker["heartbeat_at"]
            == client.get(f"/workers/{worker['node_id']}").get_json()["heartbeat_at"]
        )
    lose_worker(database_url, "w-c")
    statuses = {w["node_id"]: w["status"] for w in client.get("/workers").get_json()["workers"]}
    assert statuses == {"w-a": "ALIVE", "w-b": "ALIVE", "w-c": "LOST"}
    assert client.get("/workers/w-c").get_json()["status"] == "LOST"
    # A heartbeat (or a registration) makes it ALIVE again.
    client.post("/workers/w-c/heartbeat")
    assert client.get("/workers/w-c").get_json()["status"] == "ALIVE"


def test_lost_after_follows_the_setting(app, database_url):
    slow = create_app({"TESTING": True, "DATABASE_URL": database_url, "WORKER_LOST_AFTER_S": 3600})
    quick = create_app({"TESTING": True, "DATABASE_URL": database_url, "WORKER_LOST_AFTER_S": 60})
    try:
        register_worker(slow.test_client(), "w")
        lose_worker(database_url, "w", seconds=120)
        assert slow.test_client().get("/workers/w").get_json()["status"] == "ALIVE"
        assert quick.test_client().get("/workers/w").get_json()["status"] == "LOST"
    finally:
        for a in (slow, quick):
            a.extensions["jobs_db_pool"].drop_idle()


def test_lost_after_is_read_from_the_environment(monkeypatch, database_url):
    monkeypatch.setenv("WORKER_LOST_AFTER_S", "4")
    assert create_app({"DATABASE_URL": database_url}).config["WORKER_LOST_AFTER_S"] == 4
    monkeypatch.delenv("WORKER_LOST_AFTER_S")
    assert create_app({"DATABASE_URL": database_url}).config["WORKER_LOST_AFTER_S"] == 30
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv("WORKER_LOST_AFTER_S", bad)
        with pytest.raises(ValueError):
            create_app({"DATABASE_URL": database_url})


def test_worker_routes_refuse_bodies_and_parameters_they_do_not_take(client):
    register_worker(client, "w")
    assert_error(client.post("/workers/w/heartbeat", json={"x": 1}), 400, "INVALID_PAYLOAD_FORMAT")
    assert client.post("/workers/w/heartbeat", data=b"{}").status_code == 200
    assert_error(client.get("/workers", json={"x": 1}), 400, "INVALID_PAYLOAD_FORMAT")
    for method, path in [
        ("GET", "/workers?status=LOST"),
        ("GET", "/workers/w?x=1"),
        ("PUT", "/workers/w?force=1"),
        ("POST", "/workers/w/heartbeat?x=1"),
    ]:
        assert_error(client.open(path, method=method), 400, "INVALID_QUERY_PARAMETERS")


def test_tokens(app, database_url):
    tokened = create_app(
        {
            "TESTING": True,
            "DATABASE_URL": database_url,
            "ADMIN_TOKEN": ADMIN,
            "WORKER_TOKEN": WORKER,
        }
    )
    client = tokened.test_client()
    worker = {"Authorization": f"Bearer {WORKER}"}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    try:
        calls = [
            ("PUT", "/workers/w"),
            ("POST", "/workers/w/heartbeat"),
            ("GET", "/workers"),
            ("GET", "/workers/w"),
            ("GET", "/jobs/1/events/1"),
        ]
        for method, path in calls:
            assert_error(client.open(path, method=method), 401, "UNAUTHORIZED")
            bad = {"Authorization": "Bearer nope"}
            assert_error(client.open(path, method=method, headers=bad), 401, "UNAUTHORIZED")
        # The worker token may register, heartbeat and read; so may the admin's.
        for headers in (worker, admin):
            for method, path in calls[:4]:
                assert client.open(path, method=method, headers=headers).status_code == 200
    finally:
        tokened.extensions["jobs_db_pool"].drop_idle()


def test_database_errors(client):
    broken = create_app({"TESTING": True, "DATABASE_URL": closed_database_url()}).test_client()
    for method, path, code in [
        ("PUT", "/workers/w", "REGISTER_WORKER_ERROR"),
        ("POST", "/workers/w/heartbeat", "WORKER_HEARTBEAT_ERROR"),
        ("GET", "/workers", "SCHEDULER_LIST_WORKERS_ERROR"),
        ("GET", "/workers/w", "SCHEDULER_GET_WORKER_ERROR"),
        ("GET", "/jobs/1/events/1", "GET_JOB_EVENT_ERROR"),
        ("GET", "/jobs?node_id=w", "LIST_JOBS_ERROR"),
    ]:
        message = assert_error(broken.open(path, method=method), 500, code)
        assert message == "database error; the request was not completed"
    # Invalid input is still refused before the database.
    assert_error(broken.get("/workers/1w"), 400, "INVALID_WORKER_ID")
    assert_error(broken.put("/workers/w", json={"info": 1}), 400, "INVALID_PAYLOAD_FORMAT")
    # /metrics answers without the worker gauge.
    response = broken.get("/metrics")
    assert response.status_code == 200
    assert "jobs_workers{" not in response.get_data(as_text=True)


def test_answers_parse_with_the_python_clients_worker_models(client):
    """amp-python's admin models (src/amp/admin/models.py): WorkersResponse holds
    WorkerInfo {node_id, heartbeat_at: aware datetime}; WorkerDetailResponse has
    node_id, created_at, registered_at, heartbeat_at (aware datetimes) and info
    (WorkerMetadata: version, commit_sha, commit_timestamp, build_date, all
    required, the last two aware datetimes). Written out here, not imported."""
    register_worker(
        client,
        "amp_worker.prod",
        {
            "info": {
                "version": "v0.0.22",
                "commit_sha": "8b065bde9c1a2f3e4d5c6b7a8e9f0a1b2c3d4e5f",
                "commit_timestamp": "2025-01-15T09:30:00-05:00",
                "build_date": "2025-01-15T15:45:30Z",
            }
        },
    )
    (summary,) = client.get("/workers").get_json()["workers"]
    assert isinstance(summary["node_id"], str)
    parse_time(summary["heartbeat_at"])
    detail = client.get("/workers/amp_worker.prod").get_json()
    for key in ("created_at", "registered_at", "heartbeat_at"):
        parse_time(detail[key])
    assert {"version", "commit_sha", "commit_timestamp", "build_date"} <= set(detail["info"])
    parse_time(detail["info"]["commit_timestamp"])
    parse_time(detail["info"]["build_date"])


# ---- DELETE /workers/{node_id} -----------------------------------------------------------


def test_deregistering_a_worker_forgets_it_and_releases_its_jobs_from_the_lease(
    app, client, database_url
):
    call = flask_caller(app)
    for node in ("gone", "kept"):
        register_worker(client, node)
    running = {}
    for node in ("gone", "kept"):
        running[node] = create_job(call, node)["id"]
        move_to(call, running[node], "RUNNING")
    scheduled = create_job(call, "gone")["id"]

    assert client.delete("/workers/gone").status_code == 204
    assert client.delete("/workers/gone").status_code == 204  # absent: the same answer
    assert client.delete("/workers/never-was").status_code == 204
    assert_error(client.get("/workers/gone"), 404, "WORKER_NOT_FOUND")
    assert_error(client.post("/workers/gone/heartbeat"), 404, "WORKER_NOT_FOUND")
    listed = [w["node_id"] for w in client.get("/workers").get_json()["workers"]]
    assert listed == ["kept"]
    # Its jobs stay as they were, and no lease expiry touches them; a registered
    # lost worker's job, in the same sweep, does expire.
    lose_worker(database_url, "kept")
    assert sweep_leases(app) == {"FAILED": 1}
    assert status_of(client, running["gone"]) == "RUNNING"
    assert status_of(client, scheduled) == "SCHEDULED"
    assert status_of(client, running["kept"]) == "FAILED"
    # It may register again, as a fresh worker.
    register_worker(client, "gone")
    assert client.get("/workers/gone").get_json()["status"] == "ALIVE"
    assert_error(client.delete("/workers/1bad"), 400, "INVALID_WORKER_ID")
    assert_error(client.delete("/workers/gone", json={"x": 1}), 400, "INVALID_PAYLOAD_FORMAT")
    assert client.get("/workers/gone").status_code == 200


def test_deregistering_needs_the_admin_token(app, database_url):
    tokened = make_app(database_url, ADMIN_TOKEN="adm-bounded", WORKER_TOKEN="wrk-bounded")
    try:
        c = tokened.test_client()
        worker = {"Authorization": "Bearer wrk-bounded"}
        assert c.put("/workers/w1", headers=worker).status_code == 200
        assert_error(c.delete("/workers/w1", headers=worker), 403, "FORBIDDEN")
        assert_error(c.delete("/workers/w1"), 401, "UNAUTHORIZED")
        assert c.get("/workers/w1", headers=worker).status_code == 200
        admin = {"Authorization": "Bearer adm-bounded"}
        assert c.delete("/workers/w1", headers=admin).status_code == 204
        assert c.get("/workers/w1", headers=admin).status_code == 404
    finally:
        tokened.extensions["jobs_db_pool"].drop_idle()


# ---- GET /workers, a page at a time ------------------------------------------------------


def insert_workers(db_conn, count: int) -> list[str]:
    """``count`` workers, registered in groups of 7 at the same microsecond (ties)."""
    with db_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO workers (node_id, created_at, registered_at, heartbeat_at)"
            " SELECT 'w-' || lpad(g::text, 5, '0'), t, t, t FROM generate_series(1, %s) g,"
            " LATERAL (SELECT timestamptz '2026-01-01' + (g / 7) * interval '1 ms') x(t)",
            (count,),
        )
        cur.execute("SELECT node_id FROM workers ORDER BY registered_at DESC, node_id DESC")
        return [row[0] for row in cur.fetchall()]


def list_all_workers(client, limit: int | None = None) -> list[list[str]]:
    pages, query = [], "" if limit is None else f"limit={limit}"
    path = f"/workers?{query}"
    for _ in range(1000):
        body = client.get(path).get_json()
        pages.append([w["node_id"] for w in body["workers"]])
        if body["next_cursor"] is None:
            return pages
        path = f"/workers?{query}&cursor={body['next_cursor']}"
    raise AssertionError("paging did not end")


def test_paging_through_2500_workers_shows_each_once_in_order(client, db_conn):
    expected = insert_workers(db_conn, 2500)
    pages = list_all_workers(client)  # the default page of 100
    assert [len(p) for p in pages] == [100] * 25
    assert [w for page in pages for w in page] == expected
    pages = list_all_workers(client, limit=1000)
    assert [len(p) for p in pages] == [1000, 1000, 500]
    assert [w for page in pages for w in page] == expected
    assert list_all_workers(client, limit=7)[-1] == expected[-(2500 % 7) :]
    # Registrations while paging neither repeat nor shift anyone.
    first = client.get("/workers?limit=500").get_json()
    for node in ("late-1", "late-2"):
        register_worker(client, node)
    register_worker(client, expected[10])  # seen already: moves to the front, not shown again
    rest = []
    cursor = first["next_cursor"]
    while cursor:
        body = client.get(f"/workers?limit=500&cursor={cursor}").get_json()
        rest += [w["node_id"] for w in body["workers"]]
        cursor = body["next_cursor"]
    assert [w["node_id"] for w in first["workers"]] + rest == expected


def forged(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("limit=0", "LIMIT_INVALID"),
        ("limit=1001", "LIMIT_TOO_LARGE"),
        ("limit=x", "INVALID_QUERY_PARAMETERS"),
        ("cursor=", "INVALID_QUERY_PARAMETERS"),
        ("cursor=nope", "INVALID_QUERY_PARAMETERS"),
        ("cursor=" + forged("2026-13-45T10:00:00.000000Z w-1"), "INVALID_QUERY_PARAMETERS"),
        ("cursor=" + forged("2026-01-01T10:00:00.000000Z 1bad"), "INVALID_QUERY_PARAMETERS"),
        ("cursor=" + forged("2026-01-01T10:00:00Z w-1"), "INVALID_QUERY_PARAMETERS"),
        ("cursor=" + forged("٢٠٢٦-01-01T10:00:00.000000Z w-1"), "INVALID_QUERY_PARAMETERS"),
        ("cursor=" + "A" * 3000, "INVALID_QUERY_PARAMETERS"),
        ("limit=5&limit=6", "INVALID_QUERY_PARAMETERS"),
        ("after=x", "INVALID_QUERY_PARAMETERS"),
    ],
)
def test_bad_worker_paging_is_refused(client, query, code):
    message = assert_error(client.get(f"/workers?{query}"), 400, code)
    assert ("limit" in message) or ("cursor" in message) or ("after" in message), message


# ---- Leases --------------------------------------------------------------------------------


def test_a_lost_workers_active_jobs_expire(client, database_url):
    register_worker(client, "dying")
    jobs = {s: job_in(client, "dying", s) for s in ("SCHEDULED", "RUNNING", "STOP_REQUESTED")}
    jobs["STOPPING"] = job_in(client, "dying", "STOPPING")
    done = {s: job_in(client, "dying", s) for s in ("COMPLETED", "FAILED", "STOPPED")}
    # Nothing happens while it is alive.
    assert sweep_leases(client.application) == {}
    lose_worker(database_url, "dying")
    last_heartbeat = client.get("/workers/dying").get_json()["heartbeat_at"]

    assert sweep_leases(client.application) == {"FAILED": 1, "STOPPED": 2}
    expected = {
        "SCHEDULED": "SCHEDULED",
        "RUNNING": "FAILED",
        "STOP_REQUESTED": "STOPPED",
        "STOPPING": "STOPPED",
    }
    call = flask_caller(client.application)
    for before, job_id in jobs.items():
        job = client.get(f"/jobs/{job_id}").get_json()
        assert job["status"] == expected[before], before
        events = events_of(call, job_id)
        assert history_problems(job_id, job["status"], events, ALL_MOVES) == []
        if before == "SCHEDULED":
            assert lost_events(events) == []
            continue
        assert lost_events(events) == [events[-1]]
        assert events[-1]["event_type"] == expected[before]
        assert events[-1]["node_id"] == "dying"
        assert events[-1]["detail"] == {"reason": "worker_lost", "heartbeat_at": last_heartbeat}
        assert events[-1]["created_at"] == job["updated_at"]
    for status, job_id in done.items():
        assert status_of(client, job_id) == status
        assert lost_events(events_of(call, job_id)) == []
    # Expired once: the next sweeps find nothing.
    assert sweep_leases(client.application) == {}
    assert sweep_leases(client.application) == {}
    # The SCHEDULED job is still listed by the heartbeat of the worker's return.
    beat = client.post("/workers/dying/heartbeat").get_json()
    assert beat["scheduled"] == [jobs["SCHEDULED"]]
    assert beat["stop_requested"] == []


@pytest.mark.parametrize(
    ("status", "report"),
    [
        ("RUNNING", "COMPLETED"),
        ("RUNNING", "FAILED"),
        ("STOP_REQUESTED", "STOPPING"),
        ("STOPPING", "STOPPED"),
        ("STOPPING", "FAILED"),
    ],
)
def test_a_late_report_from_an_expired_worker_is_refused(client, database_url, status, report):
    register_worker(client, "late")
    job_id = job_in(client, "late", status)
    lose_worker(database_url, "late")
    assert sum(sweep_leases(client.application).values()) == 1
    after = client.get(f"/jobs/{job_id}").get_json()
    response = client.put(f"/jobs/{job_id}/status", json={"status": report})
    if report == after["status"]:
        # Reporting the status it has is the usual no-op.
        assert response.status_code == 200
    else:
        assert after["status"] in assert_error(response, 409, "INVALID_STATE_TRANSITION")
    assert client.get(f"/jobs/{job_id}").get_json() == after


def test_jobs_of_a_node_that_never_registered_are_never_touched(client, database_url, db_conn):
    register_worker(client, "registered")
    ghost = {s: job_in(client, "ghost", s) for s in ("RUNNING", "STOP_REQUESTED", "STOPPING")}
    with db_conn.cursor() as cur:  # long untouched
        cur.execute("UPDATE jobs SET updated_at = now() - interval '30 days'")
    lose_worker(database_url, "registered")
    assert sweep_leases(client.application) == {}
    for status, job_id in ghost.items():
        assert status_of(client, job_id) == status


def test_a_job_moved_off_the_lost_worker_stays(client, database_url):
    register_worker(client, "dying")
    job_id = job_in(client, "dying", "FAILED")
    client.put(f"/jobs/{job_id}/status", json={"status": "SCHEDULED", "node_id": "healthy"})
    client.put(f"/jobs/{job_id}/status", json={"status": "RUNNING"})
    lose_worker(database_url, "dying")
    assert sweep_leases(client.application) == {}
    assert status_of(client, job_id) == "RUNNING"


def test_one_sweep_is_bounded_and_the_next_takes_the_rest(client, database_url, db_conn):
    register_worker(client, "big")
    with db_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO jobs (node_id, status)"
            " SELECT 'big', 'RUNNING' FROM generate_series(1, 700)"
        )
    lose_worker(database_url, "big")
    assert sweep_leases(client.application) == {"FAILED": 500}
    assert sweep_leases(client.application) == {"FAILED": 200}
    assert sweep_leases(client.application) == {}
    with db_conn.cursor() as cur:
        cur.execute(
            "SELECT count(*), count(DISTINCT job_id) FROM job_events"
            " WHERE detail->>'reason' = 'worker_lost'"
        )
        assert cur.fetchone() == (700, 700)


@pytest.mark.alone  # a 1.5 s lease kept by heartbeats every 0.1 s
def test_a_heartbeating_worker_keeps_its_jobs_across_several_lease_periods(app, database_url):
    """Real time: a lease of 1.5 s, heartbeats every 0.1 s and a sweep every 0.1 s for
    5 s (over three lease periods). The worker that stopped heartbeating loses its job."""
    lease = 1.5
    short = create_app(
        {"TESTING": True, "DATABASE_URL": database_url, "WORKER_LOST_AFTER_S": lease}
    )
    client = short.test_client()
    try:
        register_worker(client, "steady")
        register_worker(client, "silent")
        steady = [job_in(client, "steady", s) for s in ("RUNNING", "STOP_REQUESTED", "STOPPING")]
        silent = job_in(client, "silent", "RUNNING")
        started = time.monotonic()
        while time.monotonic() - started < 5:
            assert client.post("/workers/steady/heartbeat").status_code == 200
            sweep_leases(short)
            time.sleep(0.1)
        assert [status_of(client, j) for j in steady] == ["RUNNING", "STOP_REQUESTED", "STOPPING"]
        assert client.get("/workers/steady").get_json()["status"] == "ALIVE"
        assert status_of(client, silent) == "FAILED"
        assert client.get("/workers/silent").get_json()["status"] == "LOST"
    finally:
        short.extensions["jobs_db_pool"].drop_idle()


def test_the_chore_runs_once_per_interval_whoever_claims_it(app, database_url, db_conn):
    assert leases.sweep_interval({"WORKER_LOST_AFTER_S": 30}) == 5
    assert leases.sweep_interval({"WORKER_LOST_AFTER_S": 4}) == 2
    client = app.test_client()
    register_worker(client, "dying")
    job_id = job_in(client, "dying", "RUNNING")
    lose_worker(database_url, "dying")
    with db_conn.cursor() as cur:
        cur.execute("DELETE FROM service_chores WHERE name = 'lease_expiry'")
    other = create_app({"TESTING": True, "DATABASE_URL": database_url})
    try:
        with app.app_context():
            assert chores.of(app).run_claimed(chores.of(app).named("lease_expiry")) is True
        # Claimed a moment ago: the other instance does not run it again.
        with other.app_context():
            assert chores.of(other).run_claimed(chores.of(other).named("lease_expiry")) is False
    finally:
        other.extensions.get("jobs_db_pool") and other.extensions["jobs_db_pool"].drop_idle()
    assert status_of(client, job_id) == "FAILED"


def test_metrics(client, database_url):
    def expired(samples, status):
        return metric_value(samples, "jobs_leases_expired_total", status=status)

    before = metric_samples(client)
    for node_id in ("a", "b", "c"):
        register_worker(client, node_id)
    job_in(client, "c", "RUNNING")
    job_in(client, "c", "STOPPING")
    lose_worker(database_url, "c")
    sweep_leases(client.application)
    # Each app counts workers at most every WorkerCounter.TTL_S (an open
    # route must not open a connection per scrape): let this scrape count anew.
    client.application.extensions["jobs_worker_counter"].expires = 0.0
    after = metric_samples(client)
    assert metric_value(after, "jobs_workers", status="ALIVE") == 2
    assert metric_value(after, "jobs_workers", status="LOST") == 1
    assert expired(after, "FAILED") - expired(before, "FAILED") == 1
    assert expired(after, "STOPPED") - expired(before, "STOPPED") == 1


# ---- The guard, one interleaving at a time ------------------------------------------------
# A transaction held open from outside stands for a request caught mid-way;
# the sweep runs in a thread, waits on its lock, and must recheck what it
# finds once the lock is released.


def sweep_behind(app, database_url: str, write) -> dict[str, int]:
    """The lease sweep, run in a thread while ``write(cur)`` holds its rows uncommitted
    on a connection of its own, which commits once the sweep waits on its lock: the
    jobs the sweep moved."""
    result: dict = {}

    def run():
        result["moved"] = sweep_leases(app)

    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            write(cur)  # not committed yet
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        wait_until_blocked(database_url)
        conn.commit()
        thread.join(10)
    finally:
        conn.close()
    return result["moved"]


def test_a_heartbeat_committed_while_the_sweep_waits_keeps_the_jobs(client, database_url):
    register_worker(client, "w")
    job_id = job_in(client, "w", "RUNNING")
    lose_worker(database_url, "w")
    moved = sweep_behind(
        client.application, database_url, lambda cur: worker_store.heartbeat(cur, "w")
    )
    assert moved == {}
    assert status_of(client, job_id) == "RUNNING"


def test_a_heartbeat_waits_for_a_sweep_that_took_the_worker(client, database_url):
    register_worker(client, "w")
    job_id = job_in(client, "w", "RUNNING")
    lose_worker(database_url, "w")
    conn = psycopg2.connect(database_url)
    answer: dict = {}
    try:
        with conn.cursor() as cur:
            moved = worker_store.expire_leases(cur, 30, 500)  # not committed yet
        assert moved == {"FAILED": 1}

        def beat():
            answer["it"] = client.application.test_client().post("/workers/w/heartbeat")

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        wait_until_blocked(database_url)
        conn.commit()
        thread.join(10)
    finally:
        conn.close()
    assert answer["it"].status_code == 200
    assert status_of(client, job_id) == "FAILED"
    assert client.get("/workers/w").get_json()["status"] == "ALIVE"


@pytest.mark.parametrize(
    ("status", "report", "final"),
    [
        ("RUNNING", "COMPLETED", "COMPLETED"),
        ("STOP_REQUESTED", "STOPPING", "STOPPING"),
        ("STOPPING", "STOPPED", "STOPPED"),
    ],
)
def test_a_report_committed_while_the_sweep_waits_wins(client, database_url, status, report, final):
    register_worker(client, "w")
    job_id = job_in(client, "w", status)
    lose_worker(database_url, "w")
    def reported(cur):  # the report, caught before its commit
        assert isinstance(job_store.change_status(cur, job_id, report), job_store.Moved)

    moved = sweep_behind(client.application, database_url, reported)
    call = flask_caller(client.application)
    events = events_of(call, job_id)
    if final in ("STOPPING",):
        # STOPPING is still leased, but not the status the sweep saw: the
        # sweep leaves it (it guards on what it read: node, status, attempt),
        # and the next sweep expires it.
        assert moved == {}
        assert status_of(client, job_id) == "STOPPING"
        assert sweep_leases(client.application) == {"STOPPED": 1}
        assert status_of(client, job_id) == "STOPPED"
        events = events_of(call, job_id)
    else:
        assert moved == {}
        assert status_of(client, job_id) == final
    assert history_problems(job_id, status_of(client, job_id), events, ALL_MOVES) == []


# ---- Races across two instances -----------------------------------------------------------


@pytest.fixture
def two_apps(apps):
    """Two instances on one (emptied) database, each with a pool for every racing thread;
    conftest's ``audit`` records every status change (jobs created too)."""
    return [apps(DB_POOL_SIZE=40) for _ in range(2)]


def alternating(apps):
    counter = iter(range(10**9))
    return lambda: flask_caller(apps[next(counter) % 2])


def sweeper(app, delay: float = 0.0):
    """A task running one sweep on ``app``, ``delay`` seconds after the start (so that
    some racing requests come first and others after)."""

    def task(call, barrier):
        time.sleep(delay)
        return "sweep", sweep_leases(app)

    return task


def test_expiry_races_completed_reports(two_apps, database_url, audit):
    a, b = two_apps
    client = a.test_client()
    register_worker(client, "racer")
    jobs = [job_in(client, "racer", "RUNNING") for _ in range(30)]
    lose_worker(database_url, "racer")
    tasks = [sweeper(a, 0.01), sweeper(b, 0.02)]
    for job_id in jobs:
        tasks.append(
            lambda call, barrier, j=job_id: (
                j,
                *call("PUT", f"/jobs/{j}/status", {"status": "COMPLETED"}),
            )
        )
    results = race(alternating(two_apps), tasks)
    call = flask_caller(a)
    assert audit.problems(call, LEGAL_MOVES | LEASE_MOVES) == []
    sweeps, reports = results[:2], results[2:]
    expired = sum(moved.get("FAILED", 0) for _, moved in sweeps)
    failed = 0
    for job_id, code, body in reports:
        status = status_of(client, job_id)
        events = events_of(call, job_id)
        assert [e["event_type"] for e in events] == ["SCHEDULED", "RUNNING", status]
        if status == "COMPLETED":
            assert code == 200 and lost_events(events) == []
        else:
            failed += 1
            assert status == "FAILED"
            assert (code, body["error_code"]) == (409, "INVALID_STATE_TRANSITION")
            assert lost_events(events) == [events[-1]]
    assert expired == failed  # no expiry applied twice, none lost


def test_expiry_races_heartbeats(two_apps, database_url):
    a, b = two_apps
    client = a.test_client()
    outcomes = []
    for round_no in range(15):
        node_id = f"hb-{round_no}"
        register_worker(client, node_id)
        job_id = job_in(client, node_id, "RUNNING")
        lose_worker(database_url, node_id)
        results = race(
            alternating(two_apps),
            [
                sweeper(a),
                sweeper(b),
                lambda call, barrier, n=node_id: call("POST", f"/workers/{n}/heartbeat"),
            ],
        )
        (_, one), (_, two), (code, _) = results
        assert code == 200
        status = status_of(client, job_id)
        events = events_of(flask_caller(a), job_id)
        moved = one.get("FAILED", 0) + two.get("FAILED", 0)
        if status == "FAILED":
            assert moved == 1 and len(lost_events(events)) == 1
        else:
            assert status == "RUNNING" and moved == 0 and len(events) == 2
        assert client.get(f"/workers/{node_id}").get_json()["status"] == "ALIVE"
        outcomes.append(status)
    # Which side won varies; every round ended in one of the two legal outcomes.
    assert set(outcomes) <= {"FAILED", "RUNNING"}


def test_expiry_races_stops_reports_and_deletes(two_apps, database_url, audit):
    """Jobs of a lost worker in every active status; at once: two sweeps (one per
    instance), a stop, a report and a delete of every job. Each job ends in one
    status, by legal moves only, with one event per change; no expiry twice."""
    a, b = two_apps
    client = a.test_client()
    register_worker(client, "chaos")
    plan = []
    for status in ("SCHEDULED", "RUNNING", "STOP_REQUESTED", "STOPPING") * 6:
        plan.append(job_in(client, "chaos", status))
    lose_worker(database_url, "chaos")
    reports = {0: "COMPLETED", 1: "STOPPING", 2: "STOPPED", 3: "FAILED"}
    tasks = [sweeper(a), sweeper(b)]
    for i, job_id in enumerate(plan):
        tasks.append(lambda call, barrier, j=job_id: ("stop", *call("PUT", f"/jobs/{j}/stop")))
        tasks.append(
            lambda call, barrier, j=job_id, r=reports[i % 4]: (
                "report",
                *call("PUT", f"/jobs/{j}/status", {"status": r}),
            )
        )
        tasks.append(lambda call, barrier, j=job_id: ("delete", *call("DELETE", f"/jobs/{j}")))
    results = race(alternating(two_apps), tasks)
    # What a sweep left STOP_REQUESTED (a stop after its snapshot) the next one takes.
    late = sweep_leases(a)
    call = flask_caller(a)
    assert audit.problems(call, LEGAL_MOVES | LEASE_MOVES) == []
    history = audit.history()
    for _, code, body in results[2:]:
        assert code in (200, 204, 404, 409), body  # 404: a report after the delete
    expired = sum(sum(moved.values()) for _, moved in results[:2]) + sum(late.values())
    lost_total = 0
    for job_id in plan:
        response = client.get(f"/jobs/{job_id}")
        if response.status_code == 404:
            assert history[job_id][-1][0] == "DELETE"
            continue
        job = response.get_json()
        events = events_of(call, job_id)
        assert history_problems(job_id, job["status"], events, ALL_MOVES) == []
        assert len(lost_events(events)) <= 1
        lost_total += len(lost_events(events))
        assert job["status"] not in ("RUNNING", "STOP_REQUESTED", "STOPPING"), job
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM job_events WHERE detail->>'reason' = 'worker_lost'")
        assert cur.fetchone()[0] == lost_total
    # Deleted jobs took their events with them.
    assert lost_total <= expired
    moved_by_lease = sum(
        1
        for rows in history.values()
        for op, old, new in rows
        if op == "UPDATE" and (old, new) in LEASE_MOVES
    )
    # No report in this plan makes a lease move, so every one is a sweep's.
    assert moved_by_lease == expired


# ---- The real service ---------------------------------------------------------------------


def test_under_gunicorn_a_silent_workers_job_fails_within_14_s(app, database_url):
    with serving(database_url, env={"WORKER_LOST_AFTER_S": "4"}) as server:
        call = server.caller()
        assert call("PUT", "/workers/silent")[0] == 200
        assert call("PUT", "/workers/steady")[0] == 200
        last_heartbeat = time.monotonic()
        silent = create_job(call, "silent")["id"]
        steady = create_job(call, "steady")["id"]
        for job_id in (silent, steady):
            assert call("PUT", f"/jobs/{job_id}/status", {"status": "RUNNING"})[0] == 200
        status = "RUNNING"
        while time.monotonic() - last_heartbeat < 14:
            # Traffic goes on: the other worker's heartbeats and a reader.
            assert call("POST", "/workers/steady/heartbeat")[0] == 200
            status = call("GET", f"/jobs/{silent}")[1]["status"]
            if status == "FAILED":
                break
            time.sleep(0.5)
        assert status == "FAILED", f"still {status} after 14 s"
        code, events = call("GET", f"/jobs/{silent}/events")
        assert events["events"][-1]["detail"]["reason"] == "worker_lost"
        assert call("GET", f"/jobs/{steady}")[1]["status"] == "RUNNING"
        workers = {w["node_id"]: w["status"] for w in call("GET", "/workers")[1]["workers"]}
        assert workers == {"silent": "LOST", "steady": "ALIVE"}
        code, late = call("PUT", f"/jobs/{silent}/status", {"status": "COMPLETED"})
        assert (code, late["error_code"]) == (409, "INVALID_STATE_TRANSITION")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        assert 'jobs_leases_expired_total{status="FAILED"} 1.0' in text
        assert 'jobs_workers{status="LOST"} 1.0' in text


def test_info_fields_are_bounded(client):
    """A build describes itself in far less than a megabyte: 256 characters a field."""
    assert client.put("/workers/w", json={"info": {"version": "v" * 256}}).status_code == 200
    response = client.put("/workers/w", json={"info": {"commit_sha": "c" * 257}})
    assert response.status_code == 400
    assert response.get_json()["error_code"] == "INVALID_PAYLOAD_FORMAT"
    assert "info.commit_sha" in response.get_json()["error_message"]
    assert client.get("/workers/w").get_json()["info"] == {"version": "v" * 256}
