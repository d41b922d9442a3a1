"""Slow and idle clients: what the worker class buys.

The service twice, with gunicorn.conf.py as it is (gevent) and with its
worker class overridden to sync, each while 50 connections sit idle and 10
more send a request's headers a byte a second. wrk then asks /healthz and
GET /jobs/{id} of each; its requests time out after 2 s (wrk's default).
Under sync workers each held connection blocks a worker until gunicorn's
timeout; under gevent each is a greenlet, closed after KEEPALIVE_S.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import TYPE_CHECKING

from bench.console import say
from bench.load import id_script, run_wrk

if TYPE_CHECKING:
    from bench.context import Bench

IDLE = 50
DRIBBLING = 10
WORKER_CLASSES = ("sync", "gevent")


@contextlib.contextmanager
def held_connections(port: int):
    """IDLE connections that send nothing and DRIBBLING ones sending headers at 1 byte/s."""
    stop = threading.Event()
    sockets = []
    for _ in range(IDLE + DRIBBLING):
        with contextlib.suppress(OSError):
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=2))
    request = b"GET /healthz HTTP/1.1\r\nHost: bench\r\nX-Slow: " + b"x" * 60

    def dribble(sock: socket.socket) -> None:
        for byte in request:
            if stop.wait(1.0):
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return  # the server closed it: what a header deadline does

    threads = [
        threading.Thread(target=dribble, args=(sock,), daemon=True) for sock in sockets[IDLE:]
    ]
    for thread in threads:
        thread.start()
    time.sleep(1)  # let the server take them all
    try:
        yield
    finally:
        stop.set()
        for sock in sockets:
            sock.close()
        for thread in threads:
            thread.join(timeout=2)


def slow_clients(bench: Bench) -> None:
    """Fill ``bench.slow_client_loads``: (worker class, endpoint) -> wrk result."""
    ids = range(1, bench.scenarios["mixed"].jobs + 1)
    seconds = min(5, bench.args.duration)
    for worker_class in WORKER_CLASSES:
        base = bench.service_launch(workers=2)  # a port of its own each time
        if base is None:
            return
        # Command-line settings override gunicorn.conf.py's.
        launch = {**base, "args": ["--worker-class", worker_class]}
        server = bench.serve(f"service-{worker_class}", launch)
        try:
            with held_connections(server.port):
                for endpoint, path, script in (
                    ("GET /healthz", "/healthz", None),
                    ("GET /jobs/{id}", "/", id_script(ids, "/jobs/{id}")),
                ):
                    load = run_wrk(server.url + path, seconds, bench.args.connections, script)
                    bench.slow_client_loads[(worker_class, endpoint)] = load
                    say(
                        f"{IDLE} idle + {DRIBBLING} slow clients, {worker_class:6} {endpoint:16}"
                        f" {load.rps:8.0f} req/s  p99 {load.p99_ms:.2f} ms  errors {load.errors}"
                    )
        finally:
            server.stop()
