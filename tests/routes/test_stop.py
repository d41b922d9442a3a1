"""PUT and POST /jobs/{job_id}/stop (docs/API.md, "PUT /jobs/{job_id}/stop",
"POST /jobs/{job_id}/stop"): a stop request from every status, idempotent; 404 for
an unknown job; the worker's wind-down after it.
"""

from __future__ import annotations

import pytest

from support.checked import create, event_types, events, get_job, make_job, parse_ts, report, stop
from support.oracle import STATUSES, STOPPABLE
from support.service import MAX_ID, assert_error


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
