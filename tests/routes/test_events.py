"""GET /jobs/{job_id}/events and GET /jobs/{job_id}/events/{event_id} (docs/API.md,
"GET /jobs/{job_id}/events", "GET /jobs/{job_id}/events/{event_id}", "Events"): a
job's history, oldest first, one event per status change; one event alone.
Waiting for the next event is test_waiting.py's.
"""

from __future__ import annotations

from support.checked import EVENT_LIST_SCHEMA, TS, body_of, create, events, parse_ts, report, stop
from support.service import (
    MAX_ID,
    assert_error,
    events_of,
    file_entry,
    flask_caller,
    job_in,
    register_files,
)

# ---- GET /jobs/{job_id}/events -------------------------------------------------------


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


# ---- GET /jobs/{job_id}/events/{event_id} --------------------------------------------


def test_one_event(client):
    a = job_in(client, "worker-01", "RUNNING")
    b = job_in(client, "worker-02", "SCHEDULED")
    call = flask_caller(client.application)
    client.put(f"/jobs/{a}/status", json={"status": "FAILED", "detail": {"error": "oom"}})
    for event in events_of(call, a):
        one = client.get(f"/jobs/{a}/events/{event['id']}")
        assert one.status_code == 200
        assert list(one.get_json()) == [
            "id",
            "job_id",
            "created_at",
            "node_id",
            "event_type",
            "detail",
        ]
        assert one.get_json() == {"job_id": a, **event}
    (b_event,) = events_of(call, b)
    message = assert_error(client.get(f"/jobs/{a}/events/{b_event['id']}"), 404, "EVENT_NOT_FOUND")
    assert str(b_event["id"]) in message
    assert_error(client.get(f"/jobs/{a}/events/987654321"), 404, "EVENT_NOT_FOUND")
    assert_error(client.get(f"/jobs/987654321/events/{b_event['id']}"), 404, "JOB_NOT_FOUND")
    for bad in ("0", "-1", "abc", "1.5", "+1", "99999999999999999999", "0x1A"):
        assert_error(client.get(f"/jobs/{a}/events/{bad}"), 400, "INVALID_JOB_ID")
        assert_error(client.get(f"/jobs/{bad}/events/1"), 400, "INVALID_JOB_ID")
    assert_error(client.get(f"/jobs/{a}/events/1?x=1"), 400, "INVALID_QUERY_PARAMETERS")
