"""The Jobs API through the Flask test client: every route's success shapes,
status codes and error codes of docs/API.md (Conventions to Events).

Expected values come from docs/API.md, written out by hand (the filter tokens
here, the transition table in support/oracle.py), never from the service's own
constants, so a wrong constant in schemas.py fails these tests instead of
being copied by them.
Every successful body is also checked against the marshmallow schema that
documents it (schemas.py).
"""

from __future__ import annotations

import random
import re
from itertools import product

import pytest

from support.checked import (
    EVENT_LIST_SCHEMA,
    JOB_KEYS,
    PATHS,
    PROGRESS_SCHEMA,
    TS,
    all_jobs,
    body_of,
    check_job,
    create,
    drive,
    event_types,
    events,
    get_job,
    list_jobs,
    make_job,
    names,
    parse_ts,
    progress,
    report,
    stop,
)
from support.databases import count_job_rows
from support.oracle import ACTIVE, REPORTABLE, STATUSES, STOPPABLE, TERMINAL, WORKER_MOVES
from support.service import MAX_ID, assert_error, block_hash, file_entry, register_files

# ---- POST /jobs -------------------------------------------------------


def test_create_job_201_with_location_and_the_job(client):
    descriptor = {"dataset": "eth/mainnet", "table": "blocks", "end_block": 21500000}
    response = client.post("/jobs", json={"node_id": "worker-01", "descriptor": descriptor})
    assert response.status_code == 201
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    job = check_job(body_of(response))
    assert response.headers["Location"] == f"/jobs/{job['id']}"
    assert job["status"] == "SCHEDULED"
    assert job["node_id"] == "worker-01"
    assert job["descriptor"] == descriptor
    assert get_job(client, job["id"]) == job
    assert [e["event_type"] for e in events(client, job["id"])] == ["SCHEDULED"]


def test_created_jobs_get_increasing_ids(client):
    ids = [create(client)["id"] for _ in range(5)]
    assert ids == sorted(set(ids))
    assert all(1 <= i <= MAX_ID for i in ids)


@pytest.mark.parametrize(
    "descriptor",
    [
        {},
        {"nested": {"deep": [1, 2, {"x": None}]}, "flag": True, "ratio": 0.25},
        {"unicode": "блоки ✓ 日本", "emoji": "🦀", "quote": 'a"b\\c'},
        {"big": MAX_ID, "negative": -(2**63), "zero": 0, "list": []},
        # Beyond 64 bits: exact, not turned into a float on the way.
        {"huge": 123456789012345678901234567890, "tiny": -(10**25), "id": "1" * 30},
    ],
)
def test_descriptor_is_any_json_object_and_round_trips(client, descriptor):
    job = create(client, descriptor=descriptor)
    assert job["descriptor"] == descriptor
    assert get_job(client, job["id"])["descriptor"] == descriptor
    assert list_jobs(client)["jobs"][0]["descriptor"] == descriptor


@pytest.mark.parametrize("node_id", ["a", "A", "worker-01", "w.1_x-Y", "n" + "x" * 127])
def test_node_id_accepted(client, node_id):
    assert create(client, node_id=node_id)["node_id"] == node_id


def test_idempotency_key_returns_the_same_job_with_200(client):
    first = create(client, idempotency_key="deploy-2026-11-28")
    again = client.post(
        "/jobs",
        json={
            "node_id": "other-node",
            "descriptor": {"x": 2},
            "idempotency_key": "deploy-2026-11-28",
        },
    )
    assert again.status_code == 200, again.data
    assert check_job(body_of(again)) == first
    third = client.post(
        "/jobs",
        json={
            "node_id": "worker-01",
            "descriptor": {"table": "blocks"},
            "idempotency_key": "deploy-2026-11-28",
        },
    )
    assert third.status_code == 200
    assert body_of(third) == first
    assert [j["id"] for j in all_jobs(client)] == [first["id"]]
    assert event_types(client, first["id"]) == ["SCHEDULED"]


def test_idempotency_key_finds_the_job_whatever_its_status(client):
    job = make_job(client, "FAILED")
    created = create(client, idempotency_key="k")  # a fresh key: a new job
    assert created["id"] != job["id"]
    report(client, created["id"], "RUNNING")
    again = client.post("/jobs", json={"node_id": "w", "idempotency_key": "k"})
    assert again.status_code == 200
    assert body_of(again) == get_job(client, created["id"])
    assert body_of(again)["status"] == "RUNNING"


def test_different_idempotency_keys_or_none_make_different_jobs(client):
    a = create(client, idempotency_key="a")
    b = create(client, idempotency_key="b")
    c = create(client)
    d = create(client)
    e = create(client, idempotency_key=None)
    f = create(client, idempotency_key="k" * 256)
    ids = [x["id"] for x in (a, b, c, d, e, f)]
    assert len(set(ids)) == 6
    assert sorted(j["id"] for j in all_jobs(client)) == sorted(ids)


# ---- GET /jobs/{id} ----------------------------------------------------------


def test_get_job_shape_and_values(client):
    job = create(client, node_id="worker-07", descriptor={"table": "logs"})
    got = client.get(f"/jobs/{job['id']}")
    assert got.status_code == 200
    assert got.headers["Content-Type"].split(";")[0] == "application/json"
    body = body_of(got)
    assert set(body) == JOB_KEYS
    assert body == job
    assert body["node_id"] == "worker-07"
    assert body["descriptor"] == {"table": "logs"}
    assert TS.match(body["created_at"]) and TS.match(body["updated_at"])


def test_get_unknown_job_is_404(client):
    create(client)
    assert_error(client.get("/jobs/2"), 404, "JOB_NOT_FOUND")
    assert_error(client.get(f"/jobs/{MAX_ID}"), 404, "JOB_NOT_FOUND")


def test_updated_at_changes_on_every_status_change_and_only_then(client):
    job = create(client)
    created_at = job["created_at"]
    last = job["updated_at"]

    def changed(after: dict) -> None:
        nonlocal last
        assert after["created_at"] == created_at
        assert parse_ts(after["updated_at"]) > parse_ts(last), (last, after["updated_at"])
        last = after["updated_at"]
        assert get_job(client, job["id"])["updated_at"] == last

    def unchanged() -> None:
        now = get_job(client, job["id"])
        assert now["updated_at"] == last
        assert now["created_at"] == created_at

    report(client, job["id"], "SCHEDULED")  # no-op
    unchanged()
    changed(report(client, job["id"], "RUNNING"))
    report(client, job["id"], "RUNNING")  # no-op
    unchanged()
    register_files(client, job["id"], "blocks", file_entry("f0", 0, 9))
    unchanged()
    report(client, job["id"], "STOPPED", expect=409)
    unchanged()
    report(client, job["id"], "RUNNING", node_id="x", expect=409)  # another worker: stale
    unchanged()
    changed(stop(client, job["id"]))
    stop(client, job["id"], "POST")  # no-op
    unchanged()
    changed(report(client, job["id"], "STOPPING"))
    changed(report(client, job["id"], "FAILED"))
    client.get(f"/jobs/{job['id']}/events")
    client.get(f"/jobs/{job['id']}/progress")
    list_jobs(client, status="all")
    unchanged()
    changed(report(client, job["id"], "SCHEDULED", node_id="worker-02"))
    changed(report(client, job["id"], "RUNNING"))
    changed(report(client, job["id"], "COMPLETED"))
    stop(client, job["id"])
    unchanged()


# ---- GET /jobs: order, filters, cursor ---------------------------------------


def test_list_empty(client):
    assert list_jobs(client) == {"jobs": [], "next_cursor": None}
    assert list_jobs(client, status="all") == {"jobs": [], "next_cursor": None}
    response = client.get("/jobs")
    assert response.headers["Content-Type"].split(";")[0] == "application/json"


def test_list_newest_first_and_default_filter_is_active(client):
    jobs = {s: make_job(client, s) for s in STATUSES}
    jobs["SCHEDULED2"] = create(client)
    body = list_jobs(client)
    expected = sorted(
        (j for j in jobs.values() if j["status"] in ACTIVE), key=lambda j: j["id"], reverse=True
    )
    assert body["jobs"] == [get_job(client, j["id"]) for j in expected]
    assert body["next_cursor"] is None
    assert list_jobs(client, status="active") == body
    assert list_jobs(client, limit=50) == body


# token -> statuses, from docs/API.md, GET /jobs.
FILTERS = [
    ("scheduled", {"SCHEDULED"}),
    ("RUNNING", {"RUNNING"}),
    ("Stop_Requested", {"STOP_REQUESTED"}),
    ("stop_requested", {"STOP_REQUESTED"}),
    ("stopping", {"STOPPING"}),
    ("completed", {"COMPLETED"}),
    ("STOPPED", {"STOPPED"}),
    ("failed", {"FAILED"}),
    ("error", {"FAILED"}),
    ("ERROR", {"FAILED"}),
    ("active", set(ACTIVE)),
    ("ACTIVE", set(ACTIVE)),
    ("terminal", set(TERMINAL)),
    ("Terminal", set(TERMINAL)),
    ("all", set(STATUSES)),
    ("ALL", set(STATUSES)),
    ("running,completed", {"RUNNING", "COMPLETED"}),
    (" running , FAILED ", {"RUNNING", "FAILED"}),
    ("error,failed", {"FAILED"}),
    ("active,terminal", set(STATUSES)),
    ("active,running", set(ACTIVE)),
    ("terminal,scheduled", {*TERMINAL, "SCHEDULED"}),
    ("stopped,stopping,stop_requested", {"STOPPED", "STOPPING", "STOP_REQUESTED"}),
    ("all,error", set(STATUSES)),
]


@pytest.mark.parametrize(("token", "wanted"), FILTERS)
def test_list_status_filter(client, token, wanted):
    ids = {}
    for status in STATUSES:
        for _ in range(2):
            ids.setdefault(status, []).append(make_job(client, status)["id"])
    body = list_jobs(client, status=token)
    expected = sorted((i for s in wanted for i in ids[s]), reverse=True)
    assert [j["id"] for j in body["jobs"]] == expected
    assert all(j["status"] in wanted for j in body["jobs"])
    assert body["next_cursor"] is None


def test_next_cursor_is_null_when_the_page_is_exactly_the_last(client):
    ids = [create(client)["id"] for _ in range(3)]
    body = list_jobs(client, limit=3)
    assert [j["id"] for j in body["jobs"]] == ids[::-1]
    assert body["next_cursor"] is None


def test_next_cursor_points_at_the_last_job_of_the_page(client):
    ids = [create(client)["id"] for _ in range(7)][::-1]  # newest first
    first = list_jobs(client, limit=3)
    assert [j["id"] for j in first["jobs"]] == ids[:3]
    assert first["next_cursor"] == ids[2]
    second = list_jobs(client, limit=3, last_job_id=first["next_cursor"])
    assert [j["id"] for j in second["jobs"]] == ids[3:6]
    assert second["next_cursor"] == ids[5]
    third = list_jobs(client, limit=3, last_job_id=second["next_cursor"])
    assert [j["id"] for j in third["jobs"]] == ids[6:]
    assert third["next_cursor"] is None


def test_next_cursor_ignores_later_jobs_that_do_not_match_the_filter(client):
    make_job(client, "COMPLETED")
    make_job(client, "FAILED")
    running = [make_job(client, "RUNNING")["id"] for _ in range(2)]
    body = list_jobs(client, limit=2)
    assert [j["id"] for j in body["jobs"]] == running[::-1]
    assert body["next_cursor"] is None
    body = list_jobs(client, limit=1, status="terminal")
    assert body["next_cursor"] == body["jobs"][0]["id"]
    last = list_jobs(client, limit=1, status="terminal", last_job_id=body["next_cursor"])
    assert len(last["jobs"]) == 1
    assert last["next_cursor"] is None


def test_last_job_id_returns_only_older_jobs(client):
    ids = [create(client)["id"] for _ in range(6)]
    assert [j["id"] for j in list_jobs(client, last_job_id=ids[3])["jobs"]] == ids[:3][::-1]
    assert list_jobs(client, last_job_id=ids[0]) == {"jobs": [], "next_cursor": None}
    assert list_jobs(client, last_job_id=1) == {"jobs": [], "next_cursor": None}
    everything = [j["id"] for j in list_jobs(client, last_job_id=MAX_ID)["jobs"]]
    assert everything == ids[::-1]
    assert [j["id"] for j in list_jobs(client, last_job_id=10**6)["jobs"]] == ids[::-1]
    # A cursor that is no longer a job (deleted) still works.
    report(client, ids[3], "FAILED")
    assert client.delete(f"/jobs/{ids[3]}").status_code == 204
    assert [j["id"] for j in list_jobs(client, last_job_id=ids[3])["jobs"]] == ids[:3][::-1]


def test_limit_default_is_50_and_bounds_are_accepted(client):
    ids = [create(client)["id"] for _ in range(51)][::-1]
    body = list_jobs(client)
    assert [j["id"] for j in body["jobs"]] == ids[:50]
    assert body["next_cursor"] == ids[49]
    rest = list_jobs(client, last_job_id=body["next_cursor"])
    assert [j["id"] for j in rest["jobs"]] == ids[50:]
    assert rest["next_cursor"] is None
    one = list_jobs(client, limit=1)
    assert [j["id"] for j in one["jobs"]] == ids[:1]
    assert one["next_cursor"] == ids[0]
    thousand = list_jobs(client, limit=1000)
    assert [j["id"] for j in thousand["jobs"]] == ids
    assert thousand["next_cursor"] is None


@pytest.fixture
def mixed_jobs(client):
    """57 jobs in pseudo-random statuses: {status: [ids]}."""
    rng = random.Random(57)
    by_status: dict[str, list[int]] = {s: [] for s in STATUSES}
    for _ in range(57):
        status = rng.choice(STATUSES)
        by_status[status].append(make_job(client, status)["id"])
    assert all(by_status[s] for s in STATUSES), "every status present"
    return by_status


@pytest.mark.parametrize(
    ("token", "wanted"),
    [
        (None, set(ACTIVE)),
        ("active", set(ACTIVE)),
        ("terminal", set(TERMINAL)),
        ("all", set(STATUSES)),
        ("running", {"RUNNING"}),
        ("completed,error", {"COMPLETED", "FAILED"}),
        ("stop_requested, STOPPING", {"STOP_REQUESTED", "STOPPING"}),
    ],
)
@pytest.mark.parametrize("limit", [5, 1])
def test_pagination_walk(client, mixed_jobs, token, wanted, limit):
    expected = sorted((i for s in wanted for i in mixed_jobs[s]), reverse=True)
    params = {"limit": limit} if token is None else {"limit": limit, "status": token}
    seen: list[int] = []
    pages = 0
    cursor = None
    while True:
        query = params if cursor is None else {**params, "last_job_id": cursor}
        body = list_jobs(client, **query)
        pages += 1
        page = [j["id"] for j in body["jobs"]]
        assert page, "never an empty page"
        assert len(page) <= limit
        assert all(j["status"] in wanted for j in body["jobs"])
        seen += page
        if body["next_cursor"] is None:
            break
        assert len(page) == limit
        assert body["next_cursor"] == page[-1]
        cursor = body["next_cursor"]
        assert pages < 100
    assert seen == expected, "each matching job exactly once, strictly descending"
    assert pages == -(-len(expected) // limit)


# ---- PUT /jobs/{id}/status ----------------------------------------------


@pytest.mark.parametrize(("source", "target"), list(product(STATUSES, REPORTABLE)))
def test_transition_table(client, source, target):
    job = make_job(client, source)
    other = make_job(client, source)  # must not be touched
    before_events = events(client, job["id"])
    response = client.put(f"/jobs/{job['id']}/status", json={"status": target})
    if target == source:
        assert response.status_code == 200, response.data
        assert check_job(body_of(response)) == job, "a no-op changes nothing"
        assert get_job(client, job["id"]) == job
        assert events(client, job["id"]) == before_events, "a no-op appends no event"
    elif target in WORKER_MOVES[source]:
        assert response.status_code == 200, response.data
        moved = check_job(body_of(response))
        assert moved["status"] == target
        assert moved["id"] == job["id"]
        assert moved["node_id"] == job["node_id"]
        assert moved["descriptor"] == job["descriptor"]
        assert moved["created_at"] == job["created_at"]
        assert parse_ts(moved["updated_at"]) > parse_ts(job["updated_at"])
        assert get_job(client, job["id"]) == moved
        after = events(client, job["id"])
        assert after[:-1] == before_events
        assert after[-1]["event_type"] == target
        assert after[-1]["detail"] is None
        assert after[-1]["id"] > before_events[-1]["id"]
    else:
        message = assert_error(response, 409, "INVALID_STATE_TRANSITION")
        assert names(source, message), message
        assert get_job(client, job["id"]) == job
        assert events(client, job["id"]) == before_events
    assert get_job(client, other["id"]) == other


def test_report_with_detail_records_it_in_the_event(client):
    job = create(client)
    detail = {"reason": "oom", "exit_code": 137, "nested": {"a": [1, "two", None]}}
    moved = report(client, job["id"], "FAILED", detail=detail)
    assert moved["status"] == "FAILED"
    assert events(client, job["id"])[-1]["detail"] == detail
    assert events(client, job["id"])[-1]["event_type"] == "FAILED"
    report(client, job["id"], "SCHEDULED", detail=None)
    assert events(client, job["id"])[-1]["detail"] is None


def test_retry_without_node_id_keeps_the_node(client):
    job = make_job(client, "FAILED", node_id="worker-01")
    retried = report(client, job["id"], "SCHEDULED")
    assert retried["status"] == "SCHEDULED"
    assert retried["node_id"] == "worker-01"
    evs = events(client, job["id"])
    assert [e["event_type"] for e in evs] == ["SCHEDULED", "FAILED", "SCHEDULED"]
    assert evs[-1]["node_id"] == "worker-01"
    # And it runs again from there.
    assert report(client, job["id"], "RUNNING")["status"] == "RUNNING"


def test_retry_to_another_node(client):
    job = make_job(client, "FAILED", node_id="worker-01")
    other = make_job(client, "FAILED", node_id="worker-01")
    retried = report(client, job["id"], "SCHEDULED", node_id="worker-02")
    assert retried["status"] == "SCHEDULED"
    assert retried["node_id"] == "worker-02"
    assert get_job(client, job["id"]) == retried
    evs = events(client, job["id"])
    assert [e["event_type"] for e in evs] == ["SCHEDULED", "FAILED", "SCHEDULED"]
    assert evs[0]["node_id"] == "worker-01"
    assert evs[-1]["node_id"] == "worker-02"
    assert get_job(client, other["id"])["node_id"] == "worker-01"
    # The same node again is a no-op without an event; yet another node moves the
    # SCHEDULED job there, with one event (docs/API.md, moving a job to another worker).
    assert report(client, job["id"], "SCHEDULED", node_id="worker-02") == retried
    assert len(events(client, job["id"])) == 3
    again = report(client, job["id"], "SCHEDULED", node_id="worker-03")
    assert (again["status"], again["node_id"]) == ("SCHEDULED", "worker-03")
    evs = events(client, job["id"])
    assert [(e["event_type"], e["node_id"]) for e in evs[2:]] == [
        ("SCHEDULED", "worker-02"),
        ("SCHEDULED", "worker-03"),
    ]


@pytest.mark.parametrize("source", [s for s in STATUSES if s not in ("FAILED", "SCHEDULED")])
def test_retry_with_node_id_from_a_non_failed_status_is_409(client, source):
    job = make_job(client, source)
    response = client.put(
        f"/jobs/{job['id']}/status", json={"status": "SCHEDULED", "node_id": "worker-09"}
    )
    message = assert_error(response, 409, "INVALID_STATE_TRANSITION")
    assert names(source, message)
    assert get_job(client, job["id"]) == job


@pytest.mark.parametrize("target", [s for s in REPORTABLE if s != "SCHEDULED"])
def test_node_id_with_another_status_names_the_reporter(client, target):
    # With any status but SCHEDULED, node_id is the reporting worker (docs/API.md,
    # "Attempts and retries"): another worker than the job's is refused as stale,
    # before the status machine is asked, and nothing changes. (It was a 400
    # before reports could name their worker.)
    for source in ("SCHEDULED", "RUNNING", "FAILED"):
        job = make_job(client, source)
        response = client.put(
            f"/jobs/{job['id']}/status", json={"status": target, "node_id": "worker-02"}
        )
        message = assert_error(response, 409, "STALE_ATTEMPT")
        assert "worker-01" in message and "attempt 1" in message
        assert get_job(client, job["id"]) == job


def test_report_to_unknown_job_is_404(client):
    create(client)
    assert_error(client.put("/jobs/2/status", json={"status": "RUNNING"}), 404, "JOB_NOT_FOUND")
    response = client.put(f"/jobs/{MAX_ID}/status", json={"status": "SCHEDULED", "node_id": "w"})
    assert_error(response, 404, "JOB_NOT_FOUND")


# ---- PUT|POST /jobs/{id}/stop ----------------------------------------------------


@pytest.mark.parametrize("method", ["PUT", "POST"])
@pytest.mark.parametrize("source", STATUSES)
def test_stop(client, source, method):
    job = make_job(client, source)
    other = make_job(client, source)
    before_events = events(client, job["id"])
    after = stop(client, job["id"], method)
    assert get_job(client, job["id"]) == after
    if source in STOPPABLE:
        assert after["status"] == "STOP_REQUESTED"
        assert {k: after[k] for k in ("id", "node_id", "descriptor", "created_at")} == {
            k: job[k] for k in ("id", "node_id", "descriptor", "created_at")
        }
        assert parse_ts(after["updated_at"]) > parse_ts(job["updated_at"])
        evs = events(client, job["id"])
        assert evs[:-1] == before_events
        assert evs[-1]["event_type"] == "STOP_REQUESTED"
    else:
        assert after == job
        assert events(client, job["id"]) == before_events
    # Idempotent: again, nothing more happens.
    again = stop(client, job["id"], method)
    assert again == after
    assert len(events(client, job["id"])) == len(before_events) + (source in STOPPABLE)
    assert get_job(client, other["id"]) == other


@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_stop_unknown_job_is_404(client, method):
    create(client)
    assert_error(client.open("/jobs/2/stop", method=method), 404, "JOB_NOT_FOUND")
    assert_error(client.open(f"/jobs/{MAX_ID}/stop", method=method), 404, "JOB_NOT_FOUND")


def test_stop_then_worker_winds_down(client):
    job = make_job(client, "RUNNING")
    stop(client, job["id"])
    report(client, job["id"], "STOPPING")
    report(client, job["id"], "STOPPED")
    assert event_types(client, job["id"]) == [
        "SCHEDULED",
        "RUNNING",
        "STOP_REQUESTED",
        "STOPPING",
        "STOPPED",
    ]


# ---- DELETE /jobs/{id} -----------------------------------------------------------


@pytest.mark.parametrize("terminal", TERMINAL)
def test_delete_terminal_job_cascades(client, db_conn, terminal):
    job = create(client)
    keep = create(client)
    register_files(client, job["id"], "blocks", [file_entry("a", 0, 9), file_entry("b", 10, 19)])
    register_files(client, job["id"], "logs", file_entry("c", 0, 9))
    register_files(client, keep["id"], "blocks", file_entry("a", 0, 9))
    job = drive(client, job, terminal)
    keep = drive(client, keep, terminal)
    assert count_job_rows(db_conn, "job_files", job["id"]) == 3
    assert count_job_rows(db_conn, "job_events", job["id"]) == 1 + len(PATHS[terminal])

    response = client.delete(f"/jobs/{job['id']}")
    assert response.status_code == 204
    assert response.data == b""
    assert_error(client.get(f"/jobs/{job['id']}"), 404, "JOB_NOT_FOUND")
    assert_error(client.get(f"/jobs/{job['id']}/events"), 404, "JOB_NOT_FOUND")
    assert_error(client.get(f"/jobs/{job['id']}/progress"), 404, "JOB_NOT_FOUND")
    for table in ("job_events", "job_tables", "job_files", "job_chain"):
        assert count_job_rows(db_conn, table, job["id"]) == 0, table
    # Idempotent.
    assert client.delete(f"/jobs/{job['id']}").status_code == 204
    # The other job is untouched.
    assert get_job(client, keep["id"]) == keep
    assert progress(client, keep["id"])["tables"]["blocks"]["files_count"] == 1
    assert [j["id"] for j in all_jobs(client)] == [keep["id"]]


@pytest.mark.parametrize("active", ACTIVE)
def test_delete_active_job_is_409_naming_its_status(client, db_conn, active):
    job = make_job(client, active)
    register_files(client, job["id"], "blocks", file_entry("a", 0, 9))
    before_events = events(client, job["id"])
    message = assert_error(client.delete(f"/jobs/{job['id']}"), 409, "JOB_CONFLICT")
    assert names(active, message), message
    assert get_job(client, job["id"]) == job
    assert events(client, job["id"]) == before_events
    assert progress(client, job["id"])["tables"]["blocks"]["files_count"] == 1
    assert count_job_rows(db_conn, "job_files", job["id"]) == 1


def test_delete_unknown_job_is_204(client):
    job = make_job(client, "RUNNING")
    for job_id in (job["id"] + 1, 12345, MAX_ID):
        response = client.delete(f"/jobs/{job_id}")
        assert response.status_code == 204
        assert response.data == b""
    assert get_job(client, job["id"]) == job


# ---- DELETE /jobs?status= --------------------------------------------------------


DELETE_TOKENS = [
    ("terminal", set(TERMINAL)),
    ("TERMINAL", set(TERMINAL)),
    ("Terminal", set(TERMINAL)),
    ("completed", {"COMPLETED"}),
    ("COMPLETED", {"COMPLETED"}),
    ("stopped", {"STOPPED"}),
    ("Stopped", {"STOPPED"}),
    ("error", {"FAILED"}),
    ("ERROR", {"FAILED"}),
    ("failed", {"FAILED"}),
    ("FaIlEd", {"FAILED"}),
]


@pytest.fixture
def two_of_each(client):
    """Two jobs in every status, each with a file registered while active: {id: status}."""
    jobs = {}
    for status in STATUSES:
        for _ in range(2):
            job = create(client)
            register_files(client, job["id"], "blocks", file_entry("f", 0, 9))
            job = drive(client, job, status)
            jobs[job["id"]] = status
    return jobs


@pytest.mark.parametrize(("token", "deleted"), DELETE_TOKENS)
def test_delete_by_status(client, db_conn, two_of_each, token, deleted):
    before = {j["id"]: j for j in all_jobs(client)}
    response = client.delete("/jobs", query_string={"status": token})
    assert response.status_code == 204, response.data
    assert response.data == b""
    remaining = {j["id"]: j for j in all_jobs(client)}
    expected = {i for i, s in two_of_each.items() if s not in deleted}
    assert set(remaining) == expected
    for job_id in expected:
        assert remaining[job_id] == before[job_id]
    for job_id in set(two_of_each) - expected:
        for table in ("job_events", "job_tables", "job_files", "job_chain"):
            assert count_job_rows(db_conn, table, job_id) == 0
        assert_error(client.get(f"/jobs/{job_id}/events"), 404, "JOB_NOT_FOUND")
    # Nothing left to match: still 204.
    assert client.delete("/jobs", query_string={"status": token}).status_code == 204
    assert set(j["id"] for j in all_jobs(client)) == expected


def test_delete_by_status_when_nothing_matches(client):
    jobs = [make_job(client, s) for s in ACTIVE]
    assert client.delete("/jobs?status=terminal").status_code == 204
    assert all_jobs(client) == [get_job(client, j["id"]) for j in reversed(jobs)]
    assert client.delete("/jobs?status=completed").status_code == 204
    assert len(all_jobs(client)) == 4


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?status=",
        "?status=bogus",
        "?status=running",
        "?status=RUNNING",
        "?status=scheduled",
        "?status=stop_requested",
        "?status=stopping",
        "?status=active",
        "?status=all",
        "?status=terminal,running",
        "?other=terminal",
    ],
)
def test_delete_by_status_refuses_missing_unknown_and_non_terminal(client, two_of_each, query):
    before = all_jobs(client)
    message = assert_error(client.delete("/jobs" + query), 400, "INVALID_QUERY_PARAM")
    assert "status" in message
    assert all_jobs(client) == before


# ---- DELETE /jobs with {"job_ids": [...]} ------------------------------------------


def test_delete_by_ids_deletes_exactly_those(client, db_conn):
    done = [make_job(client, s) for s in TERMINAL for _ in range(2)]
    running = make_job(client, "RUNNING")
    chosen = [done[0]["id"], done[3]["id"], done[5]["id"]]
    register_files(client, running["id"], "blocks", file_entry("f", 0, 9))
    response = client.delete("/jobs", json={"job_ids": [*chosen, 99999, chosen[0]]})
    assert response.status_code == 204, response.data
    assert response.data == b""
    remaining = {j["id"] for j in all_jobs(client)}
    assert remaining == {j["id"] for j in done} - set(chosen) | {running["id"]}
    for job_id in chosen:
        assert count_job_rows(db_conn, "job_events", job_id) == 0
    assert progress(client, running["id"])["tables"]["blocks"]["files_count"] == 1


def test_delete_by_ids_empty_list_and_unknown_ids(client):
    jobs = [make_job(client, "COMPLETED"), make_job(client, "RUNNING")]
    assert client.delete("/jobs", json={"job_ids": []}).status_code == 204
    assert client.delete("/jobs", json={"job_ids": [777, MAX_ID]}).status_code == 204
    assert sorted(j["id"] for j in all_jobs(client)) == [j["id"] for j in jobs]


def test_delete_by_ids_accepts_1000_ids(client):
    job = make_job(client, "STOPPED")
    keep = make_job(client, "STOPPED")
    ids = [job["id"], *range(10_000, 10_999)]
    assert len(ids) == 1000
    assert client.delete("/jobs", json={"job_ids": ids}).status_code == 204
    assert [j["id"] for j in all_jobs(client)] == [keep["id"]]


@pytest.mark.parametrize("body", [{"job_ids": []}, {"job_ids": [1]}, "x", b' "x" '])
def test_delete_by_status_with_a_body_is_ambiguous_and_deletes_nothing(client, db_conn, body):
    done = [make_job(client, s) for s in TERMINAL for _ in range(2)]
    before = all_jobs(client)
    if isinstance(body, bytes):
        response = client.delete("/jobs?status=completed", data=body)
    else:
        response = client.delete("/jobs?status=completed", json=body)
    message = assert_error(response, 400, "INVALID_QUERY_PARAM")
    assert "job_ids" in message and "status" in message, message
    assert all_jobs(client) == before
    assert sum(count_job_rows(db_conn, "job_events", j["id"]) for j in done) > 0


@pytest.mark.parametrize("body", [b"{}", b" null ", b""])
def test_delete_by_status_with_a_body_that_says_nothing_deletes_by_status(client, body):
    """{} and null say nothing on every route (as on routes that take no body)."""
    done = make_job(client, "COMPLETED")
    kept = make_job(client, "STOPPED")
    assert client.delete("/jobs?status=completed", data=body).status_code == 204
    assert client.get(f"/jobs/{done['id']}").status_code == 404
    assert client.get(f"/jobs/{kept['id']}").status_code == 200


@pytest.mark.parametrize("active", ACTIVE)
def test_delete_by_ids_is_all_or_nothing(client, db_conn, active):
    done = [make_job(client, s) for s in TERMINAL]
    blocker = make_job(client, active)
    before = all_jobs(client)
    ids = [done[0]["id"], blocker["id"], done[1]["id"], 4242]
    message = assert_error(client.delete("/jobs", json={"job_ids": ids}), 409, "JOB_CONFLICT")
    assert re.search(rf"\b{blocker['id']}\b", message), message
    assert all_jobs(client) == before
    for job in done:
        assert count_job_rows(db_conn, "job_events", job["id"]) == 1 + len(PATHS[job["status"]])


# ---- POST /jobs/{id}/tables/{table}/files ---------------------------------


def test_register_single_file(client):
    job = create(client)
    response = register_files(
        client, job["id"], "blocks", file_entry("b0", 0, 99, 1000, block_hash(1))
    )
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    assert isinstance(body_of(response), dict)
    assert progress(client, job["id"])["tables"] == {
        "blocks": {
            "start_block": 0,
            "current_block": 99,
            "files_count": 1,
            "total_size_bytes": 1000,
        }
    }


def test_register_batch(client):
    job = create(client)
    batch = [file_entry(f"b{i}", i * 100, i * 100 + 99, 10 + i) for i in range(5)]
    register_files(client, job["id"], "blocks", batch)
    assert progress(client, job["id"])["tables"]["blocks"] == {
        "start_block": 0,
        "current_block": 499,
        "files_count": 5,
        "total_size_bytes": sum(10 + i for i in range(5)),
    }


def test_register_1000_files_in_one_batch(client, db_conn):
    job = create(client)
    batch = [file_entry(f"b{i:04}", i * 10, i * 10 + 9, 1) for i in range(1000)]
    register_files(client, job["id"], "blocks", batch)
    assert count_job_rows(db_conn, "job_files", job["id"]) == 1000
    assert progress(client, job["id"])["tables"]["blocks"] == {
        "start_block": 0,
        "current_block": 9999,
        "files_count": 1000,
        "total_size_bytes": 1000,
    }


def test_register_boundaries(client):
    job = create(client)
    register_files(client, job["id"], "a" * 63, file_entry("max", 0, MAX_ID, MAX_ID))
    register_files(
        client, job["id"], "_", file_entry("zero", 0, 0, 0, block_hash(0), block_hash(2**256 - 1))
    )
    register_files(client, job["id"], "Table_9", file_entry("x" * 200, MAX_ID, MAX_ID, 0))
    tables = progress(client, job["id"])["tables"]
    assert tables == {
        "a" * 63: {
            "start_block": 0,
            "current_block": MAX_ID,
            "files_count": 1,
            "total_size_bytes": MAX_ID,
        },
        "_": {"start_block": 0, "current_block": 0, "files_count": 1, "total_size_bytes": 0},
        "Table_9": {
            "start_block": MAX_ID,
            "current_block": MAX_ID,
            "files_count": 1,
            "total_size_bytes": 0,
        },
    }


def test_identical_reregistration_is_200_and_stores_nothing(client, db_conn):
    job = create(client)
    one = file_entry("b0", 0, 99, 1000, block_hash(1), block_hash(0))
    batch = [
        file_entry("b1", 100, 199, 5, block_hash(2), block_hash(1)),
        file_entry("b2", 200, 299, 7),
    ]
    register_files(client, job["id"], "blocks", one)
    register_files(client, job["id"], "blocks", batch)
    before = progress(client, job["id"])
    assert before["tables"]["blocks"]["files_count"] == 3
    register_files(client, job["id"], "blocks", one, expect=200)
    register_files(client, job["id"], "blocks", batch, expect=200)
    register_files(client, job["id"], "blocks", [batch[1], one], expect=200)
    assert progress(client, job["id"]) == before
    assert count_job_rows(db_conn, "job_files", job["id"]) == 3
    # A batch with one new file among retried ones is stored: 201, one more file.
    register_files(client, job["id"], "blocks", [one, file_entry("b3", 300, 399, 1), batch[0]])
    assert count_job_rows(db_conn, "job_files", job["id"]) == 4
    assert progress(client, job["id"])["tables"]["blocks"]["files_count"] == 4


@pytest.mark.parametrize(
    "changed",
    [
        {"start_block": 1},
        {"end_block": 100},
        {"size_bytes": 1001},
        {"block_hash": block_hash(9)},
        {"prev_hash": block_hash(9)},
        {"block_hash": None},
    ],
)
def test_same_name_different_fields_is_409_file_conflict(client, db_conn, changed):
    job = create(client)
    original = file_entry("b0", 0, 99, 1000, block_hash(1), block_hash(0))
    register_files(client, job["id"], "blocks", original)
    before = progress(client, job["id"])
    message = assert_error(
        client.post(f"/jobs/{job['id']}/tables/blocks/files", json={**original, **changed}),
        409,
        "FILE_CONFLICT",
    )
    assert "b0" in message
    assert progress(client, job["id"]) == before
    assert count_job_rows(db_conn, "job_files", job["id"]) == 1


def test_a_conflict_rolls_back_the_whole_batch(client, db_conn):
    job = create(client)
    register_files(client, job["id"], "blocks", file_entry("b0", 0, 99, 10))
    before = progress(client, job["id"])
    batch = [
        file_entry("b1", 100, 199, 10),
        file_entry("b0", 0, 99, 11),
        file_entry("b2", 200, 299, 10),
    ]
    response = client.post(f"/jobs/{job['id']}/tables/blocks/files", json=batch)
    assert_error(response, 409, "FILE_CONFLICT")
    assert progress(client, job["id"]) == before
    assert count_job_rows(db_conn, "job_files", job["id"]) == 1
    # A conflict in a new table leaves no table behind either.
    response = client.post(
        f"/jobs/{job['id']}/tables/blocks/files", json=[file_entry("b0", 0, 99, 12)]
    )
    assert_error(response, 409, "FILE_CONFLICT")
    # The good files were not stored: now they are new.
    register_files(
        client,
        job["id"],
        "blocks",
        [file_entry("b1", 100, 199, 10), file_entry("b2", 200, 299, 10)],
    )
    assert progress(client, job["id"])["tables"]["blocks"]["files_count"] == 3


@pytest.mark.parametrize("status", STATUSES)
def test_register_only_while_active(client, db_conn, status):
    job = create(client)
    register_files(client, job["id"], "blocks", file_entry("b0", 0, 9, 1))
    job = drive(client, job, status)
    before = progress(client, job["id"])
    response = client.post(
        f"/jobs/{job['id']}/tables/blocks/files", json=file_entry("b1", 10, 19, 1)
    )
    if status in ACTIVE:
        assert response.status_code == 201, response.data
        assert progress(client, job["id"])["tables"]["blocks"]["files_count"] == 2
    else:
        message = assert_error(response, 409, "JOB_CONFLICT")
        assert names(status, message), message
        # Also a retry of a stored file, and a new table.
        assert_error(
            client.post(f"/jobs/{job['id']}/tables/blocks/files", json=file_entry("b0", 0, 9, 1)),
            409,
            "JOB_CONFLICT",
        )
        assert_error(
            client.post(f"/jobs/{job['id']}/tables/logs/files", json=file_entry("l0", 0, 9, 1)),
            409,
            "JOB_CONFLICT",
        )
        assert progress(client, job["id"]) == before
        assert count_job_rows(db_conn, "job_files", job["id"]) == 1
        assert count_job_rows(db_conn, "job_tables", job["id"]) == 1
    assert get_job(client, job["id"]) == job


def test_register_for_unknown_job_is_404(client, db_conn):
    create(client)
    for job_id in (2, MAX_ID):
        response = client.post(f"/jobs/{job_id}/tables/blocks/files", json=file_entry("b0", 0, 9))
        assert_error(response, 404, "JOB_NOT_FOUND")
    with db_conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM job_files")
        assert cur.fetchone()[0] == 0


def test_registration_does_not_change_the_job_or_its_events(client):
    job = make_job(client, "RUNNING")
    before_events = events(client, job["id"])
    register_files(client, job["id"], "blocks", file_entry("b0", 0, 9))
    assert get_job(client, job["id"]) == job
    assert events(client, job["id"]) == before_events


# ---- GET /jobs/{id}/events --------------------------------------------------


def test_events_full_history(client):
    job = create(client, node_id="worker-01")
    other = create(client, node_id="worker-99")
    jid = job["id"]
    report(client, jid, "RUNNING", detail={"pid": 1})
    report(client, jid, "RUNNING", detail={"pid": 2})  # no-op
    report(client, jid, "FAILED", detail={"error": "disk full"})
    report(client, jid, "FAILED")  # no-op
    report(client, jid, "COMPLETED", expect=409)
    report(client, jid, "STOP_REQUESTED", expect=400)
    report(client, jid, "SCHEDULED", node_id="worker-02")
    report(client, jid, "RUNNING")
    stop(client, jid)
    stop(client, jid, "POST")  # no-op
    report(client, jid, "STOPPING")
    report(client, jid, "STOPPING")  # no-op
    report(client, jid, "STOPPED", detail={"at_block": 123})
    report(client, jid, "FAILED", expect=409)
    register_files(client, other["id"], "blocks", file_entry("x", 0, 1))
    stop(client, other["id"])

    evs = events(client, jid)
    assert [(e["event_type"], e["node_id"], e["detail"]) for e in evs] == [
        ("SCHEDULED", "worker-01", None),
        ("RUNNING", "worker-01", {"pid": 1}),
        ("FAILED", "worker-01", {"error": "disk full"}),
        ("SCHEDULED", "worker-02", None),
        ("RUNNING", "worker-02", None),
        ("STOP_REQUESTED", "worker-02", None),
        ("STOPPING", "worker-02", None),
        ("STOPPED", "worker-02", {"at_block": 123}),
    ]
    assert parse_ts(evs[0]["created_at"]) >= parse_ts(job["created_at"])
    assert [e["event_type"] for e in events(client, other["id"])] == [
        "SCHEDULED",
        "STOP_REQUESTED",
    ]
    assert not {e["id"] for e in evs} & {e["id"] for e in events(client, other["id"])}


def test_events_exact_shape(client):
    job = create(client, node_id="worker-01")
    response = client.get(f"/jobs/{job['id']}/events")
    assert response.status_code == 200
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    body = body_of(response)
    assert EVENT_LIST_SCHEMA.validate(body) == {}
    assert body == {
        "job_id": job["id"],
        "events": [
            {
                "id": body["events"][0]["id"],
                "created_at": body["events"][0]["created_at"],
                "event_type": "SCHEDULED",
                "node_id": "worker-01",
                "detail": None,
            }
        ],
        "next_cursor": None,
    }
    assert isinstance(body["events"][0]["id"], int)
    assert TS.match(body["events"][0]["created_at"])


def test_events_of_unknown_job_is_404(client):
    create(client)
    assert_error(client.get("/jobs/2/events"), 404, "JOB_NOT_FOUND")
    assert_error(client.get(f"/jobs/{MAX_ID}/events"), 404, "JOB_NOT_FOUND")


# ---- GET /jobs/{id}/progress --------------------------------------------------------


def test_progress_without_files_is_empty(client):
    job = make_job(client, "RUNNING")
    response = client.get(f"/jobs/{job['id']}/progress")
    assert response.status_code == 200
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    assert body_of(response) == {"job_id": job["id"], "job_status": "RUNNING", "tables": {}}
    assert PROGRESS_SCHEMA.validate(body_of(response)) == {}


@pytest.mark.parametrize("status", STATUSES)
def test_progress_reports_the_job_status(client, status):
    job = make_job(client, status)
    assert progress(client, job["id"]) == {"job_id": job["id"], "job_status": status, "tables": {}}


def test_progress_tables_keyed_by_name(client):
    job = create(client)
    other = create(client)
    register_files(
        client, job["id"], "blocks", [file_entry("b0", 0, 99, 100), file_entry("b1", 100, 199, 50)]
    )
    register_files(client, job["id"], "transactions", file_entry("t0", 5, 9, 7))
    register_files(
        client, job["id"], "Logs_2", [file_entry("l0", 10, 19, 1), file_entry("l1", 30, 39, 1)]
    )
    register_files(client, other["id"], "blocks", file_entry("b0", 0, 5, 3))
    body = progress(client, job["id"])
    assert body == {
        "job_id": job["id"],
        "job_status": "SCHEDULED",
        "tables": {
            "blocks": {
                "start_block": 0,
                "current_block": 199,
                "files_count": 2,
                "total_size_bytes": 150,
            },
            "transactions": {
                "start_block": 5,
                "current_block": 9,
                "files_count": 1,
                "total_size_bytes": 7,
            },
            # A gap: l1 is not canonical.
            "Logs_2": {
                "start_block": 10,
                "current_block": 19,
                "files_count": 1,
                "total_size_bytes": 1,
            },
        },
    }
    assert progress(client, other["id"])["tables"] == {
        "blocks": {"start_block": 0, "current_block": 5, "files_count": 1, "total_size_bytes": 3}
    }
    report(client, job["id"], "RUNNING")
    report(client, job["id"], "COMPLETED")
    after = progress(client, job["id"])
    assert after["job_status"] == "COMPLETED"
    assert after["tables"] == body["tables"]


def test_progress_of_unknown_job_is_404(client):
    create(client)
    assert_error(client.get("/jobs/2/progress"), 404, "JOB_NOT_FOUND")
    assert_error(client.get(f"/jobs/{MAX_ID}/progress"), 404, "JOB_NOT_FOUND")
