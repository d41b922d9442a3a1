"""PUT /jobs/{job_id}/status (docs/API.md, "PUT /jobs/{job_id}/status"): the
status machine (docs/API.md, "The status machine") move by move, details in the
event, retries and moving a SCHEDULED or FAILED job to another node (docs/API.md,
"Moving a job to another worker"), a report naming another worker; every
malformed report refused with nothing changed; the detail's bound (docs/API.md,
"Bounds").

Successful answers are checked by support.checked, refusals by support.refusals.
"""

from __future__ import annotations

from itertools import product

import pytest

from jobs.domain import MAX_DETAIL_BYTES

from support.checked import (
    body_of,
    check_job,
    create,
    events,
    get_job,
    make_job,
    names,
    parse_ts,
    report,
)
from support.databases import count_job_rows
from support.oracle import REPORTABLE, STATUSES, WORKER_MOVES
from support.refusals import refused, short, unchanged
from support.service import (
    MAX_ID,
    assert_error,
    create_job,
    detail_of,
    events_of,
    flask_caller,
    job_in,
)

# ---- The status machine --------------------------------------------------------------


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


# ---- Retries and other nodes ---------------------------------------------------------


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


def test_a_scheduled_job_moves_to_another_node_with_one_event(client):
    job = job_in(client, "worker-01", "SCHEDULED")
    moved = client.put(f"/jobs/{job}/status", json={"status": "SCHEDULED", "node_id": "worker-02"})
    assert moved.status_code == 200
    body = moved.get_json()
    assert (body["status"], body["node_id"]) == ("SCHEDULED", "worker-02")
    events = events_of(flask_caller(client.application), job)
    assert [(e["event_type"], e["node_id"]) for e in events] == [
        ("SCHEDULED", "worker-01"),
        ("SCHEDULED", "worker-02"),
    ]
    assert events[-1]["created_at"] == body["updated_at"]
    # The same node again, or no node: a no-op without an event.
    for sent in ({"status": "SCHEDULED", "node_id": "worker-02"}, {"status": "SCHEDULED"}):
        again = client.put(f"/jobs/{job}/status", json=sent)
        assert again.status_code == 200
        assert again.get_json() == body
    assert len(events_of(flask_caller(client.application), job)) == 2
    assert client.get("/jobs?node_id=worker-02").get_json()["jobs"] == [body]
    assert client.get("/jobs?node_id=worker-01").get_json()["jobs"] == []


@pytest.mark.parametrize(
    "status", ["RUNNING", "STOP_REQUESTED", "STOPPING", "COMPLETED", "STOPPED"]
)
def test_only_scheduled_and_failed_jobs_move_to_another_node(client, status):
    job = job_in(client, "worker-01", status)
    before = client.get(f"/jobs/{job}").get_json()
    response = client.put(f"/jobs/{job}/status", json={"status": "SCHEDULED", "node_id": "w2"})
    assert status in assert_error(response, 409, "INVALID_STATE_TRANSITION")
    assert client.get(f"/jobs/{job}").get_json() == before


def test_a_failed_job_is_retried_on_another_node(client):
    job = job_in(client, "worker-01", "FAILED")
    body = client.put(f"/jobs/{job}/status", json={"status": "SCHEDULED", "node_id": "w2"})
    assert (body.get_json()["status"], body.get_json()["node_id"]) == ("SCHEDULED", "w2")


# ---- Unknown jobs and refused reports ------------------------------------------------


def test_report_to_unknown_job_is_404(client):
    create(client)
    assert_error(client.put("/jobs/2/status", json={"status": "RUNNING"}), 404, "JOB_NOT_FOUND")
    response = client.put(f"/jobs/{MAX_ID}/status", json={"status": "SCHEDULED", "node_id": "w"})
    assert_error(response, 404, "JOB_NOT_FOUND")


STATUS_BAD = [
    ({}, "status"),
    ({"detail": {}}, "status"),
    ({"node_id": "w"}, "status"),
    *[
        ({"status": v}, "status")
        for v in [
            None,
            1,
            True,
            "",
            "running",
            "Running",
            " RUNNING",
            "RUNNING ",
            "RUNNING\n",
            "RUNNING\x00",
            "STOP_REQUESTED",
            "stop_requested",
            "BOGUS",
            "ERROR",
            "error",
            "ACTIVE",
            "TERMINAL",
            "ALL",
            ["RUNNING"],
            {"RUNNING": 1},
        ]
    ],
    *[
        ({"status": "FAILED", "detail": v}, "detail")
        for v in [[], "x", 1, True, 1.5, {"a": "\x00"}, {"\x00": 1}, {"a": [{"b": "\x00"}]}]
    ],
    # node_id with another status than SCHEDULED names the reporting worker
    # now (a stale one is a 409, test_attempts.py), so only a malformed one is a 400.
    *[
        ({"status": s, "node_id": v}, "node_id")
        for s in ["SCHEDULED", "RUNNING", "FAILED"]
        for v in ["", "1abc", "a" * 129, 1, True, [], {}, "a\x00", "w\n", "a b"]
    ],
    ({"status": "FAILED", "extra": 1}, "extra"),
    ({"status": "FAILED", "job_id": 1}, "job_id"),
    ({"status": "FAILED", "updated_at": "2026-01-01T00:00:00.000000Z"}, "updated_at"),
    ([{"status": "FAILED"}], None),
    ([], None),
]


@pytest.mark.parametrize(("body", "field"), STATUS_BAD, ids=short)
def test_status_report_refuses(client, db_conn, targets, body, field):
    with unchanged(db_conn):
        for job_id in [*targets.values(), 999]:  # 999: validation comes before the lookup
            refused(client, db_conn, "PUT", f"/jobs/{job_id}/status", body, field)


# ---- The detail's bound --------------------------------------------------------------


def test_detail_at_the_bound_is_stored_and_over_it_refused_naming_detail(client, db_conn):
    call = flask_caller(client.application)
    job = create_job(call)["id"]
    over = client.put(
        f"/jobs/{job}/status", json={"status": "FAILED", "detail": detail_of(MAX_DETAIL_BYTES + 1)}
    )
    message = assert_error(over, 400, "INVALID_PAYLOAD_FORMAT")
    assert message.startswith("detail: ") and str(MAX_DETAIL_BYTES) in message, message
    # Nothing changed: no move, no event.
    assert client.get(f"/jobs/{job}").get_json()["status"] == "SCHEDULED"
    assert count_job_rows(db_conn, "job_events", job) == 1
    # Multi-byte characters count as the bytes they take.
    wide = {"error": "é" * (MAX_DETAIL_BYTES // 2)}
    assert_error(client.put(f"/jobs/{job}/status", json={"status": "FAILED", "detail": wide}),
                 400, "INVALID_PAYLOAD_FORMAT")
    # Numbers count as PostgreSQL writes them back: 1e300 is 301 digits, not 5 bytes.
    exponents = b'{"status": "FAILED", "detail": {"n": [' + b",".join([b"1e300"] * 60) + b"]}}"
    assert len(exponents) < 1000
    assert_error(client.put(f"/jobs/{job}/status", data=exponents), 400, "INVALID_PAYLOAD_FORMAT")
    assert count_job_rows(db_conn, "job_events", job) == 1
    # At the bound it is stored, and comes back as given.
    at = detail_of(MAX_DETAIL_BYTES)
    stored = client.put(f"/jobs/{job}/status", json={"status": "FAILED", "detail": at})
    assert stored.status_code == 200
    assert client.get(f"/jobs/{job}/events").get_json()["events"][-1]["detail"] == at
