"""docs/API.md, "Conventions", on every route at once, through the Flask test client:
job IDs in the path; bodies that are no JSON object, nested too deeply, empty, over
1 MiB or shorter than they announced; unknown routes (404) and methods (405),
OPTIONS; query parameters and bodies a route does not take.

Every malformed input gets its documented 4xx with the exact error shape, never a
500, and changes nothing: each refusal is checked against the rows of every table
a request can write, read before and after (support.refusals). What one route
refuses of its own input is that route's module's, in tests/routes/.
"""

from __future__ import annotations

import io
import json
from urllib.parse import quote

import pytest

from support.refusals import (
    BAD_IDS,
    create_id,
    db_rows,
    move,
    refused,
    send,
    unchanged,
)
from support.service import MAX_ID, assert_error, file_entry

MIB = 1024 * 1024


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
# GET /jobs's and DELETE /jobs's own are tests/routes/test_get_jobs.py's and
# test_delete_jobs.py's.

NO_QUERY_ROUTES = [
    ("GET", "/jobs/{}"),
    ("GET", "/jobs/{}/progress"),
    ("GET", "/jobs/{}/events"),
    ("PUT", "/jobs/{}/stop"),
    ("POST", "/jobs/{}/stop"),
    ("DELETE", "/jobs/{}"),
]


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
