"""Calls that check the documented shapes (docs/API.md, Objects): each request made
through a Flask test client, its answer checked against docs/API.md and against the
marshmallow schema that documents it (schemas.py), then returned.

- Reading answers: ``TS`` (the timestamp format), ``parse_ts``, ``assert_recent``,
  ``body_of`` (a JSON body), ``names`` (a message names a status), ``check_job``,
  and the key sets and schema instances they check with.
- Calls: ``create``, ``get_job``, ``report``, ``stop``, ``events``,
  ``event_types``, ``progress``, ``list_jobs``, ``all_jobs``.
- Jobs in a status: ``PATHS`` (the shortest chain of legal moves from creation
  to each status, from support/oracle.py's status machine), ``drive`` (a new
  job along it), ``make_job`` (a new job driven there).

Expected values come from docs/API.md, written out by hand (the transition
table in support/oracle.py), never from the service's own constants.
"""

from __future__ import annotations

import json
import re
from collections import deque
from datetime import UTC, datetime, timedelta

from jobs.schemas import EventListSchema, JobListSchema, JobSchema, ProgressSchema

from support.oracle import JOB_FIELDS, STATUSES, STOPPABLE, WORKER_MOVES

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
# One instance of each (a marshmallow schema deep-copies its fields when made: 3.6 s
# of the API tests' CPU when made for every check).
JOB_SCHEMA, JOB_LIST_SCHEMA = JobSchema(), JobListSchema()
EVENT_LIST_SCHEMA, PROGRESS_SCHEMA = EventListSchema(), ProgressSchema()
JOB_KEYS = set(JOB_FIELDS)
EVENT_KEYS = {"id", "created_at", "event_type", "node_id", "detail"}
TABLE_KEYS = {"start_block", "current_block", "files_count", "total_size_bytes"}


def _moves():
    """(from, to, how) for every legal move: the documented status machine plus the stop request."""
    moves = [(f, t, "status") for f, tos in WORKER_MOVES.items() for t in sorted(tos)]
    moves += [(f, "STOP_REQUESTED", "stop") for f in sorted(STOPPABLE)]
    return moves


def _paths():
    """The shortest chain of legal moves from creation to each status."""
    paths = {"SCHEDULED": []}
    queue = deque(["SCHEDULED"])
    while queue:
        current = queue.popleft()
        for source, to, how in _moves():
            if source == current and to not in paths:
                paths[to] = [*paths[current], (to, how)]
                queue.append(to)
    assert set(paths) == set(STATUSES)
    return paths


PATHS = _paths()


# ---- Reading answers ---------------------------------------------------------------


def parse_ts(text: str) -> datetime:
    assert TS.match(text), text
    return datetime.fromisoformat(text)  # TS is exact; "Z" reads as UTC


def assert_recent(text: str):
    """A timestamp in UTC, close to now (a local-time rendering would be hours off)."""
    moment = parse_ts(text)
    now = datetime.now(UTC)
    assert now - timedelta(minutes=5) <= moment <= now + timedelta(minutes=5), text


def body_of(response):
    assert response.mimetype == "application/json", response.headers
    return json.loads(response.data)


def names(word: str, message: str) -> bool:
    return re.search(rf"(?<![A-Z_]){re.escape(word)}(?![A-Z_])", message) is not None


def check_job(job: dict) -> dict:
    assert JOB_SCHEMA.validate(job) == {}, job
    assert set(job) == JOB_KEYS
    assert isinstance(job["id"], int)
    assert not isinstance(job["id"], bool)
    assert job["status"] in STATUSES
    assert isinstance(job["descriptor"], dict)
    assert_recent(job["created_at"])
    assert_recent(job["updated_at"])
    assert parse_ts(job["updated_at"]) >= parse_ts(job["created_at"])
    return job


# ---- Calls ---------------------------------------------------------------------------


def create(client, node_id="worker-01", descriptor=None, **extra) -> dict:
    payload = {"node_id": node_id, "descriptor": {"table": "blocks"}, **extra}
    if descriptor is not None:
        payload["descriptor"] = descriptor
    response = client.post("/jobs", json=payload)
    assert response.status_code == 201, response.data
    job = check_job(body_of(response))
    assert job["status"] == "SCHEDULED"
    assert response.headers["Location"] == f"/jobs/{job['id']}"
    return job


def get_job(client, job_id) -> dict:
    response = client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.data
    return check_job(body_of(response))


def report(client, job_id, status, expect=200, **extra):
    response = client.put(f"/jobs/{job_id}/status", json={"status": status, **extra})
    assert response.status_code == expect, response.data
    if expect == 200:
        return check_job(body_of(response))
    return response


def stop(client, job_id, method="PUT") -> dict:
    response = client.open(f"/jobs/{job_id}/stop", method=method)
    assert response.status_code == 200, response.data
    return check_job(body_of(response))


def events(client, job_id) -> list[dict]:
    response = client.get(f"/jobs/{job_id}/events")
    assert response.status_code == 200, response.data
    body = body_of(response)
    assert EVENT_LIST_SCHEMA.validate(body) == {}, body
    assert set(body) == {"job_id", "events", "next_cursor"}
    assert body["next_cursor"] is None  # every history here fits one page
    assert body["job_id"] == job_id
    ids = [e["id"] for e in body["events"]]
    assert ids == sorted(set(ids)), "events are oldest first, each once"
    stamps = [parse_ts(e["created_at"]) for e in body["events"]]
    assert stamps == sorted(stamps)
    for event in body["events"]:
        assert set(event) == EVENT_KEYS
        assert_recent(event["created_at"])
    return body["events"]


def event_types(client, job_id) -> list[str]:
    return [e["event_type"] for e in events(client, job_id)]


def progress(client, job_id) -> dict:
    response = client.get(f"/jobs/{job_id}/progress")
    assert response.status_code == 200, response.data
    body = body_of(response)
    assert PROGRESS_SCHEMA.validate(body) == {}, body
    assert set(body) == {"job_id", "job_status", "tables"}
    assert body["job_id"] == job_id
    for entry in body["tables"].values():
        assert set(entry) == TABLE_KEYS
    return body


def list_jobs(client, **params) -> dict:
    response = client.get("/jobs", query_string=params)
    assert response.status_code == 200, response.data
    body = body_of(response)
    assert JOB_LIST_SCHEMA.validate(body) == {}, body
    assert set(body) == {"jobs", "next_cursor"}
    for job in body["jobs"]:
        check_job(job)
    ids = [j["id"] for j in body["jobs"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids), "newest first"
    return body


def all_jobs(client) -> list[dict]:
    body = list_jobs(client, status="all", limit=1000)
    assert body["next_cursor"] is None
    return body["jobs"]


# ---- Jobs in a status ------------------------------------------------------------------


def drive(client, job: dict, status: str) -> dict:
    """Move a new (SCHEDULED) job to ``status`` through legal moves only."""
    assert job["status"] == "SCHEDULED"
    for to, how in PATHS[status]:
        job = stop(client, job["id"]) if how == "stop" else report(client, job["id"], to)
        assert job["status"] == to
    return job


def make_job(client, status: str, node_id="worker-01", descriptor=None) -> dict:
    """A new job driven to ``status`` through legal moves only."""
    job = drive(client, create(client, node_id=node_id, descriptor=descriptor), status)
    assert get_job(client, job["id"]) == job
    return job
