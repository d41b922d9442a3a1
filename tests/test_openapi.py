"""GET /openapi.json (docs/API.md, GET /openapi.json): a valid OpenAPI 3 document that covers
every route and method the Flask app registers, gives a schema to every
response that has a body, and tells the truth: many real responses (successes
and errors, on every route, with and without auth, with the database down)
are checked against it — their status code documented, their body valid
against the documented schema (OpenAPI 3.0 ``nullable`` turned into JSON
Schema), and every documented status code seen at least once.
"""

from __future__ import annotations

import json
import re
import socket

import jsonschema
import pytest
from openapi_spec_validator import validate as validate_spec
from werkzeug.exceptions import MethodNotAllowed, NotFound

from app import create_app
from dev.gunicorn import serving
from jobs import db

from support.databases import closed_database_url
from support.openapi_schema import to_json_schema
from support.races import race
from support.service import file_entry

ADMIN = "openapi-admin-token"
WORKER = "openapi-worker-token"


@pytest.fixture(scope="module")
def doc():
    app = create_app({"TESTING": True, "DATABASE_URL": closed_database_url()})
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.get_json()


def operations(doc):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in ("get", "put", "post", "delete", "patch", "head", "options", "trace"):
                yield path, method, op


def test_document_is_valid_openapi_3(doc):
    assert doc["openapi"].startswith("3.0.")
    validate_spec(doc)  # raises on any violation, e.g. a duplicate operationId
    ids = [op["operationId"] for _, _, op in operations(doc)]
    assert len(ids) == len(set(ids))


def test_covers_every_route_and_method_of_the_app(doc):
    app = create_app({"TESTING": True, "DATABASE_URL": closed_database_url()})
    registered = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            registered.add((path, method.lower()))
    documented = {(path, method) for path, method, _ in operations(doc)}
    assert registered == documented
    # Every path parameter is declared.
    for path, _, op in operations(doc):
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)}", path)), path
        # Job IDs are documented as docs/API.md (Identifiers) defines them (others are a 400).
        for p in op.get("parameters", []):
            if p["name"] in ("job_id", "last_job_id"):
                assert p["schema"] == {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}
    job_ids = doc["components"]["schemas"]["BulkDelete"]["properties"]["job_ids"]
    assert job_ids["items"] == {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}
    assert job_ids["maxItems"] == 1000


def test_nulls_are_documented_where_the_service_sends_them(client, doc):
    """Real answers with nulls (the last page's cursor, an event without detail) fit
    the document; the same answers with a wrong type where it allows null, or a null
    where it allows none, do not."""
    components = doc["components"]["schemas"]

    def validator(name: str) -> jsonschema.Draft4Validator:
        ref = {"$ref": f"#/components/schemas/{name}"}
        return jsonschema.Draft4Validator(to_json_schema(ref, components))

    job = client.post("/jobs", json={"node_id": "w-1"}).get_json()
    listing = client.get("/jobs").get_json()
    assert listing["next_cursor"] is None
    job_list = validator("JobList")
    assert job_list.is_valid(listing)
    assert not job_list.is_valid({**listing, "next_cursor": str(job["id"])})
    assert not job_list.is_valid({**listing, "jobs": [{**job, "node_id": None}]})
    events = client.get(f"/jobs/{job['id']}/events").get_json()
    (event,) = events["events"]
    assert event["detail"] is None
    event_list = validator("EventList")
    assert event_list.is_valid(events)
    assert event_list.is_valid({**events, "events": [{**event, "node_id": None}]})
    assert not event_list.is_valid({**events, "events": [{**event, "detail": "oom"}]})
    assert not event_list.is_valid({**events, "events": [{**event, "node_id": 5}]})
    assert not event_list.is_valid({**events, "events": [{**event, "id": None}]})


def test_every_response_with_a_body_has_a_schema(doc):
    for path, method, op in operations(doc):
        assert op["responses"], (path, method)
        for code, response in op["responses"].items():
            where = (path, method, code)
            if code in ("204", "304"):
                assert "content" not in response, where
                continue
            assert response.get("content"), f"{where}: a body without a documented schema"
            for media, content in response["content"].items():
                assert "schema" in content, (*where, media)
            if code.startswith(("4", "5")) and code != "503":
                # The Error shape, narrowed to the codes this route answers at this status.
                schema = response["content"]["application/json"]["schema"]
                assert schema["required"] == ["error_code", "error_message"], where
                assert schema["additionalProperties"] is False, where
                assert schema["properties"]["error_message"] == {"type": "string"}, where
                codes = schema["properties"]["error_code"]["enum"]
                assert codes and all(re.fullmatch(r"[A-Z][A-Z0-9_]+", c) for c in codes), where


def test_the_document_declares_the_operational_answers(doc):
    for path, method, op in operations(doc):
        codes = set(op["responses"])
        if path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/ui/", "/ui/{name}"):
            assert "security" not in op, path
            assert "401" not in codes, path
            continue
        assert op["security"] == [{"bearer": []}], (path, method)
        assert {"401", "500"} <= codes, (path, method)
        if "requestBody" in op:
            assert {"400", "413"} <= codes, (path, method)
        if "{job_id}" in path:
            assert "400" in codes, (path, method)
    assert set(doc["paths"]["/readyz"]["get"]["responses"]) == {"200", "503"}
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}


# ---- Real responses against the document -------------------------------------------


class Conformance:
    """Sends requests, checks each response against the document, and remembers
    which documented (path, method, status) were seen."""

    def __init__(self, doc, url_map):
        self.doc = doc
        self.components = doc["components"]["schemas"]
        self.adapter = url_map.bind("localhost")
        self.seen: set[tuple[str, str, str]] = set()
        self.error_schema = to_json_schema({"$ref": "#/components/schemas/Error"}, self.components)

    def __call__(self, client, method, path, expect, **kwargs):
        response = client.open(path, method=method, **kwargs)
        where = f"{method} {path}"
        assert response.status_code == expect, (where, response.get_data(as_text=True)[:300])
        assert response.headers.get("X-Request-ID"), where
        try:
            rule, _ = self.adapter.match(path.split("?")[0], method=method, return_rule=True)
        except (NotFound, MethodNotAllowed):
            # No operation: the body must still be the documented error shape.
            jsonschema.validate(response.get_json(), self.error_schema)
            return response
        template = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        doc_method = "get" if method == "HEAD" else method.lower()
        op = self.doc["paths"][template][doc_method]
        code = str(response.status_code)
        assert code in op["responses"], f"{where}: {code} is not documented"
        self.seen.add((template, doc_method, code))
        documented = op["responses"][code]
        if method == "HEAD":
            assert response.get_data() == b""
            return response
        if "content" not in documented:
            assert response.get_data() == b"", f"{where}: undocumented body"
            return response
        media = response.mimetype
        assert media in documented["content"], f"{where}: {media} is not documented"
        schema = to_json_schema(documented["content"][media]["schema"], self.components)
        if media == "text/event-stream":
            # The schema is each event's (id, event, data), as OpenAPI reads a stream.
            bodies = [
                dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
                for block in response.get_data(True).split("\n\n")
                if block.strip() and not block.startswith(":")
            ]
        else:
            bodies = [
                response.get_json() if media == "application/json" else response.get_data(True)
            ]
        validator = jsonschema.Draft4Validator(schema)
        errors = [error for body in bodies for error in validator.iter_errors(body)]
        assert not errors, f"{where} ({code}): {[e.message for e in errors]}"
        return response

    def documented(self) -> set[tuple[str, str, str]]:
        return {
            (path, method, code)
            for path, method, op in operations(self.doc)
            for code in op["responses"]
        }


BIG = b'{"node_id": "' + b"x" * (1024 * 1024) + b'"}'


def exercise_happy_and_client_errors(check, client):
    c = client
    # POST /jobs
    a = check(c, "POST", "/jobs", 201, json={"node_id": "w-1", "descriptor": {"t": "blocks"}})
    a = a.get_json()["id"]
    check(c, "POST", "/jobs", 201, json={"node_id": "w-2", "idempotency_key": "k-1"})
    again = check(c, "POST", "/jobs", 200, json={"node_id": "w-2", "idempotency_key": "k-1"})
    b = again.get_json()["id"]
    check(c, "POST", "/jobs", 400, json={"node_id": ""})
    check(c, "POST", "/jobs", 400, data=b"[1, 2")
    check(c, "POST", "/jobs", 413, data=BIG)
    ids = [
        check(c, "POST", "/jobs", 201, json={"node_id": f"n{i}"}).get_json()["id"] for i in range(5)
    ]
    # GET /jobs
    check(c, "GET", "/jobs", 200)
    paged = check(c, "GET", "/jobs?limit=2&status=all", 200).get_json()
    assert paged["next_cursor"] is not None
    check(c, "GET", f"/jobs?limit=2&last_job_id={paged['next_cursor']}", 200)
    last = check(c, "GET", "/jobs?limit=1000&status=terminal,Error", 200).get_json()
    assert last["next_cursor"] is None
    check(c, "HEAD", "/jobs", 200)
    for query in ("limit=0", "limit=1001", "limit=x", "last_job_id=-1", "status=nope"):
        check(c, "GET", f"/jobs?{query}", 400)
    # GET /jobs/{id}, progress, events
    for suffix in ("", "/progress", "/events"):
        check(c, "GET", f"/jobs/{a}{suffix}", 200)
        check(c, "GET", f"/jobs/987654321{suffix}", 404)
        check(c, "GET", f"/jobs/abc{suffix}", 400)
        check(c, "HEAD", f"/jobs/{a}{suffix}", 200)
    # PUT /jobs/{id}/status
    check(c, "PUT", f"/jobs/{a}/status", 200, json={"status": "RUNNING", "detail": {"host": "h"}})
    check(c, "PUT", f"/jobs/{a}/status", 200, json={"status": "RUNNING"})
    check(c, "PUT", f"/jobs/{a}/status", 409, json={"status": "STOPPED"})
    check(c, "PUT", f"/jobs/{a}/status", 400, json={"status": "STOP_REQUESTED"})
    # node_id with any status but SCHEDULED names the reporting worker: another
    # one than the job's is a stale report (it was a 400 before fencing).
    check(c, "PUT", f"/jobs/{a}/status", 409, json={"status": "RUNNING", "node_id": "n"})
    check(c, "PUT", f"/jobs/{a}/status", 400, json={"status": "RUNNING", "attempt": "1"})
    check(c, "PUT", "/jobs/987654321/status", 404, json={"status": "RUNNING"})
    check(c, "PUT", "/jobs/0/status", 400, json={"status": "RUNNING"})
    check(c, "PUT", f"/jobs/{a}/status", 413, data=BIG)
    # POST /jobs/{id}/tables/{table}/files
    f0_hash = "0x" + "ab" * 32
    url = f"/jobs/{a}/tables/blocks/files"
    check(c, "POST", url, 201, json=file_entry("f0", 0, 9, block_hash=f0_hash))
    check(
        c,
        "POST",
        url,
        201,
        json=[file_entry("f1", 10, 19, prev_hash=f0_hash), file_entry("f2", 20, 29)],
    )
    check(c, "POST", url, 200, json=file_entry("f0", 0, 9, block_hash=f0_hash))
    check(c, "POST", url, 409, json=file_entry("f0", 0, 9, size=2))
    check(c, "POST", f"{url}?node_id=w-1&attempt=2", 409, json=file_entry("f5", 30, 39))
    check(c, "POST", f"{url}?attempt=0", 400, json=file_entry("f5", 30, 39))
    check(c, "POST", url, 400, json=file_entry("f3", 9, 0))
    check(c, "POST", url, 400, json=[])
    check(c, "POST", f"/jobs/{a}/tables/9bad/files", 400, json=file_entry("f4", 0, 1))
    check(c, "POST", "/jobs/987654321/tables/blocks/files", 404, json=file_entry("f4", 0, 1))
    check(c, "POST", url, 413, data=BIG)
    check(c, "GET", f"/jobs/{a}/progress", 200)
    # PUT/POST /jobs/{id}/stop
    check(c, "PUT", f"/jobs/{a}/stop", 200)
    check(c, "POST", f"/jobs/{a}/stop", 200)
    for method in ("PUT", "POST"):
        check(c, method, "/jobs/987654321/stop", 404)
        check(c, method, "/jobs/1.5/stop", 400)
    check(c, "PUT", f"/jobs/{a}/status", 200, json={"status": "STOPPING"})
    check(c, "PUT", f"/jobs/{a}/status", 200, json={"status": "STOPPED"})
    check(c, "POST", url, 409, json=file_entry("f9", 30, 39))
    check(c, "GET", f"/jobs/{a}/events", 200)
    # Retry: FAILED -> SCHEDULED on another node.
    check(c, "PUT", f"/jobs/{b}/status", 200, json={"status": "FAILED", "detail": {"e": 1}})
    check(c, "PUT", f"/jobs/{b}/status", 200, json={"status": "SCHEDULED", "node_id": "w-9"})
    # DELETE /jobs/{id}
    check(c, "DELETE", f"/jobs/{b}", 409)
    check(c, "DELETE", f"/jobs/{a}", 204)
    check(c, "DELETE", f"/jobs/{a}", 204)
    check(c, "DELETE", "/jobs/-5", 400)
    # DELETE /jobs
    check(c, "PUT", f"/jobs/{ids[0]}/status", 200, json={"status": "FAILED"})
    check(c, "DELETE", "/jobs?status=failed", 204)
    check(c, "DELETE", "/jobs?status=running", 400)
    check(c, "DELETE", "/jobs", 400)
    check(c, "DELETE", "/jobs", 409, json={"job_ids": [ids[1], ids[2]]})
    check(c, "PUT", f"/jobs/{ids[3]}/status", 200, json={"status": "FAILED"})
    check(c, "DELETE", "/jobs", 204, json={"job_ids": [ids[3], 987654321]})
    check(c, "DELETE", "/jobs", 400, json={"job_ids": ["x"]})
    check(c, "DELETE", "/jobs", 413, data=BIG)
    # A body on a route that takes none is refused rather than ignored, and
    # bounded like any body.
    job = f"/jobs/{ids[4]}"
    for method, path in [
        ("GET", "/jobs"),
        ("GET", job),
        ("GET", f"{job}/progress"),
        ("GET", f"{job}/events"),
        ("PUT", f"{job}/stop"),
        ("POST", f"{job}/stop"),
        ("DELETE", job),
    ]:
        check(c, method, path, 400, json={"force": True})
        check(c, method, path, 413, data=BIG)
    # Workers
    check(c, "PUT", "/workers/w-1", 200)
    check(c, "PUT", "/workers/w-1", 200, json={"info": {"version": "v1", "build_date": "x"}})
    check(c, "PUT", "/workers/w-1", 400, json={"info": {"version": 1}})
    check(c, "PUT", "/workers/1w", 400)
    check(c, "PUT", "/workers/w-1", 413, data=BIG)
    check(c, "POST", "/workers/w-1/heartbeat", 200)
    check(c, "POST", "/workers/ghost/heartbeat", 404)
    check(c, "POST", "/workers/-w/heartbeat", 400)
    check(c, "GET", "/workers", 200)
    check(c, "GET", "/workers/w-1", 200)
    check(c, "GET", "/workers/ghost", 404)
    check(c, "GET", "/workers/w%20x", 400)
    check(c, "GET", "/workers?limit=1", 200)
    check(c, "GET", "/workers?limit=0", 400)
    check(c, "GET", "/workers?cursor=nope", 400)
    check(c, "PUT", "/workers/w-gone", 200)
    check(c, "DELETE", "/workers/w-gone", 204)
    check(c, "DELETE", "/workers/w-gone", 204)
    check(c, "DELETE", "/workers/9w", 400)
    check(c, "GET", "/jobs?node_id=w-9&status=all", 200)
    check(c, "GET", "/jobs?node_id=9", 400)
    # One event
    first_event = check(c, "GET", f"/jobs/{ids[4]}/events", 200).get_json()["events"][0]["id"]
    check(c, "GET", f"/jobs/{ids[4]}/events/{first_event}", 200)
    check(c, "GET", f"/jobs/{ids[4]}/events/987654321", 404)
    check(c, "GET", f"/jobs/987654321/events/{first_event}", 404)
    check(c, "GET", f"/jobs/{ids[4]}/events/x", 400)
    for method, path in [
        ("GET", f"/jobs/{ids[4]}/events/{first_event}"),
        ("POST", "/workers/w-1/heartbeat"),
        ("GET", "/workers"),
        ("GET", "/workers/w-1"),
        ("DELETE", "/workers/w-1"),
    ]:
        check(c, method, path, 400, json={"force": True})
        check(c, method, path, 413, data=BIG)
    # Operations
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        check(c, "GET", path, 200)
        check(c, "HEAD", path, 200)
    # The console's files, their revalidation, and a name it does not have.
    for path in ("/ui/", "/ui/index.html", "/ui/app.js", "/ui/console.css", "/ui/favicon.svg"):
        etag = check(c, "GET", path, 200).headers["ETag"]
        check(c, "GET", path, 304, headers={"If-None-Match": etag})
    check(c, "GET", "/ui/app.py", 404)
    # No operation at all: still the error shape.
    check(c, "GET", "/no/such/route", 404)
    check(c, "PATCH", "/jobs", 405)
    check(c, "GET", "/jobs/1/nope", 404)


def exercise_auth(check, client, job_id):
    worker = {"Authorization": f"Bearer {WORKER}"}
    for method, path, kwargs in [
        ("GET", "/jobs", {}),
        ("POST", "/jobs", {"json": {"node_id": "x"}}),
        ("DELETE", "/jobs?status=terminal", {}),
        ("GET", f"/jobs/{job_id}", {}),
        ("DELETE", f"/jobs/{job_id}", {}),
        ("GET", f"/jobs/{job_id}/progress", {}),
        ("GET", f"/jobs/{job_id}/events", {}),
        ("PUT", f"/jobs/{job_id}/stop", {}),
        ("POST", f"/jobs/{job_id}/stop", {}),
        ("PUT", f"/jobs/{job_id}/status", {"json": {"status": "RUNNING"}}),
        ("POST", f"/jobs/{job_id}/tables/t/files", {"json": file_entry("a", 0, 1)}),
        ("GET", f"/jobs/{job_id}/events/1", {}),
        ("PUT", "/workers/w", {}),
        ("POST", "/workers/w/heartbeat", {}),
        ("GET", "/workers", {}),
        ("GET", "/workers/w", {}),
        ("DELETE", "/workers/w", {}),
    ]:
        check(client, method, path, 401, **kwargs)
        check(client, method, path, 401, headers={"Authorization": "Bearer nope"}, **kwargs)
        response = client.open(path, method=method, headers=worker, **kwargs)
        if response.status_code == 403:
            check(client, method, path, 403, headers=worker, **kwargs)


DB_ROUTES = [
    ("GET", "/jobs", {}),
    ("POST", "/jobs", {"json": {"node_id": "x"}}),
    ("DELETE", "/jobs?status=terminal", {}),
    ("DELETE", "/jobs", {"json": {"job_ids": [1]}}),
    ("GET", "/jobs/1", {}),
    ("DELETE", "/jobs/1", {}),
    ("GET", "/jobs/1/progress", {}),
    ("GET", "/jobs/1/events", {}),
    ("PUT", "/jobs/1/stop", {}),
    ("POST", "/jobs/1/stop", {}),
    ("PUT", "/jobs/1/status", {"json": {"status": "RUNNING"}}),
    ("POST", "/jobs/1/tables/t/files", {"json": file_entry("a", 0, 1)}),
    ("GET", "/jobs/1/events/1", {}),
    ("PUT", "/workers/w", {}),
    ("POST", "/workers/w/heartbeat", {}),
    ("GET", "/workers", {}),
    ("GET", "/workers/w", {}),
    ("DELETE", "/workers/w", {}),
]


def test_real_responses_conform_to_the_document(app, doc):
    check = Conformance(doc, app.url_map)
    client = app.test_client()
    exercise_happy_and_client_errors(check, client)

    url = app.config["DATABASE_URL"]
    tokened = create_app(
        {"TESTING": True, "DATABASE_URL": url, "ADMIN_TOKEN": ADMIN, "WORKER_TOKEN": WORKER}
    )
    job = tokened.test_client().post(
        "/jobs", json={"node_id": "auth"}, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    exercise_auth(check, tokened.test_client(), job.get_json()["id"])
    tokened.extensions["jobs_db_pool"].drop_idle()

    # A delete by status whose time budget runs out after one batch of one job.
    budgeted = create_app(
        {"TESTING": True, "DATABASE_URL": url, "BULK_DELETE_BUDGET_MS": 0, "BULK_DELETE_BATCH": 1}
    )
    c = budgeted.test_client()
    for _ in range(2):
        job_id = check(c, "POST", "/jobs", 201, json={"node_id": "old"}).get_json()["id"]
        check(c, "PUT", f"/jobs/{job_id}/status", 200, json={"status": "FAILED"})
    answer = check(c, "DELETE", "/jobs?status=terminal", 200).get_json()
    assert answer == {"deleted": 1, "more": True}
    check(c, "DELETE", "/jobs?status=terminal", 200)
    check(c, "DELETE", "/jobs?status=terminal", 204)
    budgeted.extensions["jobs_db_pool"].drop_idle()

    # Waiting (docs/API.md, Waiting without polling): a page after an id, a follow
    # stream of a finished job (it ends at once), and a process that holds its
    # WAITERS_PER_PROCESS already (0 here).
    c = client
    done = check(c, "POST", "/jobs", 201, json={"node_id": "w-wait"}).get_json()["id"]
    check(c, "PUT", f"/jobs/{done}/status", 200, json={"status": "FAILED"})
    check(c, "GET", f"/jobs/{done}/events?after=1&limit=5&wait=0", 200)
    check(c, "GET", f"/jobs/{done}/events?follow=true", 200)
    check(c, "GET", f"/jobs/{done}/events?wait=61", 400)
    check(c, "POST", "/workers/w-1/heartbeat?wait=0", 200)
    full = create_app({"TESTING": True, "DATABASE_URL": url, "WAITERS_PER_PROCESS": 0})
    c = full.test_client()
    check(c, "GET", f"/jobs/{done}/events?wait=5", 503)
    check(c, "POST", "/workers/w-1/heartbeat?wait=5", 503)

    broken = create_app({"TESTING": True, "DATABASE_URL": closed_database_url()}).test_client()
    for method, path, kwargs in DB_ROUTES:
        check(broken, method, path, 500, **kwargs)
    check(broken, "GET", "/readyz", 503)
    check(broken, "HEAD", "/readyz", 503)
    check(broken, "GET", "/healthz", 200)

    # Overload: the pool's one connection taken, every database route is 503 SERVICE_BUSY.
    busy = create_app(
        {"TESTING": True, "DATABASE_URL": url, "DB_POOL_SIZE": 1, "DB_POOL_TIMEOUT_S": 0.1}
    )
    with busy.app_context():
        pool = db.get_pool()
        held = pool.getconn()
    try:
        for method, path, kwargs in DB_ROUTES:
            check(busy.test_client(), method, path, 503, **kwargs)
    finally:
        pool.putconn(held)
        pool.drop_idle()

    # Every documented answer was seen for real: nothing documented is impossible,
    # and nothing above was left unchecked.
    # (A 408 needs a body trickling in through real gunicorn: every documented one
    # is answered for real by test_every_documented_408_is_answered_for_real.)
    missing = {seen for seen in check.documented() - check.seen if seen[2] != "408"}
    assert not missing, sorted(missing)


def test_every_documented_408_is_answered_for_real(_schema, doc):
    """Each route that documents REQUEST_TIMEOUT answers it, through gunicorn, to a body
    that stops arriving (a job id that exists is not needed: the body is read first)."""
    targets = [
        (method.upper(), path.format(job_id=1, event_id=1, node_id="w", table="t"))
        for path, method, op in operations(doc)
        if "408" in op["responses"]
    ]
    assert targets
    with serving(_schema, workers=1, env={"BODY_READ_TIMEOUT_S": "1"}) as server:
        answers = race(
            lambda: None,
            [lambda _c, _b, m=m, p=p: stalled_body_answer(server.port, m, p) for m, p in targets],
        )
    for (method, path), (status, body) in zip(targets, answers, strict=True):
        assert status == 408, (method, path, status, body)
        assert json.loads(body)["error_code"] == "REQUEST_TIMEOUT", (method, path, body)


def stalled_body_answer(port: int, method: str, path: str) -> tuple[int, bytes]:
    """Announce 100 bytes of body, send one, and read what the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{{"
        sock.sendall(head.encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), body
