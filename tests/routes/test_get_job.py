"""GET /jobs/{job_id} (docs/API.md, "GET /jobs/{job_id}"): the job's shape and
values, 404 for an unknown job, and ``updated_at``, which moves with every status
change and only then (docs/API.md, "Job").
"""

from __future__ import annotations

from support.checked import (
    JOB_KEYS,
    TS,
    body_of,
    create,
    get_job,
    list_jobs,
    parse_ts,
    report,
    stop,
)
from support.service import MAX_ID, assert_error, file_entry, register_files


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
