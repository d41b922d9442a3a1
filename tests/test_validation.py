"""Input validation of docs/API.md (Conventions) through the Flask test client.

Every malformed input gets its documented 4xx with the exact error shape,
never a 500, and changes nothing: each refusal is checked against the rows of
every table a request can write, read before and after (``db_rows``). What the
API shows is read from those rows and nothing else, so the same rows show the
same list, events and progress. Jobs exist at the IDs a lenient parser would turn a bad ID into
(``+1``, `` 1``, Arabic-Indic ``1``, ``1_0``...), so acting on a misparsed ID shows up.
"""

from __future__ import annotations

import io
import json
from urllib.parse import quote

import pytest

from support.databases import built_once
from support.refusals import (
    BAD_IDS,
    PATH_TO,
    built_targets,
    built_world,
    create_id,
    db_rows,
    move,
    refused,
    send,
    short,
    unchanged,
)
from support.service import MAX_ID, assert_error, file_entry, register_files

MIB = 1024 * 1024


@pytest.fixture
def world(client):
    """Jobs 1..12 in every status (support.refusals.built_world): {id: status}."""
    return built_world(client)


# ---- Job IDs in the path -----------------------------------------------------------

VALID_FILE = file_entry("new-file", 10, 19, 1)
ID_ROUTES = [
    ("GET", "/jobs/{}", None, 404),
    ("GET", "/jobs/{}/progress", None, 404),
    ("GET", "/jobs/{}/events", None, 404),
    ("PUT", "/jobs/{}/stop", None, 404),
    ("POST", "/jobs/{}/stop", None, 404),
    ("PUT", "/jobs/{}/status", {"status": "RUNNING"}, 404),
    ("PUT", "/jobs/{}/status", {"status": "FAILED"}, 404),
    ("PUT", "/jobs/{}/status", {"status": "SCHEDULED", "node_id": "w"}, 404),
    ("POST", "/jobs/{}/tables/blocks/files", VALID_FILE, 404),
    ("DELETE", "/jobs/{}", None, 204),
]
ROUTE_IDS = [f"{m} {u.replace('{}', 'ID')} {b or ''}" for m, u, b, _ in ID_ROUTES]


@pytest.mark.parametrize(("method", "url", "body", "unknown_status"), ID_ROUTES, ids=ROUTE_IDS)
def test_invalid_job_id_in_path_is_400(client, db_conn, world, method, url, body, unknown_status):
    before = db_rows(db_conn)
    for bad in BAD_IDS:
        response = send(client, method, url.format(quote(bad, safe="")), body)
        assert response.status_code == 400, (bad, response.status_code, response.data[:200])
        assert_error(response, 400, "INVALID_JOB_ID")
    assert db_rows(db_conn) == before


@pytest.mark.parametrize(("method", "url", "body", "unknown_status"), ID_ROUTES, ids=ROUTE_IDS)
def test_largest_job_id_is_valid(client, db_conn, world, method, url, body, unknown_status):
    before = db_rows(db_conn)
    for job_id in (str(MAX_ID), "13", "1000000"):
        response = send(client, method, url.format(job_id), body)
        if unknown_status == 404:
            assert_error(response, 404, "JOB_NOT_FOUND")
        else:
            assert response.status_code == 204, (job_id, response.data)
            assert response.data == b""
    assert db_rows(db_conn) == before


@pytest.mark.parametrize(
    "url",
    ["/jobs//progress", "/jobs//events", "/jobs//stop", "/jobs//status", "/jobs//tables/t/files"],
)
def test_an_empty_job_id_is_never_a_server_error(client, url):
    # An empty segment cannot reach the route (Werkzeug merges or refuses it):
    # whatever the answer, it is not a 5xx and not an HTML error page.
    for method in ("GET", "PUT", "POST", "DELETE"):
        response = client.open(url, method=method)
        assert response.status_code < 500
        if response.status_code >= 400:
            assert response.mimetype == "application/json"
            assert set(response.get_json()) == {"error_code", "error_message"}


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_jobs_with_a_trailing_slash_is_a_json_404(client, method):
    assert_error(client.open("/jobs/", method=method), 404, "NOT_FOUND")


# ---- GET /jobs query parameters ------------------------------------------------------


def test_invalid_last_job_id_is_400(client, db_conn, world):
    before = db_rows(db_conn)
    for bad in [*BAD_IDS, ""]:
        response = client.get("/jobs?last_job_id=" + quote(bad, safe=""))
        assert response.status_code == 400, (bad, response.status_code, response.data[:200])
        message = assert_error(response, 400, "INVALID_QUERY_PARAMETERS")
        assert "last_job_id" in message
    assert db_rows(db_conn) == before


def test_valid_last_job_id_bounds(client, world):
    everything = client.get("/jobs?status=all&last_job_id=9223372036854775807").get_json()
    assert [j["id"] for j in everything["jobs"]] == list(range(12, 0, -1))
    assert client.get("/jobs?status=all&last_job_id=1").get_json() == {
        "jobs": [],
        "next_cursor": None,
    }
    older = client.get("/jobs?status=all&last_job_id=3").get_json()
    assert [j["id"] for j in older["jobs"]] == [2, 1]


@pytest.mark.parametrize(
    ("limit", "code"),
    [
        ("abc", "INVALID_QUERY_PARAMETERS"),
        ("1.5", "INVALID_QUERY_PARAMETERS"),
        ("1.0", "INVALID_QUERY_PARAMETERS"),
        ("", "INVALID_QUERY_PARAMETERS"),
        (" ", "INVALID_QUERY_PARAMETERS"),
        ("1e3", "INVALID_QUERY_PARAMETERS"),
        ("0x10", "INVALID_QUERY_PARAMETERS"),
        ("10abc", "INVALID_QUERY_PARAMETERS"),
        ("1,5", "INVALID_QUERY_PARAMETERS"),
        ("--1", "INVALID_QUERY_PARAMETERS"),
        ("1_0", "INVALID_QUERY_PARAMETERS"),
        ("\u0661", "INVALID_QUERY_PARAMETERS"),
        ("¹", "INVALID_QUERY_PARAMETERS"),
        ("\uff11\uff10", "INVALID_QUERY_PARAMETERS"),
        ("five", "INVALID_QUERY_PARAMETERS"),
        ("null", "INVALID_QUERY_PARAMETERS"),
        ("0", "LIMIT_INVALID"),
        ("00", "LIMIT_INVALID"),
        ("-1", "LIMIT_INVALID"),
        ("-1000", "LIMIT_INVALID"),
        ("-99999999999999999999", "LIMIT_INVALID"),
        ("1001", "LIMIT_TOO_LARGE"),
        ("1000000", "LIMIT_TOO_LARGE"),
        ("99999999999999999999", "LIMIT_TOO_LARGE"),
        ("9" * 1000, "LIMIT_TOO_LARGE"),
        # Longer than Python's int() will parse by default (4300 digits).
        ("9" * 5000, "LIMIT_TOO_LARGE"),
    ],
)
def test_invalid_limit(client, limit, code):
    create_id(client)
    message = assert_error(client.get("/jobs", query_string={"limit": limit}), 400, code)
    assert "limit" in message


@pytest.mark.parametrize("limit", ["1", "2", "999", "1000"])
def test_valid_limit(client, world, limit):
    body = client.get("/jobs", query_string={"status": "all", "limit": limit}).get_json()
    n = int(limit)
    assert [j["id"] for j in body["jobs"]] == list(range(12, 0, -1))[:n]
    assert body["next_cursor"] == (12 - n + 1 if n < 12 else None)


@pytest.mark.parametrize(
    "status",
    [
        "",
        ",",
        " ",
        "running,",
        ",running",
        "running,,failed",
        "running, ,failed",
        "bogus",
        "runnin",
        "runningg",
        "stop requested",
        "STOP-REQUESTED",
        "stoprequested",
        "*",
        "running;failed",
        "running|failed",
        "active terminal",
        "1",
        "null",
        "cancelled",
        "running\x00",
    ],
)
def test_invalid_status_filter(client, world, status):
    response = client.get("/jobs", query_string={"status": status})
    message = assert_error(response, 400, "INVALID_QUERY_PARAMETERS")
    assert "status" in message


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status=Running", {2, 9}),
        ("status=%20running%20", {2, 9}),
        ("status=running+,+STOPPED", {2, 9, 6}),
        ("status=%20error%20,%20Completed", {7, 10, 5, 11}),
        ("status=ACTIVE", {1, 2, 3, 4, 8, 9, 12}),
        ("status=Terminal", {5, 6, 7, 10, 11}),
        ("status=aLL", set(range(1, 13))),
        ("status=stop_requested,stopping", {3, 4}),
        ("", {1, 2, 3, 4, 8, 9, 12}),
    ],
)
def test_valid_status_filters(client, world, query, expected):
    response = client.get("/jobs?" + query)
    assert response.status_code == 200, response.data
    ids = [j["id"] for j in response.get_json()["jobs"]]
    assert ids == sorted(expected, reverse=True)


# ---- Bodies: every route that reads one --------------------------------------------

# Not JSON at all (or not UTF-8, or not finite): no field to name.
NOT_JSON = [
    pytest.param(b"{", id="open-brace"),
    pytest.param(b"}", id="close-brace"),
    pytest.param(b'{"node_id": "w",}', id="trailing-comma"),
    pytest.param(b"{'node_id': 'w'}", id="single-quotes"),
    pytest.param(b'{"node_id": "w"} {}', id="two-values"),
    pytest.param(b'{"node_id": "w"} x', id="trailing-garbage"),
    pytest.param(b"NaN", id="nan"),
    pytest.param(b'{"node_id": "w", "descriptor": {"a": NaN}}', id="nan-inside"),
    pytest.param(b'{"node_id": "w", "descriptor": {"a": Infinity}}', id="infinity"),
    pytest.param(b'{"node_id": "w", "descriptor": {"a": 1e400}}', id="overflowing-float"),
    pytest.param(b'{"node_id": "w", "descriptor": {"a": "\\ud800"}}', id="lone-surrogate"),
    pytest.param(b'{"node_id": "w\xff"}', id="invalid-utf8"),
    pytest.param(b'{"node_id": "w", "descriptor": {"a": "\xc3"}}', id="truncated-utf8"),
    pytest.param(b"\x00", id="nul-byte"),
    pytest.param(b'{"node_id": "w", /* c */ "descriptor": {}}', id="comment"),
    pytest.param(b"undefined", id="undefined"),
]
EMPTY_BODIES = [pytest.param(b"", id="empty"), pytest.param(b" \n\t ", id="whitespace")]
NOT_OBJECTS = [
    pytest.param(b"null", id="null"),
    pytest.param(b'"text"', id="string"),
    pytest.param(b"1", id="number"),
    pytest.param(b"true", id="bool"),
]


@pytest.fixture
def targets(client):
    """Jobs in the statuses a body could act on (support.refusals.built_targets): {status: id}."""
    return built_targets(client)


def body_routes(targets):
    """(method, url) of every route with a body, aimed at jobs it could change."""
    routes = [("POST", "/jobs"), ("DELETE", "/jobs")]
    for job_id in targets.values():
        routes.append(("PUT", f"/jobs/{job_id}/status"))
        routes.append(("POST", f"/jobs/{job_id}/tables/blocks/files"))
    return routes


@pytest.mark.parametrize("body", NOT_JSON + NOT_OBJECTS)
def test_malformed_bodies_are_400_everywhere(client, db_conn, targets, body):
    with unchanged(db_conn):
        for method, url in body_routes(targets):
            # null says nothing, on every route: DELETE /jobs then lacks its ?status=.
            says_nothing = body == b"null" and (method, url) == ("DELETE", "/jobs")
            code = "INVALID_QUERY_PARAM" if says_nothing else "INVALID_PAYLOAD_FORMAT"
            refused(client, db_conn, method, url, body, None, code)


def nested(depth: int, leaf=1):
    """A JSON value whose arrays nest ``depth`` levels deep."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# A body nested deeper than 100 levels, with and without an integer beyond 64
# bits (which is parsed a second time): deep enough to exhaust recursive
# checks, it once answered 500. Written by hand: json.dumps cannot nest 1000.
@pytest.mark.parametrize("depth", [101, 400, 1000])
@pytest.mark.parametrize("leaf", ["1", "123456789012345678901234567890"])
def test_bodies_nested_too_deeply_are_400_everywhere(client, db_conn, targets, depth, leaf):
    deep = "[" * depth + leaf + "]" * depth
    bodies = {
        "POST": '{"node_id": "w", "descriptor": {"d": ' + deep + "}}",
        "PUT": '{"status": "FAILED", "detail": {"d": ' + deep + "}}",
    }
    with unchanged(db_conn):
        for method, url in body_routes(targets):
            body = bodies.get(method, deep).encode()
            message = refused(client, db_conn, method, url, body, None)
            assert "nested deeper than 100 levels" in message, (method, url, message)


def test_a_body_nested_exactly_100_levels_is_accepted(client):
    # The body object, the descriptor object, then 98 arrays.
    descriptor = {"d": nested(98, 123456789012345678901234567890)}
    response = client.post("/jobs", json={"node_id": "w", "descriptor": descriptor})
    assert response.status_code == 201, response.data
    assert response.get_json()["descriptor"] == descriptor
    assert client.get(f"/jobs/{response.get_json()['id']}").get_json()["descriptor"] == descriptor


@pytest.mark.parametrize("body", EMPTY_BODIES)
def test_empty_bodies_are_400(client, db_conn, targets, body):
    with unchanged(db_conn):
        for method, url in body_routes(targets):
            if method == "DELETE":
                # DELETE /jobs without a body is "status is missing" (docs/API.md, DELETE /jobs).
                message = refused(client, db_conn, method, url, body, None, "INVALID_QUERY_PARAM")
                assert "status" in message
            else:
                refused(client, db_conn, method, url, body, None)


def test_bodies_are_json_whatever_the_content_type(client, db_conn, targets):
    # A body that is not JSON is refused even when labelled as something else.
    with unchanged(db_conn):
        for method, url in body_routes(targets):
            response = client.open(url, method=method, data="node_id=w", content_type="text/plain")
            assert_error(response, 400, "INVALID_PAYLOAD_FORMAT")


# ---- POST /jobs ------------------------------------------------------------------------

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


# ---- PUT /jobs/{id}/status --------------------------------------------------------------

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


# ---- POST /jobs/{id}/tables/{table}/files ------------------------------------------------

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


# ---- DELETE /jobs with {"job_ids": [...]} ---------------------------------------------

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
    """Three terminal jobs (1..3) and an active one (4) (built once, as ``world``)."""
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


# ---- 413, 404, 405 ---------------------------------------------------------------------


def padded(body: dict, size: int) -> bytes:
    """``body`` as JSON of exactly ``size`` bytes (trailing whitespace is still JSON)."""
    data = json.dumps(body).encode()
    assert len(data) <= size
    return data + b" " * (size - len(data))


def chunked(client, method, url, data: bytes):
    """As gunicorn hands over a chunked request: no Content-Length, a terminated stream."""
    return client.open(
        url,
        method=method,
        input_stream=io.BytesIO(data),
        headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"},
        environ_overrides={"wsgi.input_terminated": True},
    )


def big_bodies(targets):
    running = targets["RUNNING"]
    return [
        ("POST", "/jobs", {"node_id": "w", "descriptor": {}}),
        ("PUT", f"/jobs/{running}/status", {"status": "FAILED"}),
        ("POST", f"/jobs/{running}/tables/blocks/files", file_entry("big", 10, 19)),
        ("DELETE", "/jobs", {"job_ids": [targets["COMPLETED"]]}),
    ]


def test_bodies_over_1_mib_are_413(client, db_conn, targets):
    with unchanged(db_conn):
        for method, url, body in big_bodies(targets):
            for size in (MIB + 1, 2 * MIB, 5 * MIB):
                response = send(client, method, url, padded(body, size))
                assert_error(response, 413, "PAYLOAD_TOO_LARGE")


def test_chunked_bodies_over_1_mib_are_413(client, db_conn, targets):
    # gunicorn passes a chunked body (no Content-Length) as a terminated stream:
    # the limit must hold there too, not cut the body at 1 MiB and parse the rest.
    with unchanged(db_conn):
        for method, url, body in big_bodies(targets):
            for size in (MIB + 1, 3 * MIB):
                response = chunked(client, method, url, padded(body, size))
                assert_error(response, 413, "PAYLOAD_TOO_LARGE")


def test_a_body_of_exactly_1_mib_is_accepted(client, targets):
    running = targets["RUNNING"]
    response = send(client, "POST", "/jobs", padded({"node_id": "w", "descriptor": {}}, MIB))
    assert response.status_code == 201, response.data[:200]
    filler = "x" * (MIB - 100)
    response = send(
        client, "POST", "/jobs", padded({"node_id": "w", "descriptor": {"a": filler}}, MIB)
    )
    assert response.status_code == 201, response.data[:200]
    assert response.get_json()["descriptor"] == {"a": filler}
    response = send(client, "PUT", f"/jobs/{running}/status", padded({"status": "FAILED"}, MIB))
    assert response.status_code == 200, response.data[:200]
    # Chunked, exactly at the limit: accepted too.
    response = chunked(client, "POST", "/jobs", padded({"node_id": "w"}, MIB))
    assert response.status_code == 201, response.data[:200]
    response = chunked(client, "PUT", f"/jobs/{running}/status", padded({"status": "FAILED"}, 100))
    assert response.status_code == 200, response.data[:200]


@pytest.mark.parametrize(
    "url",
    [
        "/",
        "/nope",
        "/JOBS",
        "/jobs/1/nope",
        "/jobs/1/",
        "/jobs/1/tables",
        "/jobs/1/tables/blocks",
        "/jobs/1/tables/blocks/files/x",
        "/jobs/1/progress/x",
        "/jobs/abc/nope",
        "/api/jobs",
        # Empty segments: no HTML redirect to a merged path, a JSON 404.
        "/jobs//progress",
        "/jobs/1//events",
        "//jobs",
        "/jobs//",
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH"])
def test_unknown_routes_are_json_404(client, method, url):
    assert_error(client.open(url, method=method), 404, "NOT_FOUND")


@pytest.mark.parametrize(
    ("method", "url", "allowed"),
    [
        ("PATCH", "/jobs", {"GET", "POST", "DELETE"}),
        ("PUT", "/jobs", {"GET", "POST", "DELETE"}),
        ("POST", "/jobs/1", {"GET", "DELETE"}),
        ("PUT", "/jobs/1", {"GET", "DELETE"}),
        ("PATCH", "/jobs/abc", {"GET", "DELETE"}),
        ("GET", "/jobs/1/stop", {"PUT", "POST"}),
        ("DELETE", "/jobs/1/stop", {"PUT", "POST"}),
        ("GET", "/jobs/1/status", {"PUT"}),
        ("POST", "/jobs/1/status", {"PUT"}),
        ("PATCH", "/jobs/1/status", {"PUT"}),
        ("GET", "/jobs/1/tables/blocks/files", {"POST"}),
        ("PUT", "/jobs/1/tables/blocks/files", {"POST"}),
        ("DELETE", "/jobs/1/tables/blocks/files", {"POST"}),
        ("POST", "/jobs/1/progress", {"GET"}),
        ("DELETE", "/jobs/1/events", {"GET"}),
    ],
)
def test_wrong_methods_are_json_405(client, db_conn, world, method, url, allowed):
    before = db_rows(db_conn)
    response = client.open(url, method=method, json={"status": "FAILED"})
    assert_error(response, 405, "METHOD_NOT_ALLOWED")
    allow = {m.strip() for m in response.headers["Allow"].split(",")}
    assert allowed <= allow
    assert method not in allow
    assert db_rows(db_conn) == before


# ---- Parameters and bodies a route does not take ---------------------------------
# Silently ignoring them answers something the caller did not ask for (a
# misspelt filter lists every active job; a repeated limit is decided by the
# first value): each is a 400 that names the parameter, with nothing changed.

NO_QUERY_ROUTES = [
    ("GET", "/jobs/{}"),
    ("GET", "/jobs/{}/progress"),
    ("GET", "/jobs/{}/events"),
    ("PUT", "/jobs/{}/stop"),
    ("POST", "/jobs/{}/stop"),
    ("DELETE", "/jobs/{}"),
]


@pytest.mark.parametrize(
    ("query", "name", "code"),
    [
        ("?stauts=running", "stauts", "INVALID_QUERY_PARAMETERS"),
        ("?limit=1&limit=abc", "limit", "INVALID_QUERY_PARAMETERS"),
        ("?limit=5&limit=5", "limit", "INVALID_QUERY_PARAMETERS"),
        ("?status=running&status=bogus", "status", "INVALID_QUERY_PARAMETERS"),
        ("?last_job_id=5&last_job_id=9", "last_job_id", "INVALID_QUERY_PARAMETERS"),
        ("?node=worker-01", "node", "INVALID_QUERY_PARAMETERS"),
    ],
)
def test_list_refuses_unknown_and_repeated_parameters(client, db_conn, query, name, code):
    create_id(client)
    message = refused(client, db_conn, "GET", "/jobs" + query, None, None, code)
    assert repr(name) in message, message


@pytest.mark.parametrize(
    "query", ["?status=failed&status=completed", "?status=failed&force=1", "?Status=failed"]
)
def test_bulk_delete_refuses_unknown_and_repeated_parameters(client, db_conn, query):
    job = create_id(client)
    move(client, job, "FAILED")
    refused(client, db_conn, "DELETE", "/jobs" + query, None, None, "INVALID_QUERY_PARAM")


@pytest.mark.parametrize(("method", "route"), NO_QUERY_ROUTES)
def test_routes_without_parameters_refuse_any(client, db_conn, method, route):
    job = create_id(client)
    message = refused(
        client,
        db_conn,
        method,
        route.format(job) + "?force=true",
        None,
        None,
        "INVALID_QUERY_PARAMETERS",
    )
    assert "'force'" in message, message


@pytest.mark.parametrize(("method", "route"), [*NO_QUERY_ROUTES, ("GET", "/jobs")])
@pytest.mark.parametrize("body", [{"force": True}, [1], b"x", b'"stop"', b"0"])
def test_routes_without_a_body_refuse_one_that_says_something(client, db_conn, method, route, body):
    job = create_id(client)
    refused(client, db_conn, method, route.format(job), body, "body")


@pytest.mark.parametrize(("method", "route"), [*NO_QUERY_ROUTES, ("GET", "/jobs")])
@pytest.mark.parametrize("body", [b"", b"  \n", b"{}", b"null", b" {} "])
def test_routes_without_a_body_accept_an_empty_one(client, method, route, body):
    job = create_id(client)
    move(client, job, "FAILED")  # deletable, and the stop a no-op
    response = send(client, method, route.format(job), body)
    assert response.status_code in (200, 204), response.data


@pytest.mark.parametrize("path", ["/jobs", "/jobs/1", "/jobs/1/stop", "/healthz", "/nope"])
def test_options_is_a_json_error_not_an_empty_page(client, path):
    response = client.open(path, method="OPTIONS")
    assert_error(
        response,
        405 if path != "/nope" else 404,
        "METHOD_NOT_ALLOWED" if path != "/nope" else "NOT_FOUND",
    )


@pytest.mark.parametrize(
    ("method", "route", "body"),
    [
        ("POST", "/jobs", b'{"node_id": "w"}'),
        ("PUT", "/jobs/{}/status", b'{"status": "RUNNING"}'),
        ("POST", "/jobs/{}/tables/t/files", json.dumps(file_entry("f", 0, 1)).encode()),
        ("DELETE", "/jobs", b'{"job_ids": [1]}'),
    ],
)
def test_a_body_shorter_than_its_content_length_changes_nothing(
    client, db_conn, method, route, body
):
    """The client announced more than it sent (a cut connection): nothing is acted on."""
    job = create_id(client)
    before = db_rows(db_conn)
    response = client.open(
        route.format(job),
        method=method,
        input_stream=io.BytesIO(body),
        content_type="application/json",
        environ_overrides={"CONTENT_LENGTH": str(len(body) + 84)},
    )
    assert "Content-Length" in assert_error(response, 400, "INVALID_PAYLOAD_FORMAT")
    assert db_rows(db_conn) == before
