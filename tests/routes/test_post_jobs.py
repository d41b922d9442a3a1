"""POST /jobs (docs/API.md, "POST /jobs"): the job created, its descriptor kept
exactly as sent, the idempotency key; every malformed body refused with nothing
changed; the descriptor's bound as PostgreSQL writes it back (docs/API.md, "Bounds").

Successful answers are checked by support.checked (the documented shapes and the
marshmallow schemas), refusals by support.refusals (every row unchanged).
"""

from __future__ import annotations

import pytest

from jobs.domain import MAX_DESCRIPTOR_BYTES

from support.checked import (
    all_jobs,
    body_of,
    check_job,
    create,
    event_types,
    events,
    get_job,
    list_jobs,
    make_job,
    report,
)
from support.refusals import create_id, refused, short, unchanged
from support.service import MAX_ID, assert_error

# ---- Created -------------------------------------------------------------------------


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


# ---- The idempotency key -------------------------------------------------------------


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


# ---- Refused bodies ------------------------------------------------------------------


NODE_IDS_BAD = [
    None,
    1,
    True,
    1.5,
    [],
    {},
    "",
    "1abc",
    "-abc",
    "_abc",
    ".abc",
    "a b",
    "a/b",
    "a@b",
    "a:b",
    "é",
    "wörker",
    "a" * 129,
    "a\x00b",
    "worker-01\n",
    "\nworker",
    " worker",
    "worker ",
]


DESCRIPTORS_BAD = [
    None,
    [],
    "x",
    1,
    True,
    1.5,
    [{"a": 1}],
    {"a": "x\x00"},
    {"a\x00": 1},
    {"a": ["\x00"]},
    {"a": {"b": {"c": "\x00"}}},
]


CREATE_BAD = [
    ({}, "node_id"),
    ({"descriptor": {}}, "node_id"),
    ({"idempotency_key": "k"}, "node_id"),
    *[({"node_id": v, "descriptor": {}}, "node_id") for v in NODE_IDS_BAD],
    *[({"node_id": "w", "descriptor": v}, "descriptor") for v in DESCRIPTORS_BAD],
    *[
        ({"node_id": "w", "idempotency_key": v}, "idempotency_key")
        for v in ["", "k" * 257, 1, True, [], {}, "a\x00"]
    ],
    ({"node_id": "w", "extra": 1}, "extra"),
    ({"node_id": "w", "status": "RUNNING"}, "status"),
    ({"node_id": "w", "id": 5}, "id"),
    ({"node_id": "w", "created_at": "2026-01-01T00:00:00.000000Z"}, "created_at"),
    ([{"node_id": "w"}], None),
    ([], None),
]


@pytest.mark.parametrize(("body", "field"), CREATE_BAD, ids=short)
def test_create_job_refuses(client, db_conn, body, field):
    create_id(client, idempotency_key="k")
    with unchanged(db_conn):
        refused(client, db_conn, "POST", "/jobs", body, field)


def test_create_job_refusal_does_not_depend_on_the_idempotency_key(client, db_conn):
    job_id = create_id(client, idempotency_key="same")
    with unchanged(db_conn):
        body = {"node_id": "1bad", "idempotency_key": "same"}
        refused(client, db_conn, "POST", "/jobs", body, "node_id")
        body = {"node_id": "w", "idempotency_key": "same", "extra": 1}
        refused(client, db_conn, "POST", "/jobs", body, "extra")
    assert client.get(f"/jobs/{job_id}").status_code == 200


# ---- The descriptor's bound ----------------------------------------------------------


def test_a_descriptor_cannot_grow_past_a_mebibyte_as_written_back(client):
    # 3,500 numbers of 5 bytes (a 20 kB body) that PostgreSQL writes as 301 digits each.
    blown = b'{"node_id": "w", "descriptor": {"n": [' + b",".join([b"1e300"] * 3500) + b"]}}"
    message = assert_error(client.post("/jobs", data=blown), 400, "INVALID_PAYLOAD_FORMAT")
    assert message.startswith("descriptor: ") and str(MAX_DESCRIPTOR_BYTES) in message
    # The same count of plain numbers is fine, and so is a descriptor near the body limit.
    plain = b'{"node_id": "w", "descriptor": {"n": [' + b",".join([b"1e3"] * 3500) + b"]}}"
    assert client.post("/jobs", data=plain).status_code == 201
    big = {"node_id": "w", "descriptor": {"pad": "x" * (1024 * 1024 - 100)}}
    assert client.post("/jobs", json=big).status_code == 201
