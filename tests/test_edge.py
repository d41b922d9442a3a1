"""The edge, through the production command (`gunicorn -c gunicorn.conf.py wsgi:app`):
slow and idle clients do not take the service down, made-up methods do not
grow /metrics, errors gunicorn raises before the app are JSON, and the
metrics directory is never one somebody else planted.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from app import create_app
from dev.gunicorn import Server, free_port, http_caller, serving, worker_pids

from support.service import metric_value, parse_http_answer, scrape_metrics

# Under pytest-xdist, on one worker: its gunicorn is the module's.
pytestmark = pytest.mark.xdist_group("edge")

IDLE = 50
DRIBBLING = 10
# Generous: "within a second or two" on an idle box; this one is shared.
ANSWER_WITHIN = 5.0


@pytest.fixture(scope="module")
def server(_schema):
    with serving(_schema, workers=2) as instance:
        yield instance


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WITHIN)


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True once the server closes (EOF or reset); False if it is still open after ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass  # an error answer to a partial head would come before the close
    except TimeoutError:
        return False
    except OSError:
        pass  # reset
    return True


# ---- Slow and idle clients ---------------------------------------------------------


def test_idle_and_dribbling_connections_do_not_block_others(server):
    call = http_caller(server.port, timeout=ANSWER_WITHIN)
    status, job = call("POST", "/jobs", {"node_id": "edge-1"})
    assert status == 201, job
    workers = worker_pids(server.process.pid)
    head = b"GET /healthz HTTP/1.1\r\nHost: edge\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    idle = [connect(server.port) for _ in range(IDLE)]
    dribbling = [connect(server.port) for _ in range(DRIBBLING)]
    stop = threading.Event()

    def dribble():
        # A byte a second on each slow connection, until told to stop or cut off.
        for byte in head:
            for sock in list(dribbling):
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    dribbling.remove(sock)
            if stop.wait(1.0) or not dribbling:
                return

    slow_sockets = list(dribbling)
    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    try:
        time.sleep(1.5)  # both workers have accepted some of them by now
        answers = []
        # For longer than the header-read deadline (KEEPALIVE_S, 5 s): the
        # service answers while the slow connections are held and when they
        # are cut off.
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            answers.append(call("GET", "/healthz"))
            answers.append(call("GET", "/jobs"))
            answers.append(call("GET", f"/jobs/{job['id']}"))
            time.sleep(0.2)
        assert all(status == 200 for status, _ in answers), answers
        assert answers[-1] == (200, job)
        # The header-read deadline: idle and dribbling connections are closed
        # by the server (5 s after the accept; bounded generously here).
        for sock in idle + slow_sockets:
            assert closed_by_server(sock, 30)
    finally:
        stop.set()
        thread.join(5)
        for sock in idle + slow_sockets:
            sock.close()
    assert worker_pids(server.process.pid) == workers, "a worker was killed"
    assert "WORKER TIMEOUT" not in server.log()
    assert call("GET", "/healthz")[0] == 200


def test_keep_alive_serves_several_requests_on_one_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=ANSWER_WITHIN)
    try:
        conn.connect()
        first = conn.sock
        for _ in range(3):
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b'{"status":"ok"}')
            assert response.getheader("Connection", "").lower() != "close"
            assert conn.sock is first, "the server closed a keep-alive connection"
    finally:
        conn.close()


# ---- Metrics labels come from fixed sets -------------------------------------------

KNOWN_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"}
COUNT = "jobs_http_requests_total"


def made_up_count(samples, route: str, status: str) -> float:
    return metric_value(samples, COUNT, method="other", route=route, status=status)


def test_made_up_methods_and_paths_do_not_grow_metrics(server):
    rules = {rule.rule for rule in create_app({"TESTING": True}).url_map.iter_rules()}
    call = http_caller(server.port)

    def hostile_round(offset: int, n: int) -> None:
        for i in range(offset, offset + n):
            assert call(f"N{i:06d}ZZ", "/jobs")[0] == 405
            assert call(f"X{i:06d}", f"/no/such/{i}")[0] == 404
            assert call("GET", f"/jobs/{i + 1}/nothing-{i}")[0] == 404

    hostile_round(0, 50)
    scrape_metrics(server.port)  # its own series (GET /metrics 200) exists from here on
    first = scrape_metrics(server.port)
    hostile_round(50, 100)
    second = scrape_metrics(server.port)
    # 100 more made-up methods and paths: not one more series.
    assert set(second) == set(first)
    # A 405 matched no rule for its method: Flask leaves url_rule unset.
    before, after = (made_up_count(s, "<unmatched>", "405") for s in (first, second))
    assert after - before == 100
    before, after = (made_up_count(s, "<unmatched>", "404") for s in (first, second))
    assert after - before == 100
    for name, labels in second:
        if name.startswith("jobs_http_"):
            label = dict(labels)
            assert label["method"] in KNOWN_METHODS | {"other"}, (name, label)
            assert label["route"] in rules | {"<unmatched>"}, (name, label)
            assert label.get("status", "200").isdigit(), (name, label)


# ---- Errors gunicorn answers before the app ----------------------------------------


def raw_exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as is, read until the server closes: (status, headers, body)."""
    with connect(port) as sock:
        sock.settimeout(10)
        with contextlib.suppress(OSError):  # the server may answer before reading it all
            sock.sendall(data)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    return parse_http_answer(received)


GUNICORN_ERRORS = [
    # (case, raw request, status, error_code)
    (
        "request line too long",
        b"GET /jobs/" + b"1" * 5000 + b" HTTP/1.1\r\nHost: edge\r\n\r\n",
        414,
        "URI_TOO_LONG",
    ),
    (
        "header field too large",
        b"GET /healthz HTTP/1.1\r\nHost: edge\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        431,
        "REQUEST_HEADER_FIELDS_TOO_LARGE",
    ),
    (
        "too many header fields",
        b"GET /healthz HTTP/1.1\r\nHost: edge\r\n"
        + b"".join(b"X-H%d: 1\r\n" % i for i in range(150))
        + b"\r\n",
        431,
        "REQUEST_HEADER_FIELDS_TOO_LARGE",
    ),
    ("lower-case method", b"get /healthz HTTP/1.1\r\nHost: edge\r\n\r\n", 400, "BAD_REQUEST"),
    ("malformed method", b"G@T /healthz HTTP/1.1\r\nHost: edge\r\n\r\n", 400, "BAD_REQUEST"),
    (
        "Content-Length not a number",
        b"POST /jobs HTTP/1.1\r\nHost: edge\r\nContent-Length: abc\r\n\r\n{}",
        400,
        "BAD_REQUEST",
    ),
    (
        "negative Content-Length",
        b"POST /jobs HTTP/1.1\r\nHost: edge\r\nContent-Length: -1\r\n\r\n{}",
        400,
        "BAD_REQUEST",
    ),
    (
        "two different Content-Lengths",
        b"POST /jobs HTTP/1.1\r\nHost: edge\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        400,
        "BAD_REQUEST",
    ),
    ("malformed request line", b"GARBAGE\r\n\r\n", 400, "BAD_REQUEST"),
    ("unknown HTTP version", b"GET /healthz HTTP/7.1\r\nHost: edge\r\n\r\n", 400, "BAD_REQUEST"),
    ("space in a header name", b"GET /healthz HTTP/1.1\r\nBad Name: x\r\n\r\n", 400, "BAD_REQUEST"),
]


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [case[1:] for case in GUNICORN_ERRORS],
    ids=[case[0] for case in GUNICORN_ERRORS],
)
def test_errors_before_the_app_are_json(server, data, status, code):
    got_status, headers, body = raw_exchange(server.port, data)
    assert got_status == status, body
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    parsed = json.loads(body)
    assert set(parsed) == {"error_code", "error_message"}
    assert parsed["error_code"] == code
    assert parsed["error_message"] and len(parsed["error_message"]) <= 200
    assert headers["x-request-id"]
    # The service goes on answering.
    assert http_caller(server.port)("GET", "/healthz")[0] == 200


# ---- The metrics directory -------------------------------------------------------


@pytest.fixture
def private_tmp(tmp_path):
    """A temp directory of the test's own, as TMPDIR for gunicorn (the shared one in production)."""
    path = tmp_path / "tmp"
    path.mkdir()
    return path


def metrics_dirs(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("jobs-service-metrics-*"))


def test_default_metrics_directory_is_fresh_private_and_removed(_schema, private_tmp):
    port = free_port()
    # What another user could plant at the old, predictable default path.
    victim = private_tmp / "victim"
    victim.mkdir()
    planted = private_tmp / f"jobs-service-metrics-{port}"
    planted.symlink_to(victim)
    instance = Server(
        _schema, port=port, env={"TMPDIR": str(private_tmp), "PROMETHEUS_MULTIPROC_DIR": ""}
    )
    try:
        instance.start()
        assert http_caller(port)("GET", "/healthz")[0] == 200
        scrape_metrics(port)
        (made,) = [d for d in metrics_dirs(private_tmp) if not d.is_symlink()]
        info = made.lstat()
        assert stat.S_ISDIR(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o700
        assert info.st_uid == os.geteuid()
        assert list(made.glob("*.db")), "the workers write their samples there"
        assert list(victim.iterdir()) == []
    finally:
        assert instance.stop() == 0
        instance.cleanup()
    assert not made.exists(), "the directory outlived gunicorn"
    assert planted.is_symlink() and list(victim.iterdir()) == []


def refused(env: dict, _schema) -> str:
    """Start gunicorn with ``env``; it must exit non-zero by itself. Returns its log."""
    instance = Server(_schema, env=env).launch()
    try:
        assert instance.process.wait(30) != 0
        return instance.log()
    finally:
        instance.stop()
        instance.cleanup()


def test_configured_metrics_directory_that_is_a_symlink_is_refused(_schema, private_tmp):
    victim = private_tmp / "victim"
    victim.mkdir(mode=0o700)
    link = private_tmp / "metrics"
    link.symlink_to(victim)
    log = refused({"PROMETHEUS_MULTIPROC_DIR": str(link)}, _schema)
    assert "must be a directory, not a symlink" in log
    assert list(victim.iterdir()) == []


def test_configured_metrics_directory_writable_by_others_is_refused(_schema, private_tmp):
    shared = private_tmp / "metrics"
    shared.mkdir()
    shared.chmod(0o777)
    log = refused({"PROMETHEUS_MULTIPROC_DIR": str(shared)}, _schema)
    assert "writable by others" in log
    assert list(shared.iterdir()) == []


def test_configured_metrics_directory_of_another_user_is_refused(_schema, private_tmp):
    if os.geteuid() != 0:
        pytest.skip("making a directory another user owns needs root")
    theirs = private_tmp / "metrics"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    log = refused({"PROMETHEUS_MULTIPROC_DIR": str(theirs)}, _schema)
    assert "belongs to uid 65534" in log
    assert list(theirs.iterdir()) == []


def test_configured_metrics_directory_is_emptied_at_start_and_kept(_schema, private_tmp):
    ours = private_tmp / "metrics"
    ours.mkdir(mode=0o700)
    stale = ours / "counter_1.db"
    stale.write_bytes(b"an earlier run's samples")
    instance = Server(_schema, env={"PROMETHEUS_MULTIPROC_DIR": str(ours)})
    try:
        instance.start()
        assert not stale.exists()
        assert scrape_metrics(instance.port)
    finally:
        assert instance.stop() == 0
        instance.cleanup()
    # The operator's directory: kept (with this run's samples).
    assert ours.is_dir() and list(ours.glob("*.db"))


# ---- Bodies cut short or sent too slowly -------------------------------------------------


def half_closed_exchange(port: int, data: bytes) -> tuple[int, dict]:
    """Send ``data``, close our side (a client that went away mid-body), read the answer."""
    with connect(port) as sock:
        sock.settimeout(10)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def chunked(method: str, path: str, body: bytes) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: edge\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + body
    )


def test_a_chunked_body_cut_short_is_refused_and_acts_on_nothing(server):
    """A chunk shorter than its size, then the client is gone: never read as empty or whole."""
    call = server.caller()
    assert call("PUT", "/workers/cut-w", {"info": {"version": "1.4.2"}})[0] == 200
    before = call("GET", "/workers/cut-w")[1]
    status, failed = call("POST", "/jobs", {"node_id": "cut-w"})
    assert call("PUT", f"/jobs/{failed['id']}/status", {"status": "FAILED"})[0] == 200
    for request in [
        chunked("PUT", "/workers/cut-w", b'40\r\n{"info":{"version":"2.0"}}'),
        chunked("POST", "/workers/cut-w/heartbeat", b"5\r\n"),
        chunked("DELETE", "/jobs?status=failed", b'10\r\n{"job_ids":[1]}'),
        chunked("DELETE", "/jobs?status=failed", b"20\r\n"),
        chunked("POST", "/jobs", b'40\r\n{"node_id": "cut-x"}'),
    ]:
        status, body = half_closed_exchange(server.port, request)
        assert (status, body["error_code"]) == (400, "INVALID_PAYLOAD_FORMAT"), (request, body)
    assert call("GET", "/workers/cut-w")[1] == before  # info kept, no heartbeat
    assert call("GET", f"/jobs/{failed['id']}")[0] == 200  # nothing deleted
    assert [
        j for j in call("GET", "/jobs?status=all&limit=1000")[1]["jobs"] if j["node_id"] == "cut-x"
    ] == []


def test_a_body_sent_a_byte_at_a_time_gets_408_and_the_connection_closed(_schema):
    instance = Server(_schema, workers=1, env={"BODY_READ_TIMEOUT_S": "1"})
    try:
        instance.start()
        with connect(instance.port) as sock:
            sock.settimeout(15)
            sock.sendall(
                b"PUT /workers/slow-w HTTP/1.1\r\nHost: edge\r\nContent-Length: 100\r\n\r\n{"
            )
            received = b""
            with contextlib.suppress(OSError):  # the server may close on us first
                for byte in b'"info": {}':
                    sock.sendall(bytes([byte]))
                    time.sleep(0.3)
            while chunk := sock.recv(65536):  # ends when the server closes it
                received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.split()[1] == b"408", received
        assert json.loads(body)["error_code"] == "REQUEST_TIMEOUT"
        assert instance.caller()("GET", "/workers/slow-w")[0] == 404  # nothing registered
    finally:
        instance.stop()
        instance.cleanup()
