"""Two real gunicorn instances, two workers each, against one database.

docs/API.md (Production topology): the service scales out by running more processes; every guard
is a statement in PostgreSQL, so the races of test_races.py must come out the
same when the racing requests land on different processes and instances. Each
racing thread alternates between the two instances request by request. The
workloads are the ones test_races.py runs (support/races.py), and so are the checks.
"""

from __future__ import annotations

import itertools

import pytest

from dev.gunicorn import serving

from support.databases import init_db
from support.races import (
    chaos_problems,
    idempotent_round_problems,
    one_winner_problems,
    race_completed_against_failed,
    race_idempotent_creations,
    race_retries_against_deletes,
    retry_race_problems,
    run_chaos,
)
from support.service import job_statuses

# Under pytest-xdist, on one worker: its two gunicorn instances are the module's.
pytestmark = pytest.mark.xdist_group("scaleout")


@pytest.fixture(scope="module")
def instances(database_url):
    init_db(database_url)
    with serving(database_url, count=2, workers=2) as pair:
        yield pair


@pytest.fixture
def make_call(app, instances):
    """Callers for racing threads (``app`` has truncated the database)."""
    start = itertools.count()

    def make():
        callers = [server.caller() for server in instances]
        turn = itertools.count(next(start))

        def call(method, path, body=None):
            return callers[next(turn) % len(callers)](method, path, body)

        return call

    return make


def test_both_instances_serve_one_database(instances, make_call):
    a, b = (server.caller() for server in instances)
    code, job = a("POST", "/jobs", {"node_id": "worker-01"})
    assert code == 201
    assert b("GET", f"/jobs/{job['id']}") == (200, job)
    assert b("PUT", f"/jobs/{job['id']}/stop")[1]["status"] == "STOP_REQUESTED"
    assert a("GET", f"/jobs/{job['id']}")[1]["status"] == "STOP_REQUESTED"


def test_stop_transitions_and_deletes_race_across_instances(make_call, audit):
    setup = make_call()
    rec = run_chaos(setup, make_call, threads=16, rounds=5, steps=12, per_status=4, seed=1)
    assert chaos_problems(setup, rec) == []
    assert audit.problems(setup) == []


def test_retry_races_deletes_across_instances(make_call, audit):
    setup = make_call()
    result = race_retries_against_deletes(make_call, n_jobs=20)
    # A job that became SCHEDULED again is active for good: no delete may take it.
    assert retry_race_problems(setup, result) == []
    assert audit.problems(setup) == []


def test_completed_vs_failed_across_instances(make_call):
    for round_ in race_completed_against_failed(make_call, rounds=4):
        assert one_winner_problems(round_) == []


def test_idempotency_key_race_across_instances(make_call):
    for round_ in race_idempotent_creations(make_call, 3):
        assert idempotent_round_problems(round_) == []
    assert len(job_statuses(make_call())) == 3


def test_no_instance_logged_an_error(instances):
    # Every race above answered 2xx/4xx; nothing failed inside either (no deadlock,
    # no uncaught exception), and both instances did serve requests.
    for server in instances:
        assert server.process.poll() is None, server.log()
        lines = server.log_path.read_text(errors="replace").splitlines()
        assert any('"msg":"request"' in line for line in lines)
        errors = [line for line in lines if '"level":"error"' in line or "Traceback" in line]
        assert not errors, errors[:5]
