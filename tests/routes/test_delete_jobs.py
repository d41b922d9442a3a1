"""DELETE /jobs (docs/API.md, "DELETE /jobs"): by status (``?status=``, terminal
statuses only) and by IDs (``{"job_ids": [...]}``, all or nothing), never both;
every malformed list, body or parameter refused with nothing changed.

Successful answers are checked by support.checked, refusals by support.refusals.
"""

from __future__ import annotations

import re

import pytest

from support.checked import PATHS, all_jobs, create, drive, get_job, make_job, progress
from support.databases import built_once, count_job_rows
from support.oracle import ACTIVE, STATUSES, TERMINAL
from support.refusals import PATH_TO, create_id, move, refused, short, unchanged
from support.service import MAX_ID, assert_error, file_entry, register_files

# ---- By status -----------------------------------------------------------------------


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


@pytest.mark.parametrize(
    "query", ["?status=failed&status=completed", "?status=failed&force=1", "?Status=failed"]
)
def test_bulk_delete_refuses_unknown_and_repeated_parameters(client, db_conn, query):
    job = create_id(client)
    move(client, job, "FAILED")
    refused(client, db_conn, "DELETE", "/jobs" + query, None, None, "INVALID_QUERY_PARAM")


# ---- By IDs: {"job_ids": [...]} ------------------------------------------------------


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


# ---- Refused lists of IDs ------------------------------------------------------------


JOB_ID_ITEMS_BAD = [
    0,
    -1,
    2**63,
    2**64,
    10**30,
    1.5,
    "abc",
    "",
    " 1",
    "+1",
    "0x1",
    "\u0661",
    "99999999999999999999",
    None,
    True,
    False,
    [1],
    {},
]


@pytest.fixture
def deletable(client):
    """Three terminal jobs (1..3) and an active one (4) (support.databases.built_once)."""
    return built_once(
        client.application.config["DATABASE_URL"], "deletable", lambda: build_deletable(client)
    )


def build_deletable(client) -> list[int]:
    for status in ("COMPLETED", "STOPPED", "FAILED", "RUNNING"):
        job_id = create_id(client)
        register_files(client, job_id, "blocks", file_entry("f0", 0, 9))
        move(client, job_id, *PATH_TO[status])
    return [1, 2, 3]


@pytest.mark.parametrize("item", JOB_ID_ITEMS_BAD, ids=short)
def test_bulk_delete_refuses_a_bad_id(client, db_conn, deletable, item):
    with unchanged(db_conn):
        refused(client, db_conn, "DELETE", "/jobs", {"job_ids": [*deletable, item]}, "job_ids")
        refused(client, db_conn, "DELETE", "/jobs", {"job_ids": [item]}, "job_ids")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"job_ids": None}, "job_ids"),
        ({"job_ids": 1}, "job_ids"),
        ({"job_ids": "1"}, "job_ids"),
        ({"job_ids": "1,2"}, "job_ids"),
        ({"job_ids": True}, "job_ids"),
        ({"job_ids": {"1": 1}}, "job_ids"),
        ({"job_ids": [1], "extra": 1}, "extra"),
        ({"job_ids": [1], "status": "terminal"}, "status"),
        ({"ids": [1]}, "ids"),
        ([1, 2, 3], None),
        ([], None),
    ],
    ids=short,
)
def test_bulk_delete_refuses_bad_shapes(client, db_conn, deletable, body, field):
    with unchanged(db_conn):
        refused(client, db_conn, "DELETE", "/jobs", body, field)


@pytest.mark.parametrize("body", [{}, b"null", None])
def test_bulk_delete_with_no_status_and_a_body_saying_nothing_asks_for_one(
    client, db_conn, deletable, body
):
    """{} and null say nothing (on every route): neither ?status= nor job_ids is given."""
    with unchanged(db_conn):
        refused(client, db_conn, "DELETE", "/jobs", body, "job_ids", "INVALID_QUERY_PARAM")


def test_bulk_delete_refuses_1001_ids(client, db_conn, deletable):
    with unchanged(db_conn):
        ids = [*deletable, *range(100, 1098)]
        assert len(ids) == 1001
        refused(client, db_conn, "DELETE", "/jobs", {"job_ids": ids}, "job_ids")
