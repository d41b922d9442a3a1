"""Bounded everywhere (docs/API.md, Operations, Overload and Settings).

- /readyz is cheap and safe to flood: one check at a time per process, its
  result kept a second, and 503 when the settings, the database or its schema
  would keep the service from serving.
- Every setting is checked once, against its range, and a bad one stops the
  start-up naming it (gunicorn's included).
- A full connection pool is 503 SERVICE_BUSY with Retry-After, apart from
  database errors (500 *_ERROR).
- SCRIPT_NAME and X-Forwarded-* count only from FORWARDED_ALLOW_IPS, and no
  header turns a request into a 500.
- A 408 says "Connection: close" and closes.

The gunicorn tests run the production command (dev.gunicorn.Server) and talk to it
over raw sockets where the exact bytes matter.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import re
import socket
import threading
import time
from pathlib import Path

import orjson
import psycopg2
import psycopg2.extensions
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dev.gunicorn import ROOT, Server, http_caller, serving, wait_for_workers, worker_pids
from jobs import db, observability, readiness, settings
from jobs.store import readiness as readiness_store

from support.databases import closed_database_url, init_db, query, table_locked
from support.service import make_app, metric_samples, metric_value, parse_http_answer

# ---- Settings: each at its bounds, one past them, malformed ------------------------------

# The ranges as docs/API.md states them, written out here rather than read from
# settings.py: (lowest, highest, just below the lowest, just above the highest).
RANGES = {
    "WORKER_LOST_AFTER_S": ("1", "86400", "0.9", "86400.001"),
    "STATEMENT_TIMEOUT_MS": ("100", "300000", "99", "300001"),
    "BULK_DELETE_BUDGET_MS": ("1", "300000", "0", "300001"),
    "BULK_DELETE_BATCH": ("1", "100000", "0", "100001"),
    "BODY_READ_TIMEOUT_S": ("0.1", "300", "0.09", "300.5"),
    "DB_CONNECT_TIMEOUT_S": ("1", "60", "0", "61"),
    "DB_POOL_SIZE": ("1", "100", "0", "101"),
    "DB_POOL_TIMEOUT_S": ("0.1", "30", "0.05", "30.01"),
    "PORT": ("1", "65535", "0", "65536"),
    "WEB_CONCURRENCY": ("1", "64", "0", "65"),
    "WORKER_CONNECTIONS": ("1", "10000", "0", "10001"),
    "KEEPALIVE_S": ("1", "900", "0", "901"),
    "GRACEFUL_TIMEOUT": ("1", "600", "0", "601"),
}

# Not numbers as the settings take them: unicode digits (str.isdigit and float()
# take "٣" and the fullwidth "\uff13"), exponents, signs, underscores, hex, inf/nan, inner spaces.
MALFORMED = [
    "abc",
    "٣",
    "\uff13",
    "1e3",
    "-1",
    "+5",
    "1_000",
    "0x10",
    "inf",
    "nan",
    "1 0",
    "5s",
    "1.2.3",
]


def refusal(environ: dict) -> str:
    with pytest.raises(settings.SettingsError) as refused:
        settings.for_gunicorn(environ)
    return str(refused.value)


def test_unset_or_empty_settings_take_their_defaults():
    unset = settings.for_gunicorn({})
    empty = settings.for_gunicorn({s.name: "  " for s in settings.SETTINGS})
    assert unset == empty
    for setting in settings.SETTINGS:
        assert unset[setting.name] == setting.default, setting.name
    assert unset["DB_POOL_TIMEOUT_S"] == 2
    assert unset["FORWARDED_ALLOW_IPS"] == ""  # trust no proxy unless told
    # The service's own reading leaves gunicorn's out.
    assert "PORT" not in settings.from_environment({})
    assert settings.problems(settings.from_environment({})) == []


@pytest.mark.parametrize("name", sorted(RANGES))
def test_each_number_at_its_bounds_and_one_past(name):
    lowest, highest, below, above = RANGES[name]
    rule = settings.BY_NAME[name].rule
    assert f"from {lowest} to {highest}" in rule
    for text in (lowest, highest):
        value = settings.for_gunicorn({name: text})[name]
        assert value == float(text), (name, text)
        assert settings.problems({**settings.from_environment({}), name: value}) == []
    for text in (below, above):
        message = refusal({name: text})
        assert message == f"{name}: {text!r} is out of range: expected {rule}"
        assert f"from {lowest} to {highest}" in message


@pytest.mark.parametrize("name", sorted(RANGES))
def test_malformed_numbers_are_refused_naming_the_variable_and_its_range(name):
    lowest, highest, _, _ = RANGES[name]
    for text in MALFORMED:
        message = refusal({name: text})
        assert message.startswith(f"{name}: {text!r} is not "), message
        assert f"from {lowest} to {highest}" in message, message
    # A whole number is never given with a decimal point.
    if isinstance(settings.BY_NAME[name].default, int):
        assert refusal({name: "5.0"}).startswith(f"{name}: '5.0' is not a whole number")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STATEMENT_TIMEOUT_MS", "2147483648"),  # every route answered 500
        ("WORKER_LOST_AFTER_S", "1e12"),  # /workers answered 500
        ("BULK_DELETE_BUDGET_MS", "4294967296"),  # the bulk delete answered 500
        ("DB_CONNECT_TIMEOUT_S", "99999999999"),  # every route answered 500
        ("WORKER_LOST_AFTER_S", "abc"),  # failed without naming the variable
        ("DB_POOL_SIZE", "9" * 5000),  # more digits than int() converts
    ],
)
def test_values_that_broke_the_service_stop_the_start_up(name, value, monkeypatch, database_url):
    message = refusal({name: value})
    assert message.startswith(f"{name}: ") and settings.BY_NAME[name].rule in message
    assert len(message) < 300  # the value is shown cut short
    # create_app reads the environment the same way.
    monkeypatch.setenv(name, value)
    with pytest.raises(settings.SettingsError, match=f"^{name}: "):
        make_app(database_url)


def test_every_bad_setting_is_named_at_once():
    message = refusal(
        {
            "STATEMENT_TIMEOUT_MS": "0",
            "KEEPALIVE_S": "٣",
            "LOG_LEVEL": "loud",
            "JOB_RETENTION": "5x",
        }
    )
    named = [line.split(":", 1)[0] for line in message.splitlines()]
    assert sorted(named) == ["JOB_RETENTION", "KEEPALIVE_S", "LOG_LEVEL", "STATEMENT_TIMEOUT_MS"]


def test_levels_and_proxy_addresses():
    read = settings.for_gunicorn
    assert read({"LOG_LEVEL": "warning"})["LOG_LEVEL"] == "WARNING"
    assert read({"GUNICORN_LOG_LEVEL": "DEBUG"})["GUNICORN_LOG_LEVEL"] == "debug"
    for name in ("LOG_LEVEL", "GUNICORN_LOG_LEVEL"):
        assert refusal({name: "loud"}).startswith(f"{name}: 'loud' is not allowed: expected one of")
    addresses = read({"FORWARDED_ALLOW_IPS": "10.0.0.5, 10.1.0.0/16,::1"})
    assert addresses["FORWARDED_ALLOW_IPS"] == "10.0.0.5,10.1.0.0/16,::1"
    assert read({"FORWARDED_ALLOW_IPS": "*"})["FORWARDED_ALLOW_IPS"] == "*"
    # Host bits set (a mistake gunicorn refuses too), a name, an empty item.
    for bad in ("10.1.0.1/16", "proxy.internal", "10.0.0.5,,10.0.0.6", "256.0.0.1"):
        assert refusal({"FORWARDED_ALLOW_IPS": bad}).startswith("FORWARDED_ALLOW_IPS: ")


def test_secrets_are_checked_but_never_repeated():
    for name, value in [
        ("ADMIN_TOKEN", "hunter2 with spaces"),
        ("WORKER_TOKEN", "hunter2-ünicode"),
        ("ADMIN_TOKEN", "hunter2" + "x" * 5000),
        ("DATABASE_URL", "host=db password=hunter2 port"),
    ]:
        message = refusal({name: value})
        assert message.startswith(f"{name}: not allowed (the value is not shown): expected ")
        assert "hunter2" not in message
    assert settings.for_gunicorn({"ADMIN_TOKEN": "adm-7f3c~!"})["ADMIN_TOKEN"] == "adm-7f3c~!"


def test_job_retention_range():
    assert settings.for_gunicorn({"JOB_RETENTION": "36500d"})["JOB_RETENTION"].days == 36500
    assert refusal({"JOB_RETENTION": "36501d"}).startswith(
        "JOB_RETENTION: '36501d' is out of range"
    )
    assert refusal({"JOB_RETENTION": "0s"}).startswith("JOB_RETENTION: '0s' is out of range")


def settings_table() -> dict[str, list[str]]:
    """docs/API.md's Settings table: variable -> its cells."""
    text = (ROOT / "docs" / "API.md").read_text()
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `([A-Z_]+)` \|(.*)\|$", line)
        if match:
            rows[match[1]] = [cell.strip() for cell in match[2].split(" | ")]
    return rows


def test_the_docs_state_every_setting_with_its_default_and_range():
    rows = settings_table()
    for setting in settings.SETTINGS:
        assert setting.name in rows, setting.name
        default, allowed = rows[setting.name][0], rows[setting.name][1]
        if setting.default not in (None, ""):
            shown = (
                f"{setting.default:g}" if isinstance(setting.default, float) else setting.default
            )
            assert f"`{shown}`" in default, (setting.name, default)
        assert allowed == setting.rule, (setting.name, allowed)


def test_gunicorn_refuses_to_start_with_a_bad_value(_schema):
    instance = Server(
        _schema, env={"WORKER_LOST_AFTER_S": "abc", "WEB_CONCURRENCY": "٣", "KEEPALIVE_S": "0"}
    ).launch()
    try:
        assert instance.process.wait(30) != 0
        log = instance.log()
    finally:
        instance.stop()
        instance.cleanup()
    assert "WORKER_LOST_AFTER_S: 'abc' is not a number of seconds" in log, log
    assert "from 1 to 86400" in log, log
    assert "WEB_CONCURRENCY: '٣' is not a whole number" in log, log
    assert (
        "KEEPALIVE_S: '0' is out of range: expected a whole number of seconds from 1 to 900" in log
    )
    assert "Booting worker" not in log, "refused before any worker was forked"
    assert "Traceback" not in log, log


# ---- /readyz -------------------------------------------------------------------------------


def readyz_json(app, method="GET"):
    response = app.test_client().open("/readyz", method=method)
    return response.status_code, (response.get_json() if method == "GET" else None)


def settle(listener, expected: int, timeout: float = 2.0) -> int:
    """The listener's count of accepted connections once it stops changing at ``expected``."""
    deadline = time.monotonic() + timeout
    while listener.accepted < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    return listener.accepted


def test_concurrent_probes_share_one_check_and_reuse_it_for_a_second(blackhole):
    """A database that never answers: 30 probes at once wait on one 1 s check, one connection."""
    app = make_app(blackhole.url())
    answers: list = []
    barrier = threading.Barrier(30)

    def probe():
        barrier.wait()
        started = time.monotonic()
        status, body = readyz_json(app)
        answers.append((status, body, time.monotonic() - started))

    threads = [threading.Thread(target=probe) for _ in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(answers) == 30
    for status, body, elapsed in answers:
        assert status == 503 and body["error_code"] == "DATABASE_UNAVAILABLE", body
        assert elapsed < 2.0, elapsed
    assert settle(blackhole, 1) == 1, "one connection for all thirty probes"
    # Within the second after: the same answer, no new connection.
    assert readyz_json(app, "HEAD")[0] == 503
    assert readyz_json(app)[0] == 503
    assert settle(blackhole, 1) == 1
    time.sleep(readiness.Readiness.TTL_S + 0.2)
    assert readyz_json(app)[0] == 503
    assert settle(blackhole, 2) == 2, "a new check once the result is a second old"


def test_readyz_503_when_the_settings_are_not_allowed(refuser):
    """Only a running app's config changed behind its back can get here (start-up refuses)."""
    app = make_app(refuser.url())
    app.config["STATEMENT_TIMEOUT_MS"] = 2**31
    status, body = readyz_json(app)
    assert status == 503
    assert body == {
        "status": "unavailable",
        "error_code": "SETTINGS_INVALID",
        "error_message": "settings out of range: STATEMENT_TIMEOUT_MS",
    }
    assert readyz_json(app, "HEAD")[0] == 503
    assert settle(refuser, 0) == 0, "the database is not asked while the settings are wrong"


def scratch_database(postgres_url: str, name: str) -> str:
    """A new, empty database on the session's server (dropped first if left over)."""
    conn = psycopg2.connect(postgres_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name}")
            cur.execute(f"CREATE DATABASE {name}")
    finally:
        conn.close()
    return psycopg2.extensions.make_dsn(postgres_url, dbname=name)


def test_readyz_503_when_the_schema_is_missing_then_ready_after_init_db(postgres_url):
    url = scratch_database(postgres_url, "bounds_no_schema")
    unavailable = {
        "status": "unavailable",
        "error_code": "SCHEMA_MISSING",
        "error_message": "the database lacks tables or columns the service uses: "
        "run `flask --app app init-db`",
    }
    assert readyz_json(make_app(url)) == (503, unavailable)
    init_db(url)
    assert readyz_json(make_app(url)) == (200, {"status": "ok"})
    # One column gone (a half-applied migration, a restore of an old dump).
    query(url, "ALTER TABLE jobs DROP COLUMN job_json")
    assert readyz_json(make_app(url)) == (503, unavailable)
    query(url, "DROP TABLE workers")
    assert readyz_json(make_app(url)) == (503, unavailable)
    init_db(url)  # schema.sql adds both back
    assert readyz_json(make_app(url)) == (200, {"status": "ok"})


def test_the_readiness_columns_are_exactly_the_schemas(_schema, db_conn):
    with db_conn.cursor() as cur:
        cur.execute(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = ANY(%s)",
            (list(readiness_store.REQUIRED),),
        )
        found = {(t, c) for t, c in cur.fetchall()}
        cur.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            " AND table_type = 'BASE TABLE'"
        )
        tables = {t for (t,) in cur.fetchall()}
    required = {(t, c) for t, columns in readiness_store.REQUIRED.items() for c in columns}
    assert found == required
    # Every table of schema.sql is checked (the tests' own leftovers aside).
    schema_sql = Path(ROOT, "schema.sql").read_text()
    schema_tables = set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", schema_sql))
    assert schema_tables == set(readiness_store.REQUIRED)
    assert schema_tables <= tables


# ---- Through gunicorn ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(_schema):
    """The production command with its defaults (FORWARDED_ALLOW_IPS unset), 2 workers."""
    with serving(_schema, workers=2, env={"BODY_READ_TIMEOUT_S": "1"}) as instance:
        yield instance


def readyz_backends(conn, server, known: dict[int, bool]) -> int:
    """The readiness backends of ``server``'s processes (apps of earlier tests in this
    session may keep theirs): matched by the client port of each backend, each port
    looked up in /proc once (``known``: port -> whether it is the server's)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT client_port FROM pg_stat_activity WHERE application_name = 'jobs-readyz'"
        )
        ports = {port for (port,) in cur.fetchall()}
    if ports - known.keys():
        ours = local_ports_of(worker_pids(server.process.pid))
        known.update({port: port in ours for port in ports - known.keys()})
    return sum(known[port] for port in ports)


def local_ports_of(pids: set[int]) -> set[int]:
    """The local TCP ports of the sockets ``pids`` hold open (from /proc)."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = fd.readlink().name
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_a_readyz_flood_holds_at_most_one_connection_per_worker(server, db_conn):
    """200 keep-alive clients looping on /readyz (GET and HEAD) for 3 s, PostgreSQL watched."""
    clients, seconds = 200, 3.0
    answers: list[tuple[int, float]] = []
    errors: list[BaseException] = []
    most = {"backends": 0, "samples": 0}
    stop = threading.Event()
    barrier = threading.Barrier(clients + 1)

    known: dict[int, bool] = {}

    def watch():
        while not stop.is_set():
            most["backends"] = max(most["backends"], readyz_backends(db_conn, server, known))
            most["samples"] += 1
            time.sleep(0.002)

    def client(i: int):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            barrier.wait(30)
            mine = []
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                started = time.monotonic()
                conn.request("HEAD" if i % 4 == 0 else "GET", "/readyz")
                response = conn.getresponse()
                response.read()
                mine.append((response.status, time.monotonic() - started))
            conn.close()
            answers.extend(mine)
        except BaseException as exc:
            errors.append(exc)

    watcher = threading.Thread(target=watch, daemon=True)
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    log_from = server.log_path.stat().st_size
    for thread in threads:
        thread.start()
    watcher.start()
    barrier.wait(30)
    for thread in threads:
        thread.join(60)
    stop.set()
    watcher.join(5)
    assert not errors, errors[:3]
    statuses = {status for status, _ in answers}
    slowest = max(elapsed for _, elapsed in answers)
    # The server's own time for each probe (its access lines): the 200 client
    # threads share the box's two cores with it, so their clocks also count
    # waiting for the GIL.
    with open(server.log_path, "rb") as log:
        log.seek(log_from)
        served = [
            entry["duration_ms"] / 1000
            for entry in map(orjson.loads, filter(None, log.read().splitlines()))
            if entry.get("route") == "/readyz"
        ]
    assert len(served) == len(answers)
    print(
        f"\nreadyz flood: {len(answers)} probes by {clients} keep-alive clients in {seconds:g} s, "
        f"statuses {sorted(statuses)}; slowest {max(served):.3f} s in the server, "
        f"{slowest:.3f} s at a client; at most {most['backends']} jobs-readyz backends "
        f"in {most['samples']} samples of pg_stat_activity"
    )
    assert statuses == {200}
    assert max(served) < 2.0
    assert slowest < 5.0  # never a hang, whatever the clients' own scheduling
    assert most["samples"] > 50
    assert most["backends"] <= 2, "more than one readiness connection per worker process"
    assert "too many clients" not in server.log()


# ---- Overload: 503 SERVICE_BUSY -----------------------------------------------------------


class ServiceLog:
    """The service's JSON log lines, captured in memory (its stdout handler redirected)."""

    def __init__(self):
        observability.configure_logging()
        logger = logging.getLogger("jobs")
        self.handler = next(h for h in logger.handlers if getattr(h, "jobs_json", False))
        self.stream = io.StringIO()

    def __enter__(self):
        self.previous = self.handler.setStream(self.stream)
        return self

    def __exit__(self, *exc):
        self.handler.setStream(self.previous)

    def lines(self) -> list[dict]:
        return [orjson.loads(line) for line in self.stream.getvalue().splitlines() if line]


BUSY_ROUTES = [
    ("GET", "/jobs", {}, "/jobs"),
    ("POST", "/jobs", {"json": {"node_id": "w1"}}, "/jobs"),
    ("GET", "/jobs/1", {}, "/jobs/<job_id>"),
    ("DELETE", "/jobs?status=terminal", {}, "/jobs"),
    ("PUT", "/workers/w1", {}, "/workers/<node_id>"),
    ("GET", "/workers", {}, "/workers"),
]


@pytest.mark.alone  # 503 between 0.2 and 0.7 s
def test_a_full_pool_answers_503_service_busy_apart_from_database_errors(_schema):
    # _schema, not database_url: /readyz below needs the schema, which the first
    # test of a process to ask for it applies.
    app = make_app(_schema, DB_POOL_SIZE=1, DB_POOL_TIMEOUT_S=0.2)
    client = app.test_client()
    with app.app_context():
        pool = db.get_pool()
        held = pool.getconn()  # the pool's one connection, taken
    try:
        with ServiceLog() as service_log:
            for method, path, kwargs, _ in BUSY_ROUTES:
                started = time.monotonic()
                response = client.open(path, method=method, **kwargs)
                elapsed = time.monotonic() - started
                assert response.status_code == 503, (method, path, response.get_json())
                assert response.headers["Retry-After"] == "1"
                body = response.get_json()
                assert body["error_code"] == "SERVICE_BUSY"
                assert set(body) == {"error_code", "error_message"}
                assert 0.2 <= elapsed < 0.2 + 0.5, (method, path, elapsed)
            # /healthz and readiness (its own connection) do not need the pool.
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 200
        busy = [e for e in service_log.lines() if e["msg"] == "service busy"]
        assert [e["level"] for e in busy] == ["warning"] * len(BUSY_ROUTES)
        assert not [e for e in service_log.lines() if e["level"] == "error"]
    finally:
        pool.putconn(held)
    samples = metric_samples(client)
    for route in {r for *_, r in BUSY_ROUTES}:
        expected = sum(1 for *_, r in BUSY_ROUTES if r == route)
        assert metric_value(samples, "jobs_overload_total", route=route) >= expected
    assert client.get("/jobs").status_code == 200  # the connection is back
    pool.drop_idle()
    # A database that is down is still a database error: 500 and the route's code.
    down = make_app(closed_database_url(), DB_POOL_SIZE=1).test_client()
    response = down.get("/jobs")
    assert response.status_code == 500
    assert response.get_json()["error_code"] == "LIST_JOBS_ERROR"
    assert "Retry-After" not in response.headers


def test_the_openapi_document_lists_service_busy_on_every_database_route(client):
    doc = client.get("/openapi.json").get_json()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            answer = op["responses"].get("503")
            if path in ("/healthz", "/readyz", "/metrics", "/openapi.json") or path.startswith(
                "/ui/"
            ):
                assert answer is None or path == "/readyz", path
                continue
            assert answer, (method, path)
            enum = answer["content"]["application/json"]["schema"]["properties"]["error_code"]
            assert enum["enum"] == ["SERVICE_BUSY"], (method, path)
            assert answer["headers"]["Retry-After"]["schema"]["type"] == "integer"


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 15):
    """Send one request (its head as text), read until the server closes:
    (status, {lower-case header: value}, body bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n" + body)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    return parse_http_answer(received)


@pytest.mark.alone  # 503s within DB_POOL_TIMEOUT_S + 1.5 s: 2.7 s with three other workers busy
def test_overload_through_gunicorn_is_503_with_retry_after_and_never_500(_schema):
    """A pool of one per worker, its connection stuck behind a table lock: 200 clients at once."""
    pool_timeout, clients = 0.5, 200
    env = {"DB_POOL_SIZE": "1", "DB_POOL_TIMEOUT_S": str(pool_timeout)}
    instance = Server(_schema, workers=2, env=env)
    try:
        instance.start()
        wait_for_workers(instance.process.pid, 2)
        call = instance.caller()
        status, job = call("POST", "/jobs", {"node_id": "busy-w"})
        assert status == 201
        path = f"/jobs/{job['id']}"
        answers: list = []
        barrier = threading.Barrier(clients + 1)

        def client():
            barrier.wait(30)
            started = time.monotonic()
            answer = raw_request(
                instance.port,
                f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n",
                timeout=30,
            )
            answers.append((*answer, time.monotonic() - started))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for thread in threads:
            thread.start()
        with table_locked(_schema, "jobs"):
            barrier.wait(30)
            time.sleep(2.5)  # well past DB_POOL_TIMEOUT_S, well before STATEMENT_TIMEOUT_MS
        for thread in threads:
            thread.join(60)
        assert len(answers) == clients
        busy = [a for a in answers if a[0] == 503]
        assert {a[0] for a in answers} <= {200, 503}, sorted({a[0] for a in answers})
        assert len(busy) >= clients // 2, len(busy)
        for _, headers, body, _ in busy:
            assert headers["retry-after"] == "1"
            assert headers["content-type"] == "application/json"
            assert json.loads(body)["error_code"] == "SERVICE_BUSY"
        slowest_busy = max(a[3] for a in busy)
        print(
            f"\noverload: {clients} clients, {len(busy)} answered 503 SERVICE_BUSY, "
            f"{clients - len(busy)} 200; 503 within {min(a[3] for a in busy):.2f}-"
            f"{slowest_busy:.2f} s (DB_POOL_TIMEOUT_S={pool_timeout:g})"
        )
        assert slowest_busy < pool_timeout + 1.5
        text = metrics_text(instance.port)
        overloads = sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "jobs_overload_total" and s.labels == {"route": "/jobs/<job_id>"}
        )
        assert overloads == len(busy)
        log = instance.log()
        assert '"msg":"service busy"' in log and '"level":"warning"' in log
        assert '"msg":"database error"' not in log
        assert call("GET", path)[0] == 200
    finally:
        instance.stop()
        instance.cleanup()


def metrics_text(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


# ---- Proxy headers ---------------------------------------------------------------------------

# Headers a client could send to pass for a proxy: SCRIPT_NAME (gunicorn's
# forwarder_headers), the secure-scheme headers (also disagreeing with each
# other, which gunicorn refuses from a trusted peer), the usual forwarding ones.
PROXY_HEADERS = [
    {"SCRIPT_NAME": "/public"},
    {"SCRIPT_NAME": "/jobs"},
    {"SCRIPT_NAME": "/nowhere"},
    {"SCRIPT_NAME": "/public\xff"},
    {"PATH_INFO": "/jobs"},
    {"X-Forwarded-For": "203.0.113.9"},
    {"X-Forwarded-For": "not an address,,,\xff"},
    {"X-Forwarded-Proto": "https"},
    {"X-Forwarded-Proto": "https", "X-Forwarded-Ssl": "off"},
    {"X-Forwarded-Protocol": "ssl", "X-Forwarded-Proto": "http"},
    {"Forwarded": "for=203.0.113.9;proto=https;host=evil"},
    {"X-Forwarded-Host": "evil.example"},
    {"X-Forwarded-Prefix": "/public"},
    {"REMOTE_ADDR": "203.0.113.9"},
]


def forwarded_request(method: str, path: str, extra: dict) -> str:
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
    return head + "".join(f"{name}: {value}\r\n" for name, value in extra.items())


def answer_of(port: int, method: str, path: str, extra: dict) -> tuple[int, dict | None]:
    status, _, body = raw_request(port, forwarded_request(method, path, extra))
    return status, (json.loads(body) if body else None)


def completed_job(call) -> int:
    """A COMPLETED job: DELETE /jobs/{id} would delete it (204)."""
    status, job = call("POST", "/jobs", {"node_id": "proxy-w"})
    assert status == 201
    for step in ("RUNNING", "COMPLETED"):
        assert call("PUT", f"/jobs/{job['id']}/status", {"status": step})[0] == 200
    return job["id"]


def test_proxy_headers_from_an_untrusted_peer_change_nothing(server):
    call = server.caller()
    job_id = completed_job(call)
    requests = [
        ("GET", f"/jobs/{job_id}"),
        ("GET", f"/public/jobs/{job_id}"),
        ("DELETE", f"/public/jobs/{job_id}"),
        ("GET", "/healthz"),
        ("GET", "/nowhere/healthz"),
    ]
    for method, path in requests:
        expected = answer_of(server.port, method, path, {})
        assert expected[0] < 500
        for extra in PROXY_HEADERS:
            assert answer_of(server.port, method, path, extra) == expected, (method, path, extra)
    # `SCRIPT_NAME: /public` did not make DELETE /public/jobs/{id} a DELETE /jobs/{id}.
    assert call("GET", f"/jobs/{job_id}")[0] == 200


def test_proxy_headers_from_a_configured_proxy_are_used_and_never_a_500(_schema):
    instance = Server(_schema, workers=1, env={"FORWARDED_ALLOW_IPS": "127.0.0.1"})
    try:
        instance.start()
        call = instance.caller()
        job_id = completed_job(call)
        # Trusted, SCRIPT_NAME works: the proxy serves the API under /public.
        status, body = answer_of(
            instance.port, "GET", f"/public/jobs/{job_id}", {"SCRIPT_NAME": "/public"}
        )
        assert (status, body["id"]) == (200, job_id)
        # A path outside it was gunicorn's 500 "Configuration problem"; now a JSON 400.
        status, headers, raw = raw_request(
            instance.port, forwarded_request("GET", f"/jobs/{job_id}", {"SCRIPT_NAME": "/public"})
        )
        assert status == 400 and headers["content-type"] == "application/json", raw
        assert json.loads(raw) == {
            "error_code": "BAD_REQUEST",
            "error_message": "the request path does not start with the SCRIPT_NAME header's prefix",
        }
        # Disagreeing scheme headers: gunicorn's JSON 400.
        status, body = answer_of(
            instance.port,
            "GET",
            "/healthz",
            {"X-Forwarded-Proto": "https", "X-Forwarded-Ssl": "off"},
        )
        assert (status, body["error_code"]) == (400, "BAD_REQUEST")
        for method, path in [
            ("GET", f"/jobs/{job_id}"),
            ("GET", "/healthz"),
            ("DELETE", "/jobs/1"),
        ]:
            for extra in PROXY_HEADERS:
                status, headers, raw = raw_request(
                    instance.port, forwarded_request(method, path, extra)
                )
                assert status < 500, (method, path, extra, raw)
                if status != 204:  # (a 204 has no body to describe)
                    assert headers["content-type"] == "application/json", (method, path, extra)
        assert "Configuration problem" not in instance.log()
    finally:
        instance.stop()
        instance.cleanup()


# ---- 408: Connection: close, truthfully ---------------------------------------------------------


def test_a_408_says_connection_close_and_closes(server):
    """A body that stops arriving: 408, "Connection: close", and the server closes at once."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(b"PUT /workers/slow-408 HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{")
        started = time.monotonic()
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):  # the client sends nothing more and never closes
                received += chunk
        closed_after = time.monotonic() - started
    status, headers, body = parse_http_answer(received)
    assert status == 408, received
    assert headers["connection"] == "close", headers
    assert json.loads(body)["error_code"] == "REQUEST_TIMEOUT"
    # BODY_READ_TIMEOUT_S=1, then the close: not left for gunicorn's keep-alive timeout.
    assert closed_after < 1 + 2, closed_after
    # An ordinary answer on the same kind of connection still keeps it alive.
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
    assert parse_http_answer(head)[1]["connection"] == "keep-alive"
    assert http_caller(server.port)("GET", "/workers/slow-408")[0] == 404
