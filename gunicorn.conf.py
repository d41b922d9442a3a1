"""gunicorn settings: `gunicorn -c gunicorn.conf.py wsgi:app`.

PORT (default 8080) and WEB_CONCURRENCY (default 2) tune it. Sync workers: on
a 2-core box two of them matched threaded workers in throughput with a better
p99, and a sync worker holds at most one database connection.
"""

import os
import shutil
import tempfile

bind = f"0.0.0.0:{os.environ.get('PORT', '8080')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "sync"
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

# prometheus-client's multiprocess mode: each worker writes its samples to
# files in this directory and /metrics sums them. It must be set before any
# worker imports prometheus_client, and emptied when the server starts so
# samples of an earlier run do not leak into this one.
os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR",
    os.path.join(tempfile.gettempdir(), f"jobs-service-metrics-{bind.rsplit(':', 1)[1]}"),
)


def on_starting(server):
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
