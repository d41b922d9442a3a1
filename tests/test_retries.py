"""Automatic retries (docs/API.md, "Automatic retries"): retry_at and its backoff,
the sweep that schedules due jobs again (once, across replicas), where a retry
goes, what makes a failure final, a stop cancelling a retry, retention leaving
waiting jobs alone, the metrics and the settings.

Most tests run the retry chore in process (``sweep_retries``) after making
jobs due (``make_due``): nothing waits for a clock. Two run the real service,
two gunicorn instances with a 0.2 s backoff and sweep interval: a retry made
by the service itself, and both instances retrying each of many jobs exactly
once while their workers race them.
"""

from __future__ import annotations

import datetime
import itertools
import time

import pytest
from helpers import (
    LEASE_MOVES,
    LEGAL_MOVES,
    audit_trail,
    create_job,
    events_of,
    flask_caller,
    init_db,
    lose_worker,
    make_app,
    metric_samples,
    metric_value,
    race,
    serving,
    sweep_leases,
)
from retrying import (
    leases_of,
    make_due,
    register,
    report,
    retry_times,
    served_metric,
    sweep_retries,
)

from app import create_app
from jobs import chores, db, settings
from jobs.chores import retention
from jobs.domain import retry_delay_s
from jobs.store import workers as worker_store

ALL_MOVES = LEGAL_MOVES | LEASE_MOVES | {("SCHEDULED", "SCHEDULED")}
SECOND = datetime.timedelta(seconds=1)


@pytest.fixture
def call(app):
    return flask_caller(app)


def ok(answer) -> dict:
    code, body = answer
    assert code in (200, 201), body
    return body


def get(call, job_id: int) -> dict:
    return ok(call("GET", f"/jobs/{job_id}"))


def fail(call, job_id: int, **fields) -> dict:
    """A SCHEDULED job RUNNING, then FAILED."""
    ok(report(call, job_id, "RUNNING"))
    return ok(report(call, job_id, "FAILED", **fields))


def retry_events(call, job_id: int) -> list[dict]:
    return [e for e in events_of(call, job_id) if (e["detail"] or {}).get("reason") == "retry"]


def close(app) -> None:
    pool = app.extensions.get("jobs_db_pool")
    if pool is not None:
        pool.drop_idle()


# ---- retry_at and the backoff ----------------------------------------------------------------


def test_a_failure_below_max_attempts_waits_the_backoff(call, db_conn):
    job_id = create_job(call, "w", max_attempts=3)["id"]
    failed = fail(call, job_id, detail={"error": "rpc timeout"})
    retry_at, updated_at = retry_times(db_conn, job_id)
    # The failure time is the FAILED change's updated_at, to the microsecond.
    assert retry_at - updated_at == 10 * SECOND
    assert failed["retry_at"] is not None and failed["status"] == "FAILED"
    assert get(call, job_id)["retry_at"] == failed["retry_at"]
    # The event is the report's, as ever.
    assert events_of(call, job_id)[-1]["detail"] == {"error": "rpc timeout"}


def test_the_backoff_doubles_per_attempt_up_to_its_cap(app, database_url, db_conn):
    short = make_app(database_url, RETRY_BACKOFF_S=1.5, RETRY_BACKOFF_MAX_S=10)
    try:
        call = flask_caller(short)
        job_id = create_job(call, "w", max_attempts=7)["id"]
        waits = []
        for attempt in range(1, 7):
            assert get(call, job_id)["attempt"] == attempt
            fail(call, job_id)
            retry_at, updated_at = retry_times(db_conn, job_id)
            waits.append((retry_at - updated_at).total_seconds())
            make_due(database_url, job_id)
            assert sweep_retries(short) == (1, 0)
        assert waits == [1.5, 3, 6, 10, 10, 10]
        assert waits == [retry_delay_s(a, 1.5, 10) for a in range(1, 7)]
        # The seventh attempt was the last: its failure is final.
        final = fail(call, job_id)
        assert (final["attempt"], final["retry_at"]) == (7, None)
    finally:
        close(short)


def test_the_retry_sweep_schedules_a_due_job_again(app, call, database_url):
    job_id = create_job(call, "w", max_attempts=2)["id"]
    fail(call, job_id)
    assert sweep_retries(app) == (0, 0)  # not due yet: nothing happens
    assert get(call, job_id)["status"] == "FAILED"
    make_due(database_url, job_id)
    assert sweep_retries(app) == (1, 0)
    job = get(call, job_id)
    assert (job["status"], job["attempt"], job["retry_at"], job["node_id"]) == (
        "SCHEDULED",
        2,
        None,
        "w",
    )
    events = events_of(call, job_id)
    assert [e["event_type"] for e in events] == [
        "SCHEDULED",
        "RUNNING",
        "FAILED",
        "SCHEDULED",
    ]
    assert (events[-1]["node_id"], events[-1]["detail"]) == ("w", {"reason": "retry", "attempt": 2})
    assert events[-1]["created_at"] == job["updated_at"]
    assert sweep_retries(app) == (0, 0)  # once
    # The second attempt's failure is final (max_attempts 2).
    assert fail(call, job_id)["retry_at"] is None


def test_retryable_false_makes_the_failure_final(app, call, db_conn):
    job_id = create_job(call, "w", max_attempts=5)["id"]
    final = fail(call, job_id, retryable=False)
    assert (final["status"], final["retry_at"]) == ("FAILED", None)
    assert retry_times(db_conn, job_id)[0] is None
    assert sweep_retries(app) == (0, 0)
    # "retryable": true is the default spelled out.
    other = create_job(call, "w", max_attempts=5)["id"]
    assert fail(call, other, retryable=True)["retry_at"] is not None


def test_max_attempts_1_never_retries(app, call):
    job_id = create_job(call, "w")["id"]
    assert fail(call, job_id)["retry_at"] is None
    assert sweep_retries(app) == (0, 0)


def test_any_move_out_of_failed_clears_retry_at(app, call, database_url):
    job_id = create_job(call, "w", max_attempts=5)["id"]
    fail(call, job_id)
    # An operator retries it before it is due: attempt 2 now, and no second retry.
    retried = ok(report(call, job_id, "SCHEDULED", "w-2"))
    assert (retried["attempt"], retried["retry_at"], retried["node_id"]) == (2, None, "w-2")
    assert sweep_retries(app) == (0, 0)
    # A repeated FAILED report is a no-op that leaves a pending retry alone.
    fail(call, job_id)
    pending = get(call, job_id)["retry_at"]
    assert pending is not None
    assert ok(report(call, job_id, "FAILED"))["retry_at"] == pending


def test_a_lease_expiry_below_max_attempts_schedules_a_retry(app, call, database_url, db_conn):
    register(call, "w")
    job_id = create_job(call, "w", max_attempts=2)["id"]
    ok(report(call, job_id, "RUNNING"))
    lose_worker(database_url, "w")
    assert sweep_leases(app) == {"FAILED": 1}
    retry_at, updated_at = retry_times(db_conn, job_id)
    assert retry_at - updated_at == 10 * SECOND
    assert events_of(call, job_id)[-1]["detail"]["reason"] == "worker_lost"


def test_one_lease_sweep_decides_each_jobs_retry_on_its_own(app, call, database_url, db_conn):
    """One statement expires several jobs: each gets the retry_at of its own attempt
    and max_attempts (none, 10 s after attempt 1, 20 s after attempt 2), and the
    STOPPED one none."""
    register(call, "w")
    paths = [
        (1, ["RUNNING"]),
        (2, ["RUNNING"]),
        (3, ["RUNNING", "FAILED", "SCHEDULED", "RUNNING"]),
        (3, ["RUNNING", "STOP_REQUESTED"]),
    ]
    ids = []
    for max_attempts, steps in paths:
        job_id = create_job(call, "w", max_attempts=max_attempts)["id"]
        for step in steps:
            if step == "STOP_REQUESTED":
                ok(call("PUT", f"/jobs/{job_id}/stop"))
            else:
                ok(report(call, job_id, step))
        ids.append(job_id)
    lose_worker(database_url, "w")
    assert sweep_leases(app) == {"FAILED": 3, "STOPPED": 1}
    waits = []
    for job_id in ids:
        retry_at, updated_at = retry_times(db_conn, job_id)
        waits.append(None if retry_at is None else (retry_at - updated_at).total_seconds())
    assert waits == [None, 10, 20, None]


# ---- Where a retry goes ----------------------------------------------------------------------


def test_a_retry_stays_on_an_alive_or_unregistered_node(app, call, database_url):
    register(call, "alive")
    jobs = {node: create_job(call, node, max_attempts=2)["id"] for node in ("alive", "ghost")}
    for job_id in jobs.values():
        fail(call, job_id)
    make_due(database_url, *jobs.values())
    assert sweep_retries(app) == (2, 0)
    for node, job_id in jobs.items():
        assert get(call, job_id)["node_id"] == node
        assert retry_events(call, job_id)[-1]["detail"] == {"reason": "retry", "attempt": 2}


def test_a_lost_workers_job_goes_to_the_least_loaded_alive_worker(app, call, database_url):
    for node in ("dead", "busy", "Zed", "amy"):
        register(call, node)
    for _ in range(2):
        create_job(call, "busy")
    create_job(call, "amy")
    create_job(call, "Zed")
    job_id = create_job(call, "dead", max_attempts=2)["id"]
    fail(call, job_id)
    lose_worker(database_url, "dead")
    make_due(database_url, job_id)
    assert sweep_retries(app) == (1, 1)
    # Zed and amy have one active job each; Zed comes first in byte order
    # ("Z" is 0x5A, "a" 0x61), whatever the database's collation says.
    job = get(call, job_id)
    assert (job["node_id"], job["status"], job["attempt"]) == ("Zed", "SCHEDULED", 2)
    event = retry_events(call, job_id)[-1]
    assert (event["node_id"], event["detail"]) == (
        "Zed",
        {"reason": "retry", "attempt": 2, "from_node_id": "dead"},
    )
    assert leases_of(call, "Zed") == {job_id: 2, job_id - 1: 1}


def test_several_lost_jobs_are_spread_as_if_placed_one_at_a_time(app, call, database_url):
    for node in ("dead", "a", "b", "c"):
        register(call, node)
    for node, active in (("a", 0), ("b", 2), ("c", 3)):
        for _ in range(active):
            create_job(call, node)
    lost = [create_job(call, "dead", max_attempts=2)["id"] for _ in range(6)]
    for job_id in lost:
        fail(call, job_id)
    lose_worker(database_url, "dead")
    make_due(database_url, *lost)
    assert sweep_retries(app) == (6, 6)
    # One at a time, oldest due first, each to the fewest active jobs (ties:
    # the smallest node_id): a(0) a(1) a(2)/b(2) -> a, then b, then c and a, b...
    placed = [get(call, job_id)["node_id"] for job_id in lost]
    loads = {"a": 0, "b": 2, "c": 3}
    expected = []
    for _ in lost:
        node = min(loads, key=lambda n: (loads[n], n))
        expected.append(node)
        loads[node] += 1
    assert placed == expected == ["a", "a", "a", "b", "a", "b"]


def test_with_no_worker_alive_a_lost_workers_job_waits(app, call, database_url):
    register(call, "dead")
    job_id = create_job(call, "dead", max_attempts=2)["id"]
    ghost = create_job(call, "ghost", max_attempts=2)["id"]  # never registered
    fail(call, job_id)
    fail(call, ghost)
    lose_worker(database_url, "dead")
    make_due(database_url, job_id, ghost)
    # The unregistered node's job is not held up by the one that must wait.
    assert sweep_retries(app) == (1, 0)
    assert get(call, ghost)["status"] == "SCHEDULED"
    assert get(call, job_id)["status"] == "FAILED"
    assert sweep_retries(app) == (0, 0)
    register(call, "fresh")
    assert sweep_retries(app) == (1, 1)
    assert get(call, job_id)["node_id"] == "fresh"


def test_the_sweep_reads_the_due_jobs_from_their_index(app, call, db_conn):
    with db_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO jobs (node_id, status, max_attempts) SELECT 'n', 'FAILED', 3"
            " FROM generate_series(1, 20000)"
        )
        cur.execute("ANALYZE jobs")
        cur.execute(
            "EXPLAIN (FORMAT JSON) " + worker_store.RETRY_DUE,
            {"lost_after_s": 30, "batch": 500, "active": ["SCHEDULED"]},
        )
        plan = cur.fetchone()[0][0]["Plan"]

    def nodes(node):
        yield node
        for child in node.get("Plans", []):
            yield from nodes(child)

    on_jobs = [n for n in nodes(plan) if n.get("Relation Name") == "jobs"]
    assert "jobs_retry_due" in {n.get("Index Name") for n in on_jobs}, plan
    assert "Seq Scan" not in {n["Node Type"] for n in on_jobs}, plan


# ---- Exactly once ----------------------------------------------------------------------------


# 150 jobs that were scheduled and failed, with the events the service writes,
# each waiting for a retry that is due: made in SQL, as the requests would.
DUE_JOBS = """
WITH created AS (
    INSERT INTO jobs (node_id, max_attempts)
    SELECT 'n' || (g % 3), 2 FROM generate_series(1, 150) g
    RETURNING id, node_id, created_at
), first AS (
    INSERT INTO job_events (job_id, created_at, event_type, node_id)
    SELECT id, created_at, 'SCHEDULED', node_id FROM created
)
SELECT array_agg(id ORDER BY id) FROM created
"""
FAIL_JOBS = """
WITH failed AS (
    UPDATE jobs SET status = 'FAILED', updated_at = clock_timestamp(),
                    retry_at = clock_timestamp() - interval '1 second'
    WHERE id = ANY(%s)
    RETURNING id, node_id, updated_at
)
INSERT INTO job_events (job_id, created_at, event_type, node_id)
SELECT id, updated_at, 'FAILED', node_id FROM failed
"""


def test_concurrent_sweeps_retry_each_job_once(app, call, database_url, db_conn):
    apps = [make_app(database_url, DB_POOL_SIZE=8) for _ in range(2)]
    try:
        with audit_trail(database_url) as audit:
            with db_conn.cursor() as cur:
                cur.execute(DUE_JOBS)
                jobs = cur.fetchone()[0]
                cur.execute(FAIL_JOBS, (jobs,))
            results = race(
                lambda: call,
                [lambda c, b, a=a: sweep_retries(a) for a in apps * 3],
            )
            assert sum(retried for retried, _ in results) == len(jobs), results
            assert audit.problems(call, ALL_MOVES) == []
        with db_conn.cursor() as cur:
            cur.execute(
                "SELECT j.attempt, j.status, count(*), min(e.detail::text)"
                " FROM jobs j JOIN job_events e ON e.job_id = j.id"
                " WHERE e.detail->>'reason' = 'retry' GROUP BY j.id"
            )
            retried = cur.fetchall()
        assert len(retried) == len(jobs)
        assert set(retried) == {(2, "SCHEDULED", 1, '{"reason": "retry", "attempt": 2}')}
    finally:
        for a in apps:
            close(a)


def test_the_chore_runs_once_per_interval_whoever_claims_it(app, call, database_url, db_conn):
    job_id = create_job(call, "w", max_attempts=2)["id"]
    fail(call, job_id)
    make_due(database_url, job_id)
    with db_conn.cursor() as cur:
        cur.execute("DELETE FROM service_chores WHERE name = 'retries'")
    other = create_app({"TESTING": True, "DATABASE_URL": database_url})
    try:
        with app.app_context():
            assert chores.of(app).run_claimed(chores.of(app).named("retries")) is True
        with other.app_context():
            assert chores.of(other).run_claimed(chores.of(other).named("retries")) is False
    finally:
        close(other)
    assert get(call, job_id)["status"] == "SCHEDULED"


def test_a_retry_races_an_operators_retry_and_a_delete(app, call, database_url):
    for round_ in range(5):
        jobs = [create_job(call, "w", max_attempts=2)["id"] for _ in range(8)]
        for job_id in jobs:
            fail(call, job_id)
        make_due(database_url, *jobs)

        def operator(c, b, job_id):
            return "operator", job_id, *report(c, job_id, "SCHEDULED")

        def deleter(c, b, job_id):
            return "delete", job_id, *c("DELETE", f"/jobs/{job_id}")

        tasks = [lambda c, b: ("sweep", None, *sweep_retries(app))]
        tasks += [lambda c, b, j=j: operator(c, b, j) for j in jobs[:4]]
        tasks += [lambda c, b, j=j: deleter(c, b, j) for j in jobs[4:]]
        race(lambda: flask_caller(app), tasks)
        for job_id in jobs:
            code, job = call("GET", f"/jobs/{job_id}")
            if code == 404:
                continue  # deleted while still FAILED
            # Whoever won, the job was retried once: attempt 2, one SCHEDULED after FAILED.
            assert (job["status"], job["attempt"]) == ("SCHEDULED", 2), (round_, job)
            types = [e["event_type"] for e in events_of(call, job_id)]
            assert types == ["SCHEDULED", "RUNNING", "FAILED", "SCHEDULED"], (round_, types)
        assert sweep_retries(app) == (0, 0)


# ---- A stop cancels a pending retry ----------------------------------------------------------


def test_a_stop_cancels_a_pending_retry(app, call, database_url):
    job_id = create_job(call, "w", max_attempts=3)["id"]
    failed = fail(call, job_id)
    code, stopped = call("PUT", f"/jobs/{job_id}/stop")
    assert code == 200
    assert (stopped["status"], stopped["retry_at"], stopped["attempt"]) == ("FAILED", None, 1)
    assert stopped["updated_at"] > failed["updated_at"]
    events = events_of(call, job_id)
    assert events[-1]["event_type"] == "RETRY_CANCELLED"
    assert events[-1]["detail"] == {"retry_at": failed["retry_at"], "attempt": 1}
    assert events[-1]["created_at"] == stopped["updated_at"]
    # Nothing is left to cancel: a second stop (either method) changes nothing.
    assert call("POST", f"/jobs/{job_id}/stop") == (200, stopped)
    assert len(events_of(call, job_id)) == len(events)
    assert sweep_retries(app) == (0, 0)
    assert get(call, job_id) == stopped
    # An event of the new type reads back like any other.
    code, one = call("GET", f"/jobs/{job_id}/events/{events[-1]['id']}")
    assert (code, one["event_type"]) == (200, "RETRY_CANCELLED")


def test_a_stop_racing_the_retry_either_cancels_it_or_stops_the_retried_job(
    app, call, database_url
):
    for _ in range(6):
        job_id = create_job(call, "w", max_attempts=2)["id"]
        fail(call, job_id)
        make_due(database_url, job_id)
        race(
            lambda: flask_caller(app),
            [
                lambda c, b: sweep_retries(app),
                lambda c, b, job_id=job_id: c("PUT", f"/jobs/{job_id}/stop"),
            ],
        )
        types = [e["event_type"] for e in events_of(call, job_id)][3:]
        assert types in (["RETRY_CANCELLED"], ["SCHEDULED", "STOP_REQUESTED"]), types
        job = get(call, job_id)
        assert job["status"] == {"RETRY_CANCELLED": "FAILED"}.get(types[0], "STOP_REQUESTED")
        assert job["retry_at"] is None


# ---- Deletes and retention -------------------------------------------------------------------


def test_retention_never_deletes_a_job_waiting_for_its_retry(app, call, db_conn):
    waiting = create_job(call, "w", max_attempts=2)["id"]
    final = create_job(call, "w")["id"]
    fail(call, waiting)
    fail(call, final)
    with db_conn.cursor() as cur:
        cur.execute("UPDATE jobs SET updated_at = now() - interval '2 days'")
    config = {**app.config, "JOB_RETENTION": datetime.timedelta(days=1)}
    with app.app_context(), db.transaction() as cur:
        retention.Retention()(cur, config)
    assert call("GET", f"/jobs/{final}")[0] == 404
    assert get(call, waiting)["retry_at"] is not None
    # Explicit deletes take it like any terminal job.
    assert call("DELETE", f"/jobs/{waiting}")[0] == 204
    assert call("GET", f"/jobs/{waiting}")[0] == 404


def test_a_delete_by_status_takes_waiting_jobs(call):
    waiting = create_job(call, "w", max_attempts=2)["id"]
    fail(call, waiting)
    assert call("DELETE", "/jobs?status=failed")[0] == 204
    assert call("GET", f"/jobs/{waiting}")[0] == 404
    other = create_job(call, "w", max_attempts=2)["id"]
    fail(call, other)
    assert call("DELETE", "/jobs", {"job_ids": [other]})[0] == 204


# ---- Metrics and settings --------------------------------------------------------------------


def test_retries_are_counted(app, call, database_url):
    client = app.test_client()
    before = metric_samples(client)
    register(call, "dead")
    register(call, "live")
    by_report = create_job(call, "dead", max_attempts=2)["id"]
    fail(call, by_report)
    by_lease = create_job(call, "dead", max_attempts=2)["id"]
    ok(report(call, by_lease, "RUNNING"))
    ghost = create_job(call, "ghost", max_attempts=2)["id"]
    fail(call, ghost)
    lose_worker(database_url, "dead")
    sweep_leases(app)
    make_due(database_url, by_report, by_lease, ghost)
    assert sweep_retries(app) == (3, 2)
    after = metric_samples(client)

    def grew(name, **labels):
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert grew("jobs_retries_scheduled_total", via="report") == 2
    assert grew("jobs_retries_scheduled_total", via="lease_expiry") == 1
    assert grew("jobs_retries_performed_total", placement="same_node") == 1
    assert grew("jobs_retries_performed_total", placement="other_node") == 2


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("JOB_MAX_ATTEMPTS", "0"),
        ("JOB_MAX_ATTEMPTS", "101"),
        ("JOB_MAX_ATTEMPTS", "2.5"),
        ("RETRY_BACKOFF_S", "0"),
        ("RETRY_BACKOFF_S", "-1"),
        ("RETRY_BACKOFF_S", "nan"),
        ("RETRY_BACKOFF_S", "inf"),
        ("RETRY_BACKOFF_MAX_S", "86401"),
        ("RETRY_BACKOFF_MAX_S", "1h"),
        ("RETRY_SWEEP_INTERVAL_S", "6"),
        ("RETRY_SWEEP_INTERVAL_S", "0"),
    ],
)
def test_settings_out_of_range_stop_the_start_up(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        settings.from_environment()


def test_settings_are_read_from_the_environment(monkeypatch):
    for name, value in (
        ("JOB_MAX_ATTEMPTS", "3"),
        ("RETRY_BACKOFF_S", "0.5"),
        ("RETRY_BACKOFF_MAX_S", "60"),
        ("RETRY_SWEEP_INTERVAL_S", "0.25"),
    ):
        monkeypatch.setenv(name, value)
    config = settings.from_environment()
    assert (config["JOB_MAX_ATTEMPTS"], config["RETRY_BACKOFF_S"]) == (3, 0.5)
    assert (config["RETRY_BACKOFF_MAX_S"], config["RETRY_SWEEP_INTERVAL_S"]) == (60, 0.25)
    monkeypatch.delenv("JOB_MAX_ATTEMPTS")
    assert settings.from_environment()["JOB_MAX_ATTEMPTS"] == 1


# ---- Under gunicorn --------------------------------------------------------------------------


def wait_for(predicate, timeout: float, traffic=None, step: float = 0.1):
    """Poll ``predicate()`` until it is truthy; ``traffic()`` between polls keeps the
    service's chores running (they run after responses)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if traffic is not None:
            traffic()
        time.sleep(step)
    raise AssertionError(f"not within {timeout} s")


@pytest.fixture(scope="module")
def pair(database_url):
    """Two gunicorn instances, each sweeping for due retries every 0.2 s after its
    responses, with a 0.2 s backoff (0.4 s at most)."""
    init_db(database_url)
    env = {
        "RETRY_BACKOFF_S": "0.2",
        "RETRY_BACKOFF_MAX_S": "0.4",
        "RETRY_SWEEP_INTERVAL_S": "0.2",
    }
    with serving(database_url, count=2, env=env) as servers:
        yield servers


def test_under_gunicorn_the_service_retries_by_itself(app, pair):
    call = pair[0].caller()
    job = create_job(call, "w", max_attempts=3)
    ok(report(call, job["id"], "RUNNING", "w", 1))
    failed = ok(report(call, job["id"], "FAILED", "w", 1))
    assert failed["retry_at"] is not None
    started = time.monotonic()

    def retried():
        now = get(call, job["id"])
        return now if now["status"] == "SCHEDULED" else None

    now = wait_for(retried, 10, traffic=lambda: call("GET", "/jobs"))
    assert time.monotonic() - started <= 10
    assert (now["attempt"], now["retry_at"]) == (2, None)
    assert failed["retry_at"] <= now["updated_at"]
    assert retry_events(call, job["id"]) == [events_of(call, job["id"])[-1]]
    # The late report of attempt 1 is refused; its next attempt's goes through.
    code, body = report(call, job["id"], "RUNNING", "w", 1)
    assert (code, body["error_code"]) == (409, "STALE_ATTEMPT")
    ok(report(call, job["id"], "RUNNING", "w", 2))


def test_two_instances_retry_each_job_exactly_once(app, pair, database_url):
    """8 workers' threads run 16 jobs through three attempts each (two failures,
    each retried by the service) across both instances, request by request."""
    before = sum(
        served_metric(server, "jobs_retries_performed_total", placement="same_node")
        for server in pair
    )
    with audit_trail(database_url) as audit:
        turn = itertools.count()

        def make_call():
            callers = [server.caller() for server in pair]
            return lambda *args: callers[next(turn) % 2](*args)

        setup = make_call()
        jobs = [create_job(setup, f"w{i % 8}", max_attempts=3)["id"] for i in range(16)]

        def worker(call, barrier, mine):
            for job_id in mine:
                for attempt in (1, 2, 3):
                    wait_for(
                        lambda job_id=job_id, attempt=attempt: (
                            get(call, job_id)["attempt"] == attempt
                        ),
                        10,
                    )
                    ok(report(call, job_id, "RUNNING", None, attempt))
                    last = "COMPLETED" if attempt == 3 else "FAILED"
                    ok(report(call, job_id, last, None, attempt))
            return mine

        race(make_call, [lambda c, b, i=i: worker(c, b, jobs[i::8]) for i in range(8)])
        for job_id in jobs:
            job = get(setup, job_id)
            assert (job["status"], job["attempt"], job["retry_at"]) == ("COMPLETED", 3, None)
            retries = retry_events(setup, job_id)
            assert [e["detail"]["attempt"] for e in retries] == [2, 3], retries
            assert [e["event_type"] for e in events_of(setup, job_id)] == [
                "SCHEDULED",
                *["RUNNING", "FAILED", "SCHEDULED"] * 2,
                "RUNNING",
                "COMPLETED",
            ]
        assert audit.problems(setup) == []
    performed = sum(
        served_metric(server, "jobs_retries_performed_total", placement="same_node")
        for server in pair
    )
    assert performed - before == 2 * len(jobs)
    for server in pair:
        lines = server.log_path.read_text(errors="replace").splitlines()
        assert not [line for line in lines if '"level":"error"' in line or "Traceback" in line]
