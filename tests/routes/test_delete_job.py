"""DELETE /jobs/{job_id} (docs/API.md, "DELETE /jobs/{job_id}"): a terminal job
deleted with all it owns, an active one refused (409), an unknown one 204.
"""

from __future__ import annotations

import pytest

from support.checked import (
    PATHS,
    all_jobs,
    create,
    drive,
    events,
    get_job,
    make_job,
    names,
    progress,
)
from support.databases import count_job_rows
from support.oracle import ACTIVE, TERMINAL
from support.service import MAX_ID, assert_error, file_entry, register_files


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
