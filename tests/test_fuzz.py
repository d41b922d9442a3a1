"""Schemathesis against the service's own /openapi.json, in-process (WSGI).

Every operation gets a bounded, derandomized run (schemathesis' coverage
cases, then up to 60 generated ones) of valid and of schema-violating
requests, with the admin token set and sent. Every response must not be a
server error, must have a documented status code and content type, and must
match the documented response schema; schema-violating requests (a bad
parameter, a bad body, no token) must be refused, and unsupported methods
answered 405 with a correct Allow header. Three jobs exist (IDs 1..3) and
valid cases are steered at them, so that not every request is a 404.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from app import create_app

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    unsupported_method,
    allow_header_conformance,
]

FUZZ_SETTINGS = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
)


# The schema is read once, at collection, from an app whose database is set per
# test by ``database`` below (the pool is created on first use, so it follows).
TOKEN = "fuzz-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
APP = create_app(
    {
        "TESTING": True,
        "DATABASE_URL": "postgresql://unset.invalid/none",
        "ADMIN_TOKEN": TOKEN,
        "WORKER_TOKEN": None,
    }
)
schema = schemathesis.openapi.from_wsgi("/openapi.json", APP)


@schema.auth()
class AdminToken:
    """The admin token on every request (negative cases that drop it must get 401)."""

    def get(self, case, ctx):
        return TOKEN

    def set(self, case, data, ctx):
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@pytest.fixture(autouse=True)
def database(app):
    """``app`` has emptied the database; point APP at it and seed three jobs."""
    APP.config["DATABASE_URL"] = app.config["DATABASE_URL"]
    APP.extensions.pop("jobs_db_pool", None)
    client = APP.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = AUTH["Authorization"]
    for node in ("fuzz-a", "fuzz-b", "fuzz-c"):
        assert client.post("/jobs", json={"node_id": node}).status_code == 201
    assert client.put("/jobs/2/status", json={"status": "RUNNING"}).status_code == 200
    assert client.put("/jobs/3/status", json={"status": "FAILED"}).status_code == 200
    yield
    APP.extensions.pop("jobs_db_pool").drop_idle()


def aim_at_real_jobs(case) -> None:
    """Steer valid cases where a schema cannot: toward the seeded jobs, and past the
    rules JSON Schema does not express (end_block >= start_block, printable names)."""
    job_id = (case.path_parameters or {}).get("job_id")
    if isinstance(job_id, int) and job_id > 4:
        case.path_parameters["job_id"] = job_id % 4 + 1  # 1..3 exist, 4 does not
    # A valid wait or follow stream on a job that does not change would only spend
    # its seconds (up to MAX_WAIT_S each; 237 s for the events route alone): a wait
    # asks for none, a stream follows the job that has ended (3). test_waiting
    # drives both for real.
    query = case.query or {}
    if query.get("wait") not in (None, 0, "0"):
        query["wait"] = 0
    if query.get("follow") in (True, "true"):
        case.path_parameters["job_id"] = 3
    if case.path.endswith("/files"):
        files = case.body if isinstance(case.body, list) else [case.body]
        for f in files:
            if not isinstance(f, dict):
                continue
            if isinstance(f.get("start_block"), int) and isinstance(f.get("end_block"), int):
                f["start_block"], f["end_block"] = sorted((f["start_block"], f["end_block"]))
            if isinstance(f.get("file_name"), str):
                f["file_name"] = "".join(c if c.isprintable() else "_" for c in f["file_name"])


@schema.parametrize()
@FUZZ_SETTINGS
def test_api(case):
    if case.meta is not None and case.meta.generation.mode.is_positive:
        aim_at_real_jobs(case)
    case.call_and_validate(checks=CHECKS)
