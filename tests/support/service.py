"""Talking to the service: apps, requests through a ``Call``, bodies, answers, metrics.

A ``Call`` is ``call(method, path, body=None) -> (status, parsed JSON or None)``,
the same over the Flask test client (``flask_caller``) and over HTTP to a real
gunicorn (``dev.gunicorn.http_caller``, ``Server.caller``), so a workload or a
check written once runs both ways.

- Apps: ``make_app`` (test settings of a test's own over the environment's),
  ``drop_pool`` (its idle connections closed), ``KeptApp`` (the ``app``
  fixture's: one app for a process's tests, as a new one would be); the ``apps``
  fixture of conftest.py makes them for a test and drops their pools afterwards.
- Requests: ``flask_caller``, ``create_job``, ``move_to`` (along
  ``SETUP_PATHS``), ``job_statuses``, ``events_of``, ``sweep_leases`` (the
  lease chore, run once in process); through a Flask test client,
  ``new_job``, ``register_files``, ``job_in`` (a node's job in a status),
  ``status_of`` (a job's status) and ``register_worker``.
- Every route once: ``seed_two_jobs`` and ``route_plan``.
- Values and bodies: ``MAX_ID``, ``block_hash``, ``file_entry``, ``detail_of`` (a
  report's detail of an exact size as compact JSON, ``compact_size``).
- Answers: ``assert_error`` (the error shape of every 4xx/5xx; returns the message),
  ``parse_http_answer`` (an answer read off a raw socket).
- Metrics: ``parse_metrics`` (a /metrics text), ``metric_samples`` (/metrics
  through a test client), ``scrape_metrics`` (/metrics over HTTP),
  ``metric_value``, ``served_metric`` (one sample of a server's /metrics).
"""

from __future__ import annotations

import http.client
import itertools
import json

from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from dev.gunicorn import Call
from jobs import chores, db, settings
from jobs.chores import leases

# ---- Apps ---------------------------------------------------------------------------


def make_app(database_url: str | None, **config):
    """The app with test settings of its own over the environment's: no tokens (the
    open service) unless ``config`` sets them, whatever the environment says."""
    return create_app(
        {
            "TESTING": True,
            "DATABASE_URL": database_url,
            "ADMIN_TOKEN": None,
            "WORKER_TOKEN": None,
            **config,
        }
    )


def drop_pool(app) -> None:
    """Close the app's idle pooled connections (if it ever opened a pool), and its
    replicas' connections (if it has any)."""
    pool = app.extensions.get("jobs_db_pool")
    if pool is not None:
        pool.drop_idle()
    replicas = app.extensions.get("jobs_db_replicas")
    if replicas is not None:
        replicas.close()


class KeptApp:
    """The ``app`` fixture's app: one for the process's tests, lent to each as a new
    one would be.

    A new app for each test cost 15 ms of CPU (Werkzeug compiling the routes), and its
    first pooled connection 10 ms more between the test and the server: about 35 s of
    a run's 460 (BENCHMARKS.md, "The test suite"). The pool and its connections are
    kept; the rest is put back as made: whatever the service makes on first use (the
    waiting hub, readiness, replicas, the worker count) closed and dropped, the
    chores' timers at zero. An app whose config a test changed (its pool may have
    taken the change), or made under other settings, is replaced instead.
    """

    def __init__(self):
        self.app = None
        self._made_under = None

    def lend(self, database_url: str):
        under = (database_url, settings.from_environment())
        if self.app is not None and self._made_under != under:
            self.discard()
        if self.app is None:
            self.app = make_app(database_url)
            self._made_under = under
            self._config = dict(self.app.config)
            self._extensions = set(self.app.extensions)
        return self.app

    def take_back(self) -> None:
        if self.app is None:
            return
        if dict(self.app.config) != self._config:
            self.discard()
            return
        self._drop_first_use_state()
        for chore in chores.of(self.app).by_name.values():
            chore.next_check = 0.0

    def discard(self) -> None:
        if self.app is not None:
            self._drop_first_use_state()
            drop_pool(self.app)
            self.app = None

    def _drop_first_use_state(self) -> None:
        extensions = self.app.extensions
        for name in set(extensions) - self._extensions - {"jobs_db_pool"}:
            close = getattr(extensions.pop(name), "close", None)
            if close is not None:
                close()


# ---- Requests through a Call --------------------------------------------------------

# How to bring a new (SCHEDULED) job to each status ("stop" is the operator's
# stop); RETRIED is a job that failed and was scheduled again.
SETUP_PATHS = {
    "SCHEDULED": [],
    "RUNNING": ["RUNNING"],
    "STOP_REQUESTED": ["stop"],
    "STOPPING": ["stop", "STOPPING"],
    "COMPLETED": ["RUNNING", "COMPLETED"],
    "FAILED": ["RUNNING", "FAILED"],
    "STOPPED": ["stop", "STOPPING", "STOPPED"],
    "RETRIED": ["FAILED", "SCHEDULED"],
}


def flask_caller(app) -> Call:
    """A ``Call`` over the app's test client."""
    client = app.test_client()

    def call(method: str, path: str, body=None):
        kwargs = {} if body is None else {"json": body}
        response = client.open(path, method=method, **kwargs)
        return response.status_code, response.get_json(silent=True)

    return call


def create_job(call: Call, node_id: str = "worker-01", **extra) -> dict:
    """A new job (setup: fails the test unless it is created)."""
    code, body = call("POST", "/jobs", {"node_id": node_id, "descriptor": {}, **extra})
    assert code == 201, body
    return body


def move_to(call: Call, job_id: int, status: str) -> None:
    """Bring a new job to ``status`` along SETUP_PATHS (setup: every step must succeed)."""
    for step in SETUP_PATHS[status]:
        if step == "stop":
            code, body = call("PUT", f"/jobs/{job_id}/stop")
        else:
            code, body = call("PUT", f"/jobs/{job_id}/status", {"status": step})
        assert code == 200, body


def job_statuses(call: Call) -> dict[int, str]:
    """Every job that exists, id -> status, through the paginated listing."""
    jobs: dict[int, str] = {}
    path = "/jobs?status=all&limit=1000"
    while True:
        code, body = call("GET", path)
        assert code == 200, body
        jobs.update((j["id"], j["status"]) for j in body["jobs"])
        if body["next_cursor"] is None:
            return jobs
        path = f"/jobs?status=all&limit=1000&last_job_id={body['next_cursor']}"


def events_of(call: Call, job_id: int) -> list[dict]:
    code, body = call("GET", f"/jobs/{job_id}/events")
    assert code == 200, body
    return body["events"]


def new_job(client) -> int:
    """A new job through a Flask test client (setup): its ID."""
    response = client.post("/jobs", json={"node_id": "worker-01", "descriptor": {}})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def register_files(client, job_id: int, table: str, *files, expect: int = 201):
    """POST /jobs/{id}/tables/{table}/files through a Flask test client: one file is
    sent as the object itself, several (or one list) as a list; the response."""
    payload = list(files) if len(files) != 1 else files[0]
    response = client.post(f"/jobs/{job_id}/tables/{table}/files", json=payload)
    assert response.status_code == expect, response.data
    return response


def job_in(client, node_id: str, status: str) -> int:
    """A job of ``node_id`` brought to ``status``."""
    call = flask_caller(client.application)
    job = create_job(call, node_id)
    move_to(call, job["id"], status)
    return job["id"]


def status_of(client, job_id: int) -> str:
    return client.get(f"/jobs/{job_id}").get_json()["status"]


def register_worker(client, node_id: str, body=None, **kwargs) -> dict:
    """PUT /workers/{node_id} (with ``body`` as JSON, or the client's other arguments),
    answered 200: the worker."""
    kwargs = {"json": body} if body is not None else kwargs
    response = client.put(f"/workers/{node_id}", **kwargs)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def sweep_leases(app) -> dict[str, int]:
    """Run the lease chore once in process, unclaimed: the jobs it moved, by new status."""
    with app.app_context(), db.transaction() as cur:
        return leases.expire_leases(cur, app.config)


# ---- Every route once ---------------------------------------------------------------

_route_plan_names = itertools.count()


def seed_two_jobs(call: Call) -> tuple[int, int]:
    """Two new jobs, ``a`` and ``b``, for route_plan."""
    ids = []
    for node in ("plan-a", "plan-b"):
        status, job = call("POST", "/jobs", {"node_id": node})
        assert status == 201, job
        ids.append(job["id"])
    return ids[0], ids[1]


def route_plan(a: int, b: int) -> list[tuple]:
    """Every API route once, as (method, path, body, status while the database
    answers, the route's *_ERROR when it does not). On the two jobs of
    seed_two_jobs it stops ``a`` and starts ``b``; the file registration is
    entry 8. Each call registers a file of a new name."""
    n = next(_route_plan_names)
    a_file = {"file_name": f"plan{n}", "start_block": n, "end_block": n, "size_bytes": 1}
    return [
        ("GET", "/jobs?status=all", None, 200, "LIST_JOBS_ERROR"),
        ("POST", "/jobs", {"node_id": "plan-w"}, 201, "CREATE_JOB_ERROR"),
        ("GET", f"/jobs/{a}", None, 200, "GET_JOB_ERROR"),
        ("GET", f"/jobs/{a}/progress", None, 200, "GET_JOB_ERROR"),
        ("GET", f"/jobs/{a}/events", None, 200, "GET_JOB_EVENTS_ERROR"),
        ("PUT", f"/jobs/{a}/stop", None, 200, "STOP_JOB_ERROR"),
        ("POST", f"/jobs/{a}/stop", None, 200, "STOP_JOB_ERROR"),
        ("PUT", f"/jobs/{b}/status", {"status": "RUNNING"}, 200, "UPDATE_JOB_STATUS_ERROR"),
        ("POST", f"/jobs/{a}/tables/blocks/files", a_file, 201, "REGISTER_FILES_ERROR"),
        ("DELETE", "/jobs/987654321", None, 204, "DELETE_JOB_ERROR"),
        ("DELETE", "/jobs?status=terminal", None, 204, "DELETE_JOBS_BY_STATUS_ERROR"),
        ("DELETE", "/jobs", {"job_ids": [987654321]}, 204, "DELETE_JOBS_ERROR"),
        # A page size that is not prepared: the same SQL, planned per request.
        ("GET", "/jobs?status=all&limit=7", None, 200, "LIST_JOBS_ERROR"),
        ("GET", f"/jobs/{a}/events/987654321", None, 404, "GET_JOB_EVENT_ERROR"),
        ("PUT", "/workers/plan-w", None, 200, "REGISTER_WORKER_ERROR"),
        ("POST", "/workers/plan-w/heartbeat", None, 200, "WORKER_HEARTBEAT_ERROR"),
        ("GET", "/workers", None, 200, "SCHEDULER_LIST_WORKERS_ERROR"),
        ("GET", "/workers/plan-w", None, 200, "SCHEDULER_GET_WORKER_ERROR"),
        # Another worker: deregistering plan-w would make a repeated plan (the
        # failover test runs it in a loop) meet its GET in between, a 404.
        ("DELETE", "/workers/plan-gone", None, 204, "DELETE_WORKER_ERROR"),
    ]


# ---- Values and bodies --------------------------------------------------------------

MAX_ID = 2**63 - 1  # the largest job ID, block number and size: PostgreSQL's bigint


def block_hash(n: int) -> str:
    """A well-formed block hash (0x and 64 hex digits), distinct for each ``n``."""
    return "0x" + f"{n:064x}"


def file_entry(
    name: str,
    start: int,
    end: int,
    size: int = 1,
    block_hash: str | None = None,
    prev_hash: str | None = None,
) -> dict:
    """One file of POST /jobs/{id}/tables/{table}/files; hashes left out when None."""
    body = {"file_name": name, "start_block": start, "end_block": end, "size_bytes": size}
    if block_hash is not None:
        body["block_hash"] = block_hash
    if prev_hash is not None:
        body["prev_hash"] = prev_hash
    return body


def compact_size(value) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def detail_of(size: int) -> dict:
    """A detail of exactly ``size`` bytes as compact JSON."""
    detail = {"error": ""}
    detail["error"] = "x" * (size - compact_size(detail))
    assert compact_size(detail) == size
    return detail


# ---- Answers ------------------------------------------------------------------------

LEAKS_IN_MESSAGES = ("Traceback", "psycopg2", "SELECT ", "INSERT ", 'File "')


def assert_error(response, status: int, code: str) -> str:
    """A Flask test response is exactly the error shape; returns its message.

    JSON ``{"error_code", "error_message"}`` and nothing else, the code given,
    a message that says something and leaks no stack trace or SQL.
    """
    assert response.status_code == status, (response.status_code, response.data[:400])
    assert response.mimetype == "application/json", response.headers
    body = json.loads(response.data)
    assert set(body) == {"error_code", "error_message"}, body
    assert body["error_code"] == code, body
    message = body["error_message"]
    assert isinstance(message, str) and message.strip(), body
    for leak in LEAKS_IN_MESSAGES:
        assert leak not in message, body
    return message


def parse_http_answer(received: bytes) -> tuple[int, dict[str, str], bytes]:
    """An HTTP answer as read off a socket: (status, {lower-case header: value}, body)."""
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


# ---- Metrics -------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """A /metrics text as {(sample name, frozenset of labels): value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric_samples(client) -> dict[tuple[str, frozenset], float]:
    """/metrics through a Flask test ``client``, parsed by ``parse_metrics``."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    return parse_metrics(response.get_data(as_text=True))


def scrape_metrics(port: int) -> dict[tuple[str, frozenset], float]:
    """/metrics of a server on 127.0.0.1:``port``, parsed by ``parse_metrics``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode()
        assert response.status == 200
        assert response.getheader("Content-Type").startswith("text/plain")
    finally:
        conn.close()
    return parse_metrics(text)


def served_metric(server, name: str, **labels) -> float:
    """One sample of a gunicorn instance's /metrics (summed over its processes), 0 if absent."""
    return metric_value(scrape_metrics(server.port), name, **labels)


def metric_value(samples, name, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)
