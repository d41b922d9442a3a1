"""POST /jobs/{job_id}/tables/{table}/files (docs/API.md, "POST
/jobs/{job_id}/tables/{table}/files"): one file or a batch, identical retries,
conflicts (all or nothing), only while the job is active; every malformed file,
batch or table name refused with nothing changed. The canonical chain the files
make is test_progress.py's.

Successful answers are checked by support.checked, refusals by support.refusals.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest

from support.checked import body_of, create, drive, events, get_job, make_job, names, progress
from support.databases import count_job_rows
from support.oracle import ACTIVE, STATUSES
from support.refusals import refused, short, unchanged
from support.service import MAX_ID, assert_error, block_hash, file_entry, register_files

# ---- Registered ----------------------------------------------------------------------


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


# ---- Refused files -------------------------------------------------------------------


GOOD = file_entry("b1", 10, 19, 5)


GOOD2 = file_entry("b2", 20, 29, 5)


HASH = "0x" + "a" * 64


def without(file: dict, key: str) -> dict:
    return {k: v for k, v in file.items() if k != key}


BLOCK_VALUES_BAD = [-1, 2**63, 2**64, 10**30, "10", "", 1.5, True, False, None, [], {}]


HASHES_BAD = [
    "",
    "0x",
    "0x" + "a" * 63,
    "0x" + "a" * 65,
    "a" * 64,
    "00" + "a" * 64,
    "0x" + "g" * 64,
    "0x" + "a" * 64 + "\n",
    " 0x" + "a" * 64,
    "0x" + "a" * 63 + "\x00",
    1,
    True,
    [],
    {},
]


FILES_BAD = [
    *[(without(GOOD, k), k) for k in ("file_name", "start_block", "end_block", "size_bytes")],
    *[([GOOD, without(GOOD2, k)], k) for k in ("file_name", "start_block", "end_block")],
    ({}, "file_name"),
    ([{}], "file_name"),
    *[({**GOOD, "start_block": v}, "start_block") for v in BLOCK_VALUES_BAD],
    *[({**GOOD, "end_block": v}, "end_block") for v in BLOCK_VALUES_BAD],
    *[({**GOOD, "size_bytes": v}, "size_bytes") for v in BLOCK_VALUES_BAD],
    ({**GOOD, "start_block": 20, "end_block": 19}, "end_block"),
    ({**GOOD, "start_block": MAX_ID, "end_block": 0}, "end_block"),
    ([GOOD, {**GOOD2, "start_block": 30}], "end_block"),
    *[({**GOOD, "block_hash": v}, "block_hash") for v in HASHES_BAD],
    *[({**GOOD, "prev_hash": v}, "prev_hash") for v in HASHES_BAD],
    *[({**GOOD, "file_name": v}, "file_name") for v in ["", None, 1, True, [], {}, "a\x00b"]],
    ({**GOOD, "extra": 1}, "extra"),
    ({**GOOD, "table": "blocks"}, "table"),
    ({**GOOD, "job_id": 1}, "job_id"),
    ([GOOD, {**GOOD2, "extra": 1}], "extra"),
    ([GOOD, GOOD], "file_name"),
    ([GOOD, {**GOOD, "size_bytes": 6}], "file_name"),
    ([GOOD, GOOD2, {**GOOD2, "start_block": 21}], "file_name"),
    ([GOOD, 1], None),
    ([GOOD, None], None),
    ([GOOD, [GOOD2]], None),
    ([], None),
    ([[]], None),
]


@pytest.mark.parametrize(("body", "field"), FILES_BAD, ids=short)
def test_file_registration_refuses(client, db_conn, targets, body, field):
    with unchanged(db_conn):
        for status in ("SCHEDULED", "RUNNING"):
            url = f"/jobs/{targets[status]}/tables/blocks/files"
            refused(client, db_conn, "POST", url, body, field)
        refused(client, db_conn, "POST", "/jobs/999/tables/blocks/files", body, field)


def test_file_batches_over_1000_are_refused(client, db_conn, targets):
    with unchanged(db_conn):
        batch = [file_entry(f"n{i:04}", 100 + i * 10, 109 + i * 10, 1) for i in range(1001)]
        url = f"/jobs/{targets['RUNNING']}/tables/blocks/files"
        refused(client, db_conn, "POST", url, batch, "1000")
        # One bad file anywhere in a batch refuses all of it, and says which.
        batch = batch[:1000]
        batch[637] = {**batch[637], "size_bytes": -5}
        message = refused(client, db_conn, "POST", url, batch, "size_bytes")
        assert "637" in message


@pytest.mark.parametrize(
    "table",
    ["1abc", "9", "a" * 64, "a-b", "a.b", "a b", " a", "a ", "a\n", "é", "tablé", "a$", "a\x00b"],
)
def test_bad_table_names_are_refused(client, db_conn, targets, table):
    with unchanged(db_conn):
        for job_id in [*targets.values(), 999]:
            url = f"/jobs/{job_id}/tables/{quote(table, safe='')}/files"
            refused(client, db_conn, "POST", url, GOOD, "table")
