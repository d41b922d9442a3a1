"""gunicorn settings: `gunicorn -c gunicorn.conf.py wsgi:app`.

PORT (default 8080), WEB_CONCURRENCY (default 2 processes), WORKER_CONNECTIONS
(default 1000 per process) and KEEPALIVE_S (default 5) tune it.

gevent workers, because the port is reached directly (load balancers' health
checks, in-cluster callers), so slow and idle clients must not take the
service down:
- sync: a worker serves one connection at a time and waits up to `timeout`
  (30 s) for its request: two idle connections blocked both workers,
  /healthz included, until gunicorn killed them.
- gthread (gunicorn 27.0.1, workers/gthread.py): a thread waits up to 5 s
  for a new connection's first byte, then reads the request head blocking,
  with no deadline: ten clients sending headers a byte a second hold ten
  threads for as long as they like.
- gevent (workers/ggevent.py on base_async.py): every connection is a
  greenlet, up to worker_connections per process, and each request's line
  and headers are read inside gevent.Timeout(keepalive): a connection that
  has not sent a complete request head within `keepalive` seconds (idle or
  dribbling alike) is closed, without holding anything another client needs.
The workers monkey-patch the standard library before the app is imported
(preload_app is off); psycopg2 is made cooperative by pool.py's wait
callback: it waits up to 1 ms for an answer without yielding (a hot read
answers within that, and a switch through gevent's hub costs more), then on
the socket through the (patched) select module.
"""

import contextlib
import json
import os
import shutil
import stat
import tempfile

from gunicorn import util as gunicorn_util

bind = f"0.0.0.0:{os.environ.get('PORT', '8080')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gevent"
# Connections one process holds at once (idle, reading or being answered);
# more wait in the listen backlog. Each costs a greenlet and a file
# descriptor: keep it below the open-files limit (`ulimit -n`).
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "1000"))
# Seconds a connection may take to deliver a request's line and headers,
# counted from the end of the previous response (or the accept), so it is
# both the keep-alive idle timeout and the deadline for a slow request head.
# 0 would turn both off (base_async.py reads the head without a timeout), so
# 1 is the least. Behind a load balancer that reuses connections, set it
# above the balancer's idle timeout (e.g. 65 for an ALB's 60 s). On SIGTERM a
# worker waits for its idle keep-alive connections to time out (measured:
# exit 6.3 s after SIGTERM with 5, 21.5 s with 20), at most graceful_timeout.
keepalive = max(1, int(os.environ.get("KEEPALIVE_S", "5")))
# The app is imported in each worker, after the fork: no connection or
# metrics file is ever shared between processes.
preload_app = False
timeout = 30
# SIGTERM: stop accepting, let in-flight requests finish for up to this long.
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "30"))
# The app writes one JSON line per request itself; gunicorn's own access log
# would be a second, differently shaped line.
accesslog = None
# gunicorn's control socket lives at one fixed path under $HOME: two instances
# on one host (replicas, tests) would fight over it, and nothing here uses it.
control_socket_disable = True
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")

# ---- Metrics directory -------------------------------------------------------
# prometheus-client's multiprocess mode: each worker writes its samples to
# files in PROMETHEUS_MULTIPROC_DIR and /metrics sums them. The variable must
# be set before any worker imports prometheus_client: on_starting runs in the
# master before the first fork. A path of our choosing in the shared temp
# directory could be planted (a symlink to another user's directory) before we
# start, so the default is a fresh private directory (mkdtemp: an unguessable
# name, created by us, mode 0700), removed when gunicorn exits.


def on_starting(server):
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        path = tempfile.mkdtemp(prefix="jobs-service-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        # On the arbiter, not in a global: a reload (SIGHUP) re-reads this file.
        server.jobs_metrics_dir = path
        return
    _check_own_directory(path)
    # Samples of an earlier run must not leak into this one. Only the
    # multiprocess files go; unlink never follows a symlink.
    for entry in os.scandir(path):
        if entry.name.endswith(".db") and not entry.is_dir(follow_symlinks=False):
            os.unlink(entry.path)


def _check_own_directory(path: str) -> None:
    """An explicitly configured directory: made if missing, else ours alone, never a symlink."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise RuntimeError(f"PROMETHEUS_MULTIPROC_DIR={path} must be a directory, not a symlink")
    if info.st_uid != os.geteuid():
        raise RuntimeError(
            f"PROMETHEUS_MULTIPROC_DIR={path} belongs to uid {info.st_uid}, "
            f"not to this process (uid {os.geteuid()})"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        # Others could plant files there that the workers would open and write.
        raise RuntimeError(f"PROMETHEUS_MULTIPROC_DIR={path} is writable by others (chmod go-w it)")


def on_exit(server):
    path = getattr(server, "jobs_metrics_dir", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


# ---- Errors gunicorn answers itself ----------------------------------------------
# A request gunicorn cannot parse (414 line too long, 431 headers too large,
# 400 malformed line, method, header or Content-Length, ...) never reaches the
# app: the worker's handle_error (gunicorn/workers/base.py) picks the status
# and message and util.write_error writes them as an HTML page. Every error
# of this service is JSON, so each worker swaps that one writer (handle_error
# is its only caller in gunicorn 27.0.1; tests/test_edge.py would notice a
# change) and keeps gunicorn's choice of status and message.

GUNICORN_ERROR_CODES = {
    400: "BAD_REQUEST",
    403: "FORBIDDEN",
    414: "URI_TOO_LONG",
    417: "EXPECTATION_FAILED",
    431: "REQUEST_HEADER_FIELDS_TOO_LARGE",
    500: "INTERNAL_ERROR",
    501: "NOT_IMPLEMENTED",
}


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    # Imported here, in the worker after gevent patched it, not in the master.
    from jobs.errors import error_body

    code = GUNICORN_ERROR_CODES.get(status_int) or reason.upper().replace(" ", "_")
    # mesg quotes the offending input (up to limit_request_line bytes): cut it.
    body = json.dumps(error_body(code, (mesg or reason)[:200]), separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Request-ID: {os.urandom(16).hex()}\r\n"
        "\r\n"
    )
    gunicorn_util.write_nonblock(sock, head.encode("latin-1") + body)


def post_worker_init(worker):
    gunicorn_util.write_error = write_json_error
    # gevent's server accepts up to 100 connections per wake-up: clients that
    # connect at once (a load balancer's pool, wrk -c4) then all land on the
    # worker that woke first, and with keep-alive they stay there while the
    # other worker idles (measured: GET /jobs/{id} at 1,542 req/s with a
    # p99 of 143 ms in one run, 2,913 req/s and 9 ms in another). One
    # connection per wake-up lets every worker take its share.
    from gevent.baseserver import BaseServer

    BaseServer.max_accept = 1
    _answer_waits_on_sigterm(worker)


# ---- Shutdown and waiting requests ---------------------------------------------------
# On SIGTERM a worker stops accepting and gives in-flight requests up to
# graceful_timeout. A long-polled heartbeat or events request (up to 60 s) or a
# follow stream (up to FOLLOW_MAX_S) would spend all of it waiting for nothing:
# they answer at once instead, with what they have (an empty list, the stream's
# end), and the worker exits as soon as real work is done. gunicorn has no hook
# for SIGTERM in a worker (worker_int is SIGINT/SIGQUIT), so its handler is
# wrapped.


def _answer_waits_on_sigterm(worker) -> None:
    import signal

    import gevent
    from gevent import monkey

    from jobs import waiting

    exit_handler = signal.getsignal(signal.SIGTERM)
    greenlets = monkey.is_module_patched("threading")

    def on_sigterm(sig, frame):
        exit_handler(sig, frame)
        if greenlets:
            # Out of the signal handler, which may run in gevent's hub, where
            # nothing may block (as gunicorn's own handle_quit does).
            gevent.spawn(waiting.stop_all)
        else:
            waiting.stop_all()

    signal.signal(signal.SIGTERM, on_sigterm)
