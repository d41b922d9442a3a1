"""GET /jobs/{job_id}/progress (docs/API.md, "GET /jobs/{job_id}/progress"): the
answer's shape and the job's status, then the canonical chain of docs/API.md
("Progress and the canonical chain").

Each chain case registers files with POST /jobs/{id}/tables/{table}/files and
checks the table's entry (and that the registration's own ``progress`` agrees).
"""

from __future__ import annotations

import json

import pytest

from support.checked import PROGRESS_SCHEMA, body_of, create, make_job, progress, report
from support.oracle import STATUSES, expected_progress
from support.service import MAX_ID, assert_error, block_hash, file_entry, new_job, register_files

EMPTY = expected_progress(None, None, 0, 0)


def tables(client, job_id) -> dict:
    response = client.get(f"/jobs/{job_id}/progress")
    assert response.status_code == 200
    body = response.get_json()
    assert body["job_id"] == job_id
    # The documented invariant: a table that has files never reports null/null/0/0.
    for entry in body["tables"].values():
        assert entry != EMPTY
        assert entry["files_count"] >= 1
    return body["tables"]


def progress_of(client, job_id, table="blocks") -> dict:
    return tables(client, job_id)[table]


# ---- The answer -----------------------------------------------------------------------


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


# ---- The canonical chain --------------------------------------------------------------


@pytest.fixture
def job(client) -> int:
    return new_job(client)


def test_no_files_is_an_empty_object(client, job):
    response = client.get(f"/jobs/{job}/progress")
    assert response.status_code == 200
    assert response.get_json() == {"job_id": job, "job_status": "SCHEDULED", "tables": {}}


def test_job_status_is_reported(client, job):
    client.put(f"/jobs/{job}/status", json={"status": "RUNNING"})
    register_files(client, job, "blocks", file_entry("a", 0, 9))
    body = client.get(f"/jobs/{job}/progress").get_json()
    assert body["job_status"] == "RUNNING"


def test_clean_chain(client, job):
    body = register_files(
        client,
        job,
        "blocks",
        file_entry("a", 0, 99, 10, block_hash(1)),
        file_entry("b", 100, 199, 20, block_hash(2), block_hash(1)),
        file_entry("c", 200, 299, 30, block_hash(3), block_hash(2)),
    ).get_json()
    assert body["registered"] == 3
    assert body["progress"] == expected_progress(0, 299, 3, 60)
    assert progress_of(client, job) == expected_progress(0, 299, 3, 60)
    # One more, alone, as a single object.
    body = register_files(
        client, job, "blocks", file_entry("d", 300, 399, 40, block_hash(4), block_hash(3))
    ).get_json()
    assert body["progress"] == progress_of(client, job) == expected_progress(0, 399, 4, 100)


def test_chain_starts_at_the_lowest_start_block(client, job):
    register_files(
        client, job, "blocks", file_entry("b", 2000, 2999, 2), file_entry("a", 1000, 1999, 1)
    )
    assert progress_of(client, job) == expected_progress(1000, 2999, 2, 3)


def test_a_gap_stops_the_chain_until_it_is_filled(client, job):
    register_files(
        client,
        job,
        "blocks",
        file_entry("a", 0, 99, 1),
        file_entry("c", 200, 299, 4),
        file_entry("d", 300, 399, 8),
    )
    # Everything past the gap is skipped.
    assert progress_of(client, job) == expected_progress(0, 99, 1, 1)
    register_files(client, job, "blocks", file_entry("e", 500, 599, 16))
    assert progress_of(client, job) == expected_progress(0, 99, 1, 1)
    # Filling the gap extends the chain over the files skipped before it...
    body = register_files(client, job, "blocks", file_entry("b", 100, 199, 2)).get_json()
    assert body["progress"] == progress_of(client, job) == expected_progress(0, 399, 4, 15)
    # ...up to the next gap.
    register_files(client, job, "blocks", file_entry("x", 400, 499, 32))
    assert progress_of(client, job) == expected_progress(0, 599, 6, 63)


def test_a_fork_is_won_by_the_most_recent_registration(client, job):
    register_files(client, job, "blocks", file_entry("a", 0, 99, 1), file_entry("b", 100, 199, 10))
    assert progress_of(client, job) == expected_progress(0, 199, 2, 11)
    # A newer file at the same start wins, even though it ends earlier.
    register_files(client, job, "blocks", file_entry("b2", 100, 149, 100))
    assert progress_of(client, job) == expected_progress(0, 149, 2, 101)
    # The loser's successor no longer links; the winner's does.
    register_files(client, job, "blocks", file_entry("c", 200, 299, 1000))
    assert progress_of(client, job) == expected_progress(0, 149, 2, 101)
    register_files(client, job, "blocks", file_entry("b3", 150, 199, 10000))
    assert progress_of(client, job) == expected_progress(0, 299, 4, 11101)


def test_a_fork_in_the_other_order(client, job):
    register_files(
        client, job, "blocks", file_entry("a", 0, 99, 1), file_entry("short", 100, 149, 100)
    )
    register_files(client, job, "blocks", file_entry("long", 100, 199, 10))
    assert progress_of(client, job) == expected_progress(0, 199, 2, 11)


def test_a_fork_at_the_first_block(client, job):
    register_files(client, job, "blocks", file_entry("a", 0, 99, 1), file_entry("b", 100, 199, 2))
    register_files(client, job, "blocks", file_entry("a2", 0, 49, 4))
    # The newest file at the lowest start begins the chain; nothing starts at 50.
    assert progress_of(client, job) == expected_progress(0, 49, 1, 4)


def test_a_hash_mismatch_is_skipped(client, job):
    register_files(client, job, "blocks", file_entry("a", 0, 99, 1, block_hash(1)))
    register_files(
        client, job, "blocks", file_entry("b", 100, 199, 2, block_hash(2), block_hash(9))
    )
    assert progress_of(client, job) == expected_progress(0, 99, 1, 1)
    # The same range, linking, completes it.
    register_files(
        client, job, "blocks", file_entry("b2", 100, 199, 4, block_hash(2), block_hash(1))
    )
    assert progress_of(client, job) == expected_progress(0, 199, 2, 5)


def test_an_older_linking_file_beats_a_newer_mismatched_one(client, job):
    register_files(
        client,
        job,
        "blocks",
        file_entry("a", 0, 99, 1, block_hash(1)),
        file_entry("b", 100, 199, 2, block_hash(2), block_hash(1)),
        file_entry("c", 200, 299, 4, block_hash(3), block_hash(2)),
    )
    register_files(
        client, job, "blocks", file_entry("b-bad", 100, 149, 8, block_hash(7), block_hash(6))
    )
    assert progress_of(client, job) == expected_progress(0, 299, 3, 7)


def test_hashes_compare_after_normalisation(client, job):
    register_files(client, job, "blocks", file_entry("a", 0, 99, 1, block_hash(0xABC)))
    register_files(
        client,
        job,
        "blocks",
        file_entry("b", 100, 199, 2, prev_hash=block_hash(0xABC).upper().replace("0X", "0x")),
    )
    assert progress_of(client, job) == expected_progress(0, 199, 2, 3)


@pytest.mark.parametrize(
    ("tip_hash", "prev_hash"),
    [(None, block_hash(5)), (block_hash(5), None), (None, None)],
    ids=["tip-without-hash", "file-without-prev-hash", "neither"],
)
def test_a_hash_absent_on_one_side_links(client, job, tip_hash, prev_hash):
    register_files(
        client,
        job,
        "blocks",
        file_entry("a", 0, 99, 1, tip_hash),
        file_entry("b", 100, 199, 2, prev_hash=prev_hash),
    )
    assert progress_of(client, job) == expected_progress(0, 199, 2, 3)


def test_the_tip_hash_is_the_last_chain_files(client, job):
    # a's hash must not be compared with c's prev_hash: b (no hash) is the tip.
    register_files(
        client,
        job,
        "blocks",
        file_entry("a", 0, 99, 1, block_hash(1)),
        file_entry("b", 100, 199, 2, prev_hash=block_hash(1)),
        file_entry("c", 200, 299, 4, prev_hash=block_hash(1)),
    )
    assert progress_of(client, job) == expected_progress(0, 299, 3, 7)
    register_files(
        client, job, "blocks", file_entry("d", 300, 399, 8, block_hash(4), block_hash(3))
    )
    register_files(client, job, "blocks", file_entry("e", 400, 499, 16, prev_hash=block_hash(3)))
    assert progress_of(client, job) == expected_progress(0, 399, 4, 15)


def test_overlaps_are_skipped(client, job):
    register_files(client, job, "blocks", file_entry("a", 0, 99, 1), file_entry("over", 50, 149, 2))
    assert progress_of(client, job) == expected_progress(0, 99, 1, 1)
    register_files(client, job, "blocks", file_entry("b", 100, 199, 4))
    assert progress_of(client, job) == expected_progress(0, 199, 2, 5)
    # A file inside the chain's range changes nothing either.
    register_files(
        client,
        job,
        "blocks",
        file_entry("inside", 120, 130, 8),
        file_entry("same-end", 150, 199, 16),
    )
    assert progress_of(client, job) == expected_progress(0, 199, 2, 5)


def test_a_reorg_rewriting_the_middle(client, job):
    register_files(
        client,
        job,
        "blocks",
        file_entry("a", 0, 99, 1, block_hash(1)),
        file_entry("b", 100, 199, 2, block_hash(2), block_hash(1)),
        file_entry("c", 200, 299, 4, block_hash(3), block_hash(2)),
        file_entry("d", 300, 399, 8, block_hash(4), block_hash(3)),
    )
    assert progress_of(client, job) == expected_progress(0, 399, 4, 15)
    # The middle is rewritten: its new hash breaks the links after it.
    register_files(
        client, job, "blocks", file_entry("b'", 100, 199, 16, block_hash(22), block_hash(1))
    )
    assert progress_of(client, job) == expected_progress(0, 199, 2, 17)
    register_files(
        client, job, "blocks", file_entry("c'", 200, 299, 32, block_hash(33), block_hash(22))
    )
    assert progress_of(client, job) == expected_progress(0, 299, 3, 49)
    register_files(
        client, job, "blocks", file_entry("d'", 300, 399, 64, block_hash(44), block_hash(33))
    )
    assert progress_of(client, job) == expected_progress(0, 399, 4, 113)
    # A reorg reaching back into the chain with a shorter range.
    register_files(
        client, job, "blocks", file_entry("c''", 200, 249, 128, block_hash(55), block_hash(22))
    )
    assert progress_of(client, job) == expected_progress(0, 249, 3, 145)
    # Both old c and c' stay skipped; the new tail extends the new branch.
    register_files(
        client, job, "blocks", file_entry("c'''", 250, 299, 256, block_hash(66), block_hash(55))
    )
    assert progress_of(client, job) == expected_progress(0, 299, 4, 401)


def test_a_reorg_without_hashes(client, job):
    register_files(
        client,
        job,
        "blocks",
        file_entry("a", 0, 99),
        file_entry("b", 100, 199),
        file_entry("c", 200, 299),
    )
    register_files(client, job, "blocks", file_entry("b-short", 100, 150, 5))
    assert progress_of(client, job) == expected_progress(0, 150, 2, 6)


def test_several_tables_at_once(client, job):
    register_files(
        client,
        job,
        "blocks",
        file_entry("0.parquet", 0, 99, 1),
        file_entry("1.parquet", 100, 199, 2),
    )
    register_files(
        client,
        job,
        "transactions",
        file_entry("0.parquet", 0, 49, 10),
        file_entry("2.parquet", 60, 99, 20),
    )
    register_files(client, job, "Logs_2", file_entry("x", 7, 7, 0))
    assert tables(client, job) == {
        "blocks": expected_progress(0, 199, 2, 3),
        "transactions": expected_progress(0, 49, 1, 10),
        "Logs_2": expected_progress(7, 7, 1, 0),
    }
    # Another job's tables are its own.
    other = new_job(client)
    register_files(client, other, "blocks", file_entry("0.parquet", 5, 9, 1))
    assert tables(client, other) == {"blocks": expected_progress(5, 9, 1, 1)}
    assert tables(client, job)["blocks"] == expected_progress(0, 199, 2, 3)


def test_refused_registrations_leave_no_table(client, job):
    # Invalid: the whole batch is refused, so the table never appears.
    bad = file_entry("b", 10, 5)
    register_files(client, job, "blocks", file_entry("a", 0, 9), bad, expect=400)
    assert tables(client, job) == {}
    register_files(client, job, "blocks", file_entry("a", 0, 9, 1))
    # A conflict in a batch stores nothing of it (all or nothing).
    body = register_files(
        client, job, "blocks", file_entry("b", 10, 19, 2), file_entry("a", 0, 9, 999), expect=409
    ).get_json()
    assert body["error_code"] == "FILE_CONFLICT"
    assert tables(client, job) == {"blocks": expected_progress(0, 9, 1, 1)}
    # "b" was not stored: other fields under its name are no conflict.
    register_files(client, job, "blocks", file_entry("b", 10, 19, 4))
    assert tables(client, job) == {"blocks": expected_progress(0, 19, 2, 5)}
    # A terminal job takes no files: no new table either.
    client.put(f"/jobs/{job}/status", json={"status": "FAILED"})
    body = register_files(client, job, "transactions", file_entry("t", 0, 9), expect=409).get_json()
    assert body["error_code"] == "JOB_CONFLICT"
    assert tables(client, job) == {"blocks": expected_progress(0, 19, 2, 5)}


def test_an_identical_retry_changes_nothing(client, job):
    register_files(client, job, "blocks", file_entry("a", 0, 99, 1), file_entry("b", 100, 199, 2))
    register_files(client, job, "blocks", file_entry("a2", 0, 49, 4))
    assert progress_of(client, job) == expected_progress(0, 49, 1, 4)
    # Re-sending "a" must not make it the most recent registration at block 0.
    body = register_files(client, job, "blocks", file_entry("a", 0, 99, 1), expect=200).get_json()
    assert body["registered"] == 0 and body["unchanged"] == 1
    assert progress_of(client, job) == expected_progress(0, 49, 1, 4)


def test_total_size_beyond_2_to_the_63(client, job):
    register_files(
        client,
        job,
        "blocks",
        file_entry("a", 0, 0, MAX_ID),
        file_entry("b", 1, 1, MAX_ID),
        file_entry("c", 2, 2, MAX_ID),
    )
    raw = client.get(f"/jobs/{job}/progress").get_data()
    # An exact JSON integer, not a float.
    assert str(3 * MAX_ID).encode() in raw
    entry = json.loads(raw)["tables"]["blocks"]
    assert entry == expected_progress(0, 2, 3, 3 * MAX_ID)
    assert isinstance(entry["total_size_bytes"], int)
    # And it keeps summing incrementally.
    register_files(client, job, "blocks", file_entry("d", 3, 3, MAX_ID))
    assert progress_of(client, job)["total_size_bytes"] == 4 * MAX_ID


def test_blocks_at_the_top_of_the_range(client, job):
    register_files(
        client,
        job,
        "blocks",
        file_entry("a", MAX_ID - 10, MAX_ID - 1, 1),
        file_entry("b", MAX_ID, MAX_ID, 2),
    )
    assert progress_of(client, job) == expected_progress(MAX_ID - 10, MAX_ID, 2, 3)


def test_progress_of_unknown_and_invalid_jobs(client):
    response = client.get("/jobs/12345/progress")
    assert response.status_code == 404
    assert response.get_json()["error_code"] == "JOB_NOT_FOUND"
    response = client.get("/jobs/abc/progress")
    assert response.status_code == 400
    assert response.get_json()["error_code"] == "INVALID_JOB_ID"
