"""gunicorn settings: `gunicorn -c gunicorn.conf.py wsgi:app`.

PORT, WEB_CONCURRENCY, WORKER_CONNECTIONS, KEEPALIVE_S, GRACEFUL_TIMEOUT,
FORWARDED_ALLOW_IPS and GUNICORN_LOG_LEVEL tune it: jobs/settings.py holds
each one's default and range with the service's own settings, and every one of
them is read and checked here, once, in the master: a malformed or
out-of-range value stops the start-up (exit 1) with a message naming it,
before any worker is forked.

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
import sys
import tempfile

from gunicorn import util as gunicorn_util
from gunicorn.http.errors import ConfigurationProblem, InvalidHeader
from gunicorn.http.wsgi import Response

from jobs import settings

try:
    SETTINGS = settings.for_gunicorn()
except settings.SettingsError as exc:
    # SystemExit passes gunicorn's "Failed to read config file" traceback by:
    # the operator reads only what is wrong and what is allowed.
    print(f"jobs: cannot start, settings not allowed:\n{exc}", file=sys.stderr)
    raise SystemExit(1) from None

bind = f"0.0.0.0:{SETTINGS['PORT']}"
workers = SETTINGS["WEB_CONCURRENCY"]
worker_class = "gevent"
# Connections one process holds at once (idle, reading or being answered);
# more wait in the listen backlog. Each costs a greenlet and a file
# descriptor: keep it below the open-files limit (`ulimit -n`).
worker_connections = SETTINGS["WORKER_CONNECTIONS"]
# Seconds a connection may take to deliver a request's line and headers,
# counted from the end of the previous response (or the accept), so it is
# both the keep-alive idle timeout and the deadline for a slow request head.
# 0 would turn both off (base_async.py reads the head without a timeout), so
# 1 is the least. Behind a load balancer that reuses connections, set it
# above the balancer's idle timeout (e.g. 65 for an ALB's 60 s). On SIGTERM a
# worker waits for its idle keep-alive connections to time out, at most
# graceful_timeout (BENCHMARKS.md, "Design measurements: Keep-alive and SIGTERM").
keepalive = SETTINGS["KEEPALIVE_S"]
# The app is imported in each worker, after the fork: no connection or
# metrics file is ever shared between processes.
preload_app = False
timeout = 30
# SIGTERM: stop accepting, let in-flight requests finish for up to this long.
graceful_timeout = SETTINGS["GRACEFUL_TIMEOUT"]
# Whose SCRIPT_NAME, X-Forwarded-Proto (and the other secure_scheme_headers)
# gunicorn believes. gunicorn's default, 127.0.0.1 (or its own reading of
# FORWARDED_ALLOW_IPS), trusted every local process: `SCRIPT_NAME: /public`
# had DELETE /public/jobs/1 served as DELETE /jobs/1. None unless configured;
# from any other peer such headers change nothing (SCRIPT_NAME, with an
# underscore, is dropped: gunicorn's header_map "drop").
forwarded_allow_ips = SETTINGS["FORWARDED_ALLOW_IPS"]
header_map = "drop"  # gunicorn's default, relied upon above
# The app writes one JSON line per request itself; gunicorn's own access log
# would be a second, differently shaped line.
accesslog = None
# gunicorn's control socket lives at one fixed path under $HOME: two instances
# on one host (replicas, tests) would fight over it, and nothing here uses it.
control_socket_disable = True
errorlog = "-"
loglevel = SETTINGS["GUNICORN_LOG_LEVEL"]

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
# change) and keeps gunicorn's choice of status and message, but for one: a
# path outside a trusted proxy's SCRIPT_NAME is the request's fault, a 400, not
# the 500 gunicorn gives it (ForwardedPathMismatch below).

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


class ForwardedPathMismatch(InvalidHeader):
    """A trusted proxy's SCRIPT_NAME that the request's path does not start with.

    gunicorn raises ConfigurationProblem, which its handle_error answers 500
    ("Configuration problem"): a request, not the server, is at fault, so it
    is answered as the malformed header it is, 400 BAD_REQUEST.
    """

    def __init__(self):
        super().__init__("SCRIPT_NAME")

    def __str__(self):
        return "the request path does not start with the SCRIPT_NAME header's prefix"


def _errors_of_requests_are_4xx(handle_error):
    def handle(req, client, addr, exc):
        if isinstance(exc, ConfigurationProblem):
            exc = ForwardedPathMismatch()
        return handle_error(req, client, addr, exc)

    return handle


# ---- Connection: close, when the app says so -------------------------------------------
# gunicorn drops the app's hop-by-hop headers and writes its own Connection
# header (http/wsgi.py, Response.process_headers and default_headers): the
# 408 REQUEST_TIMEOUT, answered while the rest of its body may still be on its
# way, said "Connection: keep-alive" and then closed. An app's
# "Connection: close" now makes gunicorn close after the response and say so.
_process_headers = Response.process_headers


def _process_headers_closing(self, headers):
    _process_headers(self, headers)
    for name, value in headers:
        if name.lower() == "connection" and "close" in value.lower().replace(" ", "").split(","):
            self.force_close()


def post_worker_init(worker):
    gunicorn_util.write_error = write_json_error
    worker.handle_error = _errors_of_requests_are_4xx(worker.handle_error)
    Response.process_headers = _process_headers_closing
    # gevent's server accepts up to 100 connections per wake-up: clients that
    # connect at once (a load balancer's pool, wrk -c4) then all land on the
    # worker that woke first, and with keep-alive they stay there while the
    # other worker idles (BENCHMARKS.md, "How the service gets there", and
    # "Design measurements: Connections landing on one worker"). One
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
