"""Operations (docs/API.md, Operations): health, readiness, auth, request IDs, logs,
database errors that never leak, and metrics.

The database failures here are made on 127.0.0.1 with helpers.py:
``closed_database_url`` (nothing listens: connection refused), ``Refuser``
(accepts and hangs up at once, counting the connections, so a test can tell
whether the database was touched at all) and ``Blackhole`` (accepts and never
says a word: from libpq's point of view, a server that vanished without a RST).
"""

from __future__ import annotations

import io
import logging
import re
import time

import helpers
import orjson
import pytest
from helpers import (
    Blackhole,
    Refuser,
    assert_error,
    closed_database_url,
    metric_samples,
    metric_value,
)

from jobs import observability

ADMIN = "adm-7f3c9e1b5d2a4c68-secret"
WORKER = "wrk-2b8d4f6a1c3e5g79-secret"
WRONG = "not-a-token-0a1b2c3d4e5f"

LEAK_MARKERS = (
    "Traceback",
    "psycopg2",
    "OperationalError",
    "SELECT",
    "FROM jobs",
    "server closed",
    "connection to server",
    "127.0.0.1",
    'File "',
)


# ---- Databases that fail -----------------------------------------------------


@pytest.fixture
def refuser():
    listener = Refuser()
    yield listener
    listener.close()


@pytest.fixture
def blackhole():
    listener = Blackhole()
    yield listener
    listener.close()


# ---- Capturing the service's log ---------------------------------------------


class ServiceLog:
    """Everything the service logs: its JSON lines to stdout, and any other logger."""

    def __init__(self):
        self.stream = io.StringIO()
        self.other = io.StringIO()

    def text(self) -> str:
        return self.stream.getvalue() + self.other.getvalue()

    def lines(self) -> list[dict]:
        return [orjson.loads(line) for line in self.stream.getvalue().splitlines() if line]

    def access(self) -> list[dict]:
        return [e for e in self.lines() if e["logger"] == "jobs.access"]


@pytest.fixture
def service_log():
    """Redirect the service's stdout JSON handler (and the root logger) into memory."""
    observability.configure_logging()
    jobs_logger = logging.getLogger("jobs")
    handler = next(h for h in jobs_logger.handlers if getattr(h, "jobs_json", False))
    captured = ServiceLog()
    previous = handler.stream
    handler.setStream(captured.stream)
    root = logging.getLogger()
    other = logging.StreamHandler(captured.other)
    other.setLevel(logging.DEBUG)
    old_level = root.level
    root.addHandler(other)
    root.setLevel(logging.DEBUG)
    try:
        yield captured
    finally:
        handler.setStream(previous)
        root.removeHandler(other)
        root.setLevel(old_level)


def make_app(database_url: str, **config):
    """No tokens unless a test sets them, whatever the environment says."""
    return helpers.make_app(database_url, **{"ADMIN_TOKEN": None, "WORKER_TOKEN": None, **config})


def drop_pool(app) -> None:
    pool = app.extensions.get("jobs_db_pool")
    if pool is not None:
        pool.drop_idle()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


# ---- /healthz and /readyz ----------------------------------------------------


def test_healthz_is_ok_and_never_touches_the_database(refuser, service_log):
    app = make_app(refuser.url())
    client = app.test_client()
    for _ in range(3):
        response = client.get("/healthz")
        assert response.status_code == 200
        assert response.mimetype == "application/json"
        assert response.get_json() == {"status": "ok"}
    head = client.head("/healthz")
    assert head.status_code == 200
    assert head.get_data() == b""
    # Even with a dead database and no token required or sent.
    dead = make_app(closed_database_url(), ADMIN_TOKEN=ADMIN)
    assert dead.test_client().get("/healthz").get_json() == {"status": "ok"}
    time.sleep(0.1)
    assert refuser.accepted == 0


def test_readyz_ok_when_the_database_answers(app):
    client = app.test_client()
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == {"status": "ok"}
    head = client.head("/readyz")
    assert head.status_code == 200
    assert head.get_data() == b""


def assert_unavailable(response):
    assert response.status_code == 503
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["status"] == "unavailable"
    text = response.get_data(as_text=True)
    # ("SELECT 1" may be named: it is what readiness means, not a leaked query.)
    assert not any(m in text for m in LEAK_MARKERS if m != "SELECT"), body


def test_readyz_503_when_the_database_refuses(refuser):
    client = make_app(closed_database_url()).test_client()
    started = time.monotonic()
    assert_unavailable(client.get("/readyz"))
    assert client.head("/readyz").status_code == 503
    assert time.monotonic() - started < 2
    # A server that hangs up at once.
    client = make_app(refuser.url()).test_client()
    assert_unavailable(client.get("/readyz"))
    assert refuser.accepted >= 1


def test_readyz_503_within_2s_when_the_database_is_blackholed(blackhole):
    client = make_app(blackhole.url()).test_client()
    for method in ("GET", "HEAD"):
        started = time.monotonic()
        response = client.open("/readyz", method=method)
        elapsed = time.monotonic() - started
        assert response.status_code == 503
        assert elapsed < 2.0, f"{method} /readyz took {elapsed:.2f}s against a blackhole"
        # It did try: the listener saw the connection.
        assert blackhole.accepted >= 1
        if method == "GET":
            assert_unavailable(response)


# ---- Auth --------------------------------------------------------------------


# Job A's first event (its creation): the tables are emptied before each test.
EVENT_OF_A = 1


def seed_jobs(client, headers) -> tuple[int, int]:
    """Job A (stays active: read, stopped, files) and job B (status reports)."""
    a = client.post("/jobs", json={"node_id": "worker-a"}, headers=headers)
    b = client.post("/jobs", json={"node_id": "worker-b"}, headers=headers)
    assert a.status_code == b.status_code == 201
    return a.get_json()["id"], b.get_json()["id"]


_file_seq = iter(range(10**9))


def route_calls(a: int, b: int):
    """(method, path, kwargs, access, expected status) for every route and method."""

    def a_file():
        n = next(_file_seq)
        return {"file_name": f"f{n}.parquet", "start_block": n, "end_block": n, "size_bytes": 1}

    return [
        ("GET", "/jobs", {}, "read", 200),
        ("POST", "/jobs", {"json": {"node_id": "w1"}}, "admin", 201),
        ("DELETE", "/jobs?status=terminal", {}, "admin", 204),
        ("DELETE", "/jobs", {"json": {"job_ids": [987654321]}}, "admin", 204),
        ("GET", f"/jobs/{a}", {}, "read", 200),
        ("DELETE", "/jobs/987654321", {}, "admin", 204),
        ("GET", f"/jobs/{a}/progress", {}, "read", 200),
        ("GET", f"/jobs/{a}/events", {}, "read", 200),
        ("PUT", f"/jobs/{a}/stop", {}, "admin", 200),
        ("POST", f"/jobs/{a}/stop", {}, "admin", 200),
        ("PUT", f"/jobs/{b}/status", {"json": {"status": "RUNNING"}}, "worker", 200),
        ("POST", f"/jobs/{a}/tables/blocks/files", {"json_factory": a_file}, "worker", 201),
        ("GET", f"/jobs/{a}/events/{EVENT_OF_A}", {}, "read", 200),
        ("PUT", "/workers/worker-a", {"json": {"info": {"version": "1"}}}, "worker", 200),
        ("POST", "/workers/worker-a/heartbeat", {}, "worker", 200),
        ("GET", "/workers", {}, "read", 200),
        ("GET", "/workers/worker-a", {}, "read", 200),
        ("DELETE", "/workers/worker-a", {}, "admin", 204),
        ("GET", "/healthz", {}, "open", 200),
        ("GET", "/readyz", {}, "open", 200),
        ("GET", "/metrics", {}, "open", 200),
        ("GET", "/openapi.json", {}, "open", 200),
        ("GET", "/ui/", {}, "open", 200),
        ("GET", "/ui/app.js", {}, "open", 200),
    ]


def call(client, method, path, kwargs, headers):
    kwargs = dict(kwargs)
    if "json_factory" in kwargs:
        kwargs["json"] = kwargs.pop("json_factory")()
    return client.open(path, method=method, headers=headers, **kwargs)


def route_templates(a: int, b: int) -> set[tuple[str, str]]:
    """``route_calls``' (method, rule) pairs, as the app's url_map spells them."""
    listed = {(m, p.split("?")[0]) for m, p, *_ in route_calls(a, b)}
    return {
        (
            m,
            re.sub(r"/jobs/\d+", "/jobs/<job_id>", p)
            .replace("/blocks/", "/<table>/")
            .replace(f"/events/{EVENT_OF_A}", "/events/<event_id>")
            .replace("/workers/worker-a", "/workers/<node_id>")
            .replace("/ui/app.js", "/ui/<name>"),
        )
        for m, p in listed
    }


def registered_routes(app) -> set[tuple[str, str]]:
    return {
        (m, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for m in rule.methods - {"HEAD", "OPTIONS"}
    }


UNAUTHENTICATED = {
    "no header": {},
    "wrong token": bearer(WRONG),
    "empty bearer": {"Authorization": "Bearer "},
    "bare scheme": {"Authorization": "Bearer"},
    "no scheme": {"Authorization": ADMIN},
    "basic scheme": {"Authorization": f"Basic {ADMIN}"},
    "token scheme": {"Authorization": f"Token {ADMIN}"},
    "admin token prefix": bearer(ADMIN[:-1]),
    "admin token suffixed": bearer(ADMIN + "x"),
    "two tokens": {"Authorization": f"Bearer {ADMIN} {ADMIN}"},
}


def check_matrix(client, a, b, worker_role: str | None):
    """``worker_role``: "worker" when WORKER_TOKEN is configured, None when it is not."""
    admin = bearer(ADMIN)
    for method, path, kwargs, access, expected in route_calls(a, b):
        where = f"{method} {path}"
        for name, headers in UNAUTHENTICATED.items():
            response = call(client, method, path, kwargs, headers)
            if access == "open":
                assert response.status_code == expected, (where, name)
                continue
            message = assert_error(response, 401, "UNAUTHORIZED")
            assert response.headers.get("WWW-Authenticate", "").startswith("Bearer"), where
            assert ADMIN not in message
        response = call(client, method, path, kwargs, bearer(WORKER))
        if access == "open":
            assert response.status_code == expected, where
        elif worker_role is None:
            assert_error(response, 401, "UNAUTHORIZED")
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        elif access == "admin":
            assert_error(response, 403, "FORBIDDEN")
            assert "WWW-Authenticate" not in response.headers
        else:
            assert response.status_code == expected, (where, response.get_json())
        response = call(client, method, path, kwargs, admin)
        assert response.status_code == expected, (where, response.get_json())


def test_auth_matrix_with_admin_and_worker_tokens(app):
    tokened = make_app(app.config["DATABASE_URL"], ADMIN_TOKEN=ADMIN, WORKER_TOKEN=WORKER)
    client = tokened.test_client()
    try:
        a, b = seed_jobs(client, bearer(ADMIN))
        # The matrix must not silently miss a route added later.
        assert route_templates(a, b) == registered_routes(tokened)
        check_matrix(client, a, b, worker_role="worker")
        # The worker's PUT status and file registration really happened.
        events = client.get(f"/jobs/{b}/events", headers=bearer(WORKER)).get_json()["events"]
        assert [e["event_type"] for e in events] == ["SCHEDULED", "RUNNING"]
        progress = client.get(f"/jobs/{a}/progress", headers=bearer(WORKER)).get_json()
        assert progress["tables"]["blocks"]["files_count"] >= 2
    finally:
        drop_pool(tokened)


def test_auth_matrix_with_only_the_admin_token(app):
    tokened = make_app(app.config["DATABASE_URL"], ADMIN_TOKEN=ADMIN)
    client = tokened.test_client()
    try:
        a, b = seed_jobs(client, bearer(ADMIN))
        check_matrix(client, a, b, worker_role=None)
    finally:
        drop_pool(tokened)


def test_auth_is_checked_before_input_validation(app):
    client = make_app(app.config["DATABASE_URL"], ADMIN_TOKEN=ADMIN).test_client()
    assert_error(client.get("/jobs/abc"), 401, "UNAUTHORIZED")
    assert_error(client.post("/jobs", data=b"not json"), 401, "UNAUTHORIZED")
    assert_error(client.get("/jobs/abc", headers=bearer(ADMIN)), 400, "INVALID_JOB_ID")


def test_no_token_means_open_with_a_warning_at_start_up(app, service_log):
    url = app.config["DATABASE_URL"]
    open_app = make_app(url)
    warnings = [e for e in service_log.lines() if e["level"] == "warning"]
    assert any("ADMIN_TOKEN" in e["msg"] for e in warnings), warnings
    assert open_app.test_client().get("/jobs").status_code == 200
    # A worker token alone does not protect anything, and says so too.
    before = len(service_log.lines())
    worker_only = make_app(url, WORKER_TOKEN=WORKER)
    new = service_log.lines()[before:]
    assert any("ADMIN_TOKEN" in e["msg"] and e["level"] == "warning" for e in new), new
    assert any("WORKER_TOKEN" in e["msg"] for e in new), new
    assert worker_only.test_client().post("/jobs", json={"node_id": "w"}).status_code == 201
    # With a token set, no such warning.
    before = len(service_log.lines())
    make_app(url, ADMIN_TOKEN=ADMIN, WORKER_TOKEN=WORKER)
    assert [e for e in service_log.lines()[before:] if e["level"] == "warning"] == []


def test_tokens_never_appear_in_any_log_line(app, service_log, refuser):
    url = app.config["DATABASE_URL"]
    tokened = make_app(url, ADMIN_TOKEN=ADMIN, WORKER_TOKEN=WORKER)
    client = tokened.test_client()
    try:
        a, b = seed_jobs(client, bearer(ADMIN))
        for headers in [bearer(ADMIN), bearer(WORKER), *UNAUTHENTICATED.values()]:
            for method, path, kwargs, _, _ in route_calls(a, b):
                call(client, method, path, kwargs, headers)
            client.get("/jobs/not-an-id", headers=headers)
            client.get("/no/such/route", headers=headers)
    finally:
        drop_pool(tokened)
    # Failing requests log the most: the database errors too.
    broken = make_app(refuser.url(), ADMIN_TOKEN=ADMIN, WORKER_TOKEN=WORKER)
    for headers in (bearer(ADMIN), bearer(WORKER), bearer(WRONG)):
        for method, path, kwargs, _, _ in route_calls(a, b):
            call(broken.test_client(), method, path, kwargs, headers)
    text = service_log.text()
    header_sets = 2 + len(UNAUTHENTICATED)
    routes = len(route_calls(a, b))
    assert len(service_log.access()) == 2 + header_sets * (routes + 2) + 3 * routes
    assert any(e["msg"] == "database error" for e in service_log.lines())
    for secret in (ADMIN, WORKER, WRONG, ADMIN[:-1]):
        assert secret not in text
        assert secret[4:20] not in text


# ---- Request IDs and the access log ------------------------------------------

GENERATED_ID = re.compile(r"[A-Za-z0-9._:-]{8,128}")


def test_request_id_is_echoed_when_sent(client, service_log):
    for rid in ("abc-123", "req.42:x_Y", "a" * 128, "0f8fad5b-d9cb-469f-a165-70867728950e"):
        response = client.get("/jobs/987654", headers={"X-Request-ID": rid})
        assert response.status_code == 404
        assert response.headers["X-Request-ID"] == rid
        entries = [e for e in service_log.access() if e["request_id"] == rid]
        assert len(entries) == 1, entries


def test_request_id_is_generated_when_missing_or_garbage(client, service_log):
    seen = set()
    garbage = ["", "has space", "x" * 129, "<script>", "a;b", "café"]
    for i in range(30):
        headers = {} if i % 2 else {"X-Request-ID": garbage[i // 2 % len(garbage)]}
        try:
            response = client.get("/healthz", headers=headers)
        except (UnicodeEncodeError, ValueError):  # the test client may refuse non-latin-1
            response = client.get("/healthz")
        rid = response.headers["X-Request-ID"]
        assert GENERATED_ID.fullmatch(rid), rid
        assert rid not in garbage
        seen.add(rid)
    assert len(seen) == 30
    logged = {e["request_id"] for e in service_log.access()}
    assert seen <= logged


def test_request_id_on_errors_too(client, app):
    for response in (
        client.get("/no/such/route"),
        client.patch("/jobs"),
        client.get("/jobs/abc"),
        client.post("/jobs", data=b"x" * (1024 * 1024 + 1)),
    ):
        assert response.status_code in (404, 405, 400, 413)
        assert GENERATED_ID.fullmatch(response.headers.get("X-Request-ID", "")), response
    tokened = make_app(app.config["DATABASE_URL"], ADMIN_TOKEN=ADMIN).test_client()
    response = tokened.get("/jobs", headers={"X-Request-ID": "auth-fail-1"})
    assert response.status_code == 401
    assert response.headers["X-Request-ID"] == "auth-fail-1"
    broken = make_app(closed_database_url()).test_client()
    response = broken.get("/jobs", headers={"X-Request-ID": "db-fail-1"})
    assert response.status_code == 500
    assert response.headers["X-Request-ID"] == "db-fail-1"


def test_one_json_access_line_per_request(client, service_log):
    created = client.post("/jobs", json={"node_id": "w1"}, headers={"X-Request-ID": "r-create"})
    job_id = created.get_json()["id"]
    requests = [
        ("r-get", "GET", f"/jobs/{job_id}", 200, "/jobs/<job_id>"),
        ("r-missing", "GET", "/jobs/999999", 404, "/jobs/<job_id>"),
        ("r-bad", "GET", "/jobs/abc", 400, "/jobs/<job_id>"),
        ("r-files", "POST", f"/jobs/{job_id}/tables/blocks/files", 400, None),
        ("r-list", "GET", "/jobs?limit=5", 200, "/jobs"),
        ("r-stop", "PUT", f"/jobs/{job_id}/stop", 200, "/jobs/<job_id>/stop"),
        ("r-health", "HEAD", "/healthz", 200, "/healthz"),
    ]
    for rid, method, path, status, _ in requests:
        response = client.open(path, method=method, headers={"X-Request-ID": rid})
        assert response.status_code == status
    by_id: dict[str, list[dict]] = {}
    for entry in service_log.access():
        by_id.setdefault(entry["request_id"], []).append(entry)
    assert [e["status"] for e in by_id["r-create"]] == [201]
    for rid, method, _, status, route in requests:
        assert len(by_id.get(rid, [])) == 1, (rid, by_id.get(rid))
        entry = by_id[rid][0]
        assert entry["method"] == method
        assert entry["status"] == status
        assert entry["route"] == (route or "/jobs/<job_id>/tables/<table>/files")
        assert isinstance(entry["duration_ms"], int | float) and entry["duration_ms"] >= 0
        assert entry["level"] == "info"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", entry["ts"])
    # Every line on the stream is one JSON object (parsed above), nothing else.
    assert all(line.startswith("{") for line in service_log.stream.getvalue().splitlines())


# ---- Database errors never leak ----------------------------------------------

# (method, path, kwargs, error code when the database fails)
DB_ROUTES = [
    ("GET", "/jobs", {}, "LIST_JOBS_ERROR"),
    ("GET", "/jobs?status=all&limit=10&last_job_id=5", {}, "LIST_JOBS_ERROR"),
    ("POST", "/jobs", {"json": {"node_id": "w1"}}, "CREATE_JOB_ERROR"),
    ("DELETE", "/jobs?status=terminal", {}, "DELETE_JOBS_BY_STATUS_ERROR"),
    ("DELETE", "/jobs?status=Error", {}, "DELETE_JOBS_BY_STATUS_ERROR"),
    ("DELETE", "/jobs", {"json": {"job_ids": [1, 2]}}, "DELETE_JOBS_ERROR"),
    ("GET", "/jobs/1", {}, "GET_JOB_ERROR"),
    ("GET", "/jobs/1/progress", {}, "GET_JOB_ERROR"),
    ("GET", "/jobs/1/events", {}, "GET_JOB_EVENTS_ERROR"),
    ("PUT", "/jobs/1/stop", {}, "STOP_JOB_ERROR"),
    ("POST", "/jobs/1/stop", {}, "STOP_JOB_ERROR"),
    ("DELETE", "/jobs/1", {}, "DELETE_JOB_ERROR"),
    ("PUT", "/jobs/1/status", {"json": {"status": "RUNNING"}}, "UPDATE_JOB_STATUS_ERROR"),
    ("GET", "/jobs/1/events/1", {}, "GET_JOB_EVENT_ERROR"),
    ("GET", "/jobs?node_id=w1", {}, "LIST_JOBS_ERROR"),
    ("PUT", "/workers/w1", {}, "REGISTER_WORKER_ERROR"),
    ("POST", "/workers/w1/heartbeat", {}, "WORKER_HEARTBEAT_ERROR"),
    ("GET", "/workers", {}, "SCHEDULER_LIST_WORKERS_ERROR"),
    ("GET", "/workers/w1", {}, "SCHEDULER_GET_WORKER_ERROR"),
    ("GET", "/workers?limit=5", {}, "SCHEDULER_LIST_WORKERS_ERROR"),
    ("DELETE", "/workers/w1", {}, "DELETE_WORKER_ERROR"),
    (
        "POST",
        "/jobs/1/tables/blocks/files",
        {"json": {"file_name": "a", "start_block": 0, "end_block": 9, "size_bytes": 1}},
        "REGISTER_FILES_ERROR",
    ),
]

# (method, path, kwargs, status, error code): refused before any database work.
INVALID_REQUESTS = [
    ("GET", "/jobs?limit=0", {}, "LIMIT_INVALID"),
    ("GET", "/jobs?limit=-3", {}, "LIMIT_INVALID"),
    ("GET", "/jobs?limit=1001", {}, "LIMIT_TOO_LARGE"),
    ("GET", "/jobs?limit=abc", {}, "INVALID_QUERY_PARAMETERS"),
    ("GET", "/jobs?last_job_id=0", {}, "INVALID_QUERY_PARAMETERS"),
    ("GET", "/jobs?last_job_id=1.5", {}, "INVALID_QUERY_PARAMETERS"),
    ("GET", "/jobs?status=bogus", {}, "INVALID_QUERY_PARAMETERS"),
    ("GET", "/jobs?status=", {}, "INVALID_QUERY_PARAMETERS"),
    ("GET", "/jobs?status=running,", {}, "INVALID_QUERY_PARAMETERS"),
    ("POST", "/jobs", {"json": {}}, "INVALID_PAYLOAD_FORMAT"),
    ("POST", "/jobs", {"data": b"{not json"}, "INVALID_PAYLOAD_FORMAT"),
    ("POST", "/jobs", {"json": {"node_id": "1bad"}}, "INVALID_PAYLOAD_FORMAT"),
    ("DELETE", "/jobs?status=running", {}, "INVALID_QUERY_PARAM"),
    ("DELETE", "/jobs?status=", {}, "INVALID_QUERY_PARAM"),
    ("DELETE", "/jobs", {}, "INVALID_QUERY_PARAM"),
    ("DELETE", "/jobs", {"json": {"job_ids": [0]}}, "INVALID_PAYLOAD_FORMAT"),
    ("DELETE", "/jobs", {"json": {"job_ids": list(range(1, 1002))}}, "INVALID_PAYLOAD_FORMAT"),
    ("GET", "/jobs/abc", {}, "INVALID_JOB_ID"),
    ("GET", "/jobs/0", {}, "INVALID_JOB_ID"),
    ("GET", "/jobs/99999999999999999999", {}, "INVALID_JOB_ID"),
    ("GET", "/jobs/-1/progress", {}, "INVALID_JOB_ID"),
    ("GET", "/jobs/0x1A/events", {}, "INVALID_JOB_ID"),
    ("PUT", "/jobs/1.5/stop", {}, "INVALID_JOB_ID"),
    ("POST", "/jobs/+1/stop", {}, "INVALID_JOB_ID"),
    ("DELETE", "/jobs/" + "9" * 1000, {}, "INVALID_JOB_ID"),
    ("PUT", "/jobs/x/status", {"json": {"status": "RUNNING"}}, "INVALID_JOB_ID"),
    ("PUT", "/jobs/1/status", {"json": {"status": "STOP_REQUESTED"}}, "INVALID_PAYLOAD_FORMAT"),
    ("PUT", "/jobs/1/status", {"json": {"status": "running"}}, "INVALID_PAYLOAD_FORMAT"),
    ("PUT", "/jobs/1/status", {"data": b""}, "INVALID_PAYLOAD_FORMAT"),
    (
        "POST",
        "/jobs/1/tables/1bad/files",
        {"json": {"file_name": "a", "start_block": 0, "end_block": 9, "size_bytes": 1}},
        "INVALID_PAYLOAD_FORMAT",
    ),
    ("POST", "/jobs/1/tables/blocks/files", {"json": {"file_name": "a"}}, "INVALID_PAYLOAD_FORMAT"),
    (
        "POST",
        "/jobs/1/tables/blocks/files",
        {"json": {"file_name": "a", "start_block": 9, "end_block": 0, "size_bytes": 1}},
        "INVALID_PAYLOAD_FORMAT",
    ),
    ("POST", "/jobs/abc/tables/blocks/files", {"json": {}}, "INVALID_JOB_ID"),
]


def test_database_errors_never_leak(refuser, service_log):
    app = make_app(refuser.url(), DB_CONNECT_TIMEOUT_S=2)
    client = app.test_client()
    for method, path, kwargs, code in DB_ROUTES:
        before = refuser.accepted
        started = time.monotonic()
        response = client.open(path, method=method, **kwargs)
        assert time.monotonic() - started < 2, (method, path)
        message = assert_error(response, 500, code)
        text = response.get_data(as_text=True)
        for marker in (*LEAK_MARKERS, str(refuser.port)):
            assert marker not in text, (method, path, text)
        assert message == "database error; the request was not completed"
        assert refuser.accepted > before, f"{method} {path} did not try the database"
    # The detail is in the log instead.
    errors = [e for e in service_log.lines() if e["msg"] == "database error"]
    assert len(errors) >= len(DB_ROUTES)
    assert all(e["level"] == "error" and e["error"] == "OperationalError" for e in errors)


def test_database_error_when_the_port_is_closed():
    app = make_app(closed_database_url())
    client = app.test_client()
    for method, path, kwargs, code in DB_ROUTES:
        assert_error(client.open(path, method=method, **kwargs), 500, code)


def test_invalid_input_is_refused_before_the_database(refuser):
    client = make_app(refuser.url()).test_client()
    for method, path, kwargs, code in INVALID_REQUESTS:
        response = client.open(path, method=method, **kwargs)
        assert_error(response, 400, code)
    assert refuser.accepted == 0


# ---- /metrics ----------------------------------------------------------------


def test_metrics_count_requests_by_route_template_and_status(client):
    created = client.post("/jobs", json={"node_id": "w1"}).get_json()["id"]
    before = metric_samples(client)
    for i in range(7):
        assert client.get(f"/jobs/{900000 + i}").status_code == 404
    for _ in range(3):
        assert client.get(f"/jobs/{created}").status_code == 200
    assert client.get("/jobs/abc").status_code == 400
    assert client.head("/healthz").status_code == 200
    after = metric_samples(client)

    def delta(name, **labels):
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    total = "jobs_http_requests_total"
    route = "/jobs/<job_id>"
    assert delta(total, method="GET", route=route, status="404") == 7
    assert delta(total, method="GET", route=route, status="200") == 3
    assert delta(total, method="GET", route=route, status="400") == 1
    assert delta(total, method="HEAD", route="/healthz", status="200") == 1
    hist = "jobs_http_request_duration_seconds"
    assert delta(f"{hist}_count", method="GET", route=route) == 11
    assert delta(f"{hist}_bucket", method="GET", route=route, le="+Inf") == 11
    assert delta(f"{hist}_sum", method="GET", route=route) > 0
    # Buckets are cumulative.
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in after.items()
        if name == f"{hist}_bucket" and dict(labels).get("route") == route
        if dict(labels)["method"] == "GET"
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    # Labels are templates: no concrete ID ever becomes a label value.
    routes = {dict(labels).get("route") for (_, labels) in after}
    assert not any(r and re.search(r"/\d", r) for r in routes), routes


def test_metrics_is_open_and_counts_the_unmatched(app):
    client = make_app(app.config["DATABASE_URL"], ADMIN_TOKEN=ADMIN).test_client()
    before = metric_samples(client)
    assert client.get("/definitely/not/here").status_code == 404
    after = metric_samples(client)
    labels = {"method": "GET", "route": "<unmatched>", "status": "404"}
    assert metric_value(after, "jobs_http_requests_total", **labels) == (
        metric_value(before, "jobs_http_requests_total", **labels) + 1
    )
