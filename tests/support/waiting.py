"""What the tests of waiting (test_waiting*.py) share: waiting in the background,
knowing when a request waits, reading a follow stream, and many waiters on raw sockets.

- ``Background``: one HTTP request in a thread, its answer and when it came.
- ``until(predicate)``: poll until it returns something true (also for
  test_failover and test_replicas).
- ``until_waiting(db_conn, node_id)``: a long-polled heartbeat of that worker
  has arrived (its mark is in the worker's row, which the arrival statement
  writes after the request registered to be woken).
- ``waiting_requests(server, kind)``: the instance's gauge of waiting requests
  (support.service.served_metric for any other sample of its /metrics).
- ``EventStreamReader``: a follow stream, frame by frame (``id``, ``event``,
  ``data``) and comment lines, with a deadline on each read.
- ``RawWaiters``: many requests sent at once on raw sockets, read with select.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from support.service import served_metric


class Background:
    """``call(method, path, body)`` in a thread: ``result`` and ``answered_at`` once done."""

    def __init__(self, call, method: str, path: str, body=None):
        self.result = None
        self.error: BaseException | None = None
        self.answered_at: float | None = None
        self.started_at = time.monotonic()

        def run():
            try:
                self.result = call(method, path, body)
            except BaseException as exc:  # reported by join()
                self.error = exc
            self.answered_at = time.monotonic()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 15):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the request did not answer in time"
        if self.error is not None:
            raise self.error
        return self.result

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()


def until(predicate, timeout: float = 10, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def until_waiting(db_conn, node_id: str, timeout: float = 10) -> None:
    """Until a waiting heartbeat of ``node_id`` has arrived (and so is registered)."""

    def marked():
        with db_conn.cursor() as cur:
            cur.execute(
                "SELECT waiting_until IS NOT NULL FROM workers WHERE node_id = %s", (node_id,)
            )
            row = cur.fetchone()
        return row is not None and row[0]

    until(marked, timeout, what=f"a waiting heartbeat of {node_id}")


def waiting_requests(server, kind: str) -> float:
    """The instance's jobs_waiting_requests{kind}."""
    return served_metric(server, "jobs_waiting_requests", kind=kind)


def until_requests_wait(server, kind: str, count: int = 1, timeout: float = 10) -> None:
    until(
        lambda: waiting_requests(server, kind) >= count,
        timeout,
        interval=0.05,
        what=f"{count} waiting {kind} request(s)",
    )


@dataclass
class Frame:
    """One event of a stream, as the event-stream format carries it."""

    id: str | None = None
    event: str | None = None
    data: list[str] = field(default_factory=list)

    def json(self):
        return json.loads("\n".join(self.data))


class EventStreamReader:
    """GET a follow stream and read it; ``comments`` counts the comment lines seen."""

    def __init__(self, port: int, path: str, headers: dict | None = None, timeout: float = 10):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.conn.request("GET", path, headers=headers or {})
        self.response = self.conn.getresponse()
        self.comments = 0
        self.ended = False

    @property
    def status(self) -> int:
        return self.response.status

    def header(self, name: str) -> str | None:
        return self.response.getheader(name)

    def next_frame(self) -> Frame | None:
        """The next event, or None when the stream ended (blocking up to the timeout)."""
        frame = Frame()
        while True:
            line = self.response.readline()
            if not line:
                self.ended = True
                return None
            text = line.decode().rstrip("\n")
            if text == "":
                if frame.data:
                    return frame
                frame = Frame()
                continue
            if text.startswith(":"):
                self.comments += 1
                continue
            name, _, value = text.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                frame.data.append(value)
            elif name in ("id", "event"):
                setattr(frame, name, value)

    def frames_until_end(self, limit: int = 100) -> list[Frame]:
        frames = []
        while (frame := self.next_frame()) is not None:
            frames.append(frame)
            assert len(frames) <= limit, "the stream did not end"
        return frames

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()


class RawWaiters:
    """``requests`` (raw HTTP/1.1 request bytes) sent on as many sockets at once; their
    status lines read with one selector, so a thousand cost no thread each."""

    def __init__(self, port: int, requests: list[bytes]):
        self.selector = selectors.DefaultSelector()
        self.answers: dict[int, bytes] = {}
        self.answered_at: dict[int, float] = {}
        self._buffers: dict[int, bytes] = {}
        self.socks = []
        for i, raw in enumerate(requests):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(raw)
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, i)
            self.socks.append(sock)
            self._buffers[i] = b""

    def pump(self, timeout: float) -> None:
        """Read whatever arrives for up to ``timeout`` seconds (complete answers are kept)."""
        deadline = time.monotonic() + timeout
        while self.selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in self.selector.select(left):
                i, sock = key.data, key.fileobj
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue
                self._buffers[i] += chunk
                if not chunk or _complete(self._buffers[i]):
                    self.answers[i] = self._buffers[i]
                    self.answered_at[i] = time.monotonic()
                    self.selector.unregister(sock)

    def status(self, i: int) -> int | None:
        answer = self.answers.get(i)
        return int(answer.split(b" ", 2)[1]) if answer else None

    def body(self, i: int):
        return json.loads(self.answers[i].partition(b"\r\n\r\n")[2])

    def close(self) -> None:
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.close()
        self.selector.close()


def _complete(buffer: bytes) -> bool:
    head, sep, body = buffer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def raw_request(method: str, path: str) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n".encode()
