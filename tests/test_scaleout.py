"""Two real gunicorn instances, two sync workers each, against one database.

CONTRACT.md §6: the service scales out by running more processes; every guard
is a statement in PostgreSQL, so the races of test_races.py must come out the
same when the racing requests land on different processes and instances. Each
racing thread alternates between the two instances request by request.
"""

from __future__ import annotations

import itertools

import pytest
from serve import serving
from test_races import (
    all_jobs,
    audit_trail,
    check_chaos,
    idempotent_creation_rounds,
    one_winner_rounds,
    retry_vs_deletes,
    run_chaos,
)

from app import create_app


@pytest.fixture(scope="module")
def instances(database_url):
    app = create_app({"TESTING": True, "DATABASE_URL": database_url})
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
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


@pytest.fixture
def audit(app, database_url):
    with audit_trail(database_url) as trail:
        yield trail


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
    check_chaos(setup, rec)
    audit.check(setup)


def test_retry_races_deletes_across_instances(make_call, audit):
    retry_vs_deletes(make_call, n_jobs=20)
    audit.check(make_call())


def test_completed_vs_failed_across_instances(make_call):
    one_winner_rounds(make_call, 4)


def test_idempotency_key_race_across_instances(make_call):
    idempotent_creation_rounds(make_call, 3)
    assert len(all_jobs(make_call())) == 3


def test_no_instance_logged_an_error(instances):
    # Every race above answered 2xx/4xx; nothing failed inside either (no deadlock,
    # no uncaught exception), and both instances did serve requests.
    for server in instances:
        assert server.process.poll() is None, server.log()
        lines = server.log_path.read_text(errors="replace").splitlines()
        assert any('"msg":"request"' in line for line in lines)
        errors = [line for line in lines if '"level":"error"' in line or "Traceback" in line]
        assert not errors, errors[:5]
