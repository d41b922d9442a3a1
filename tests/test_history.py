"""History at any size (docs/API.md, "History and retention").

- DELETE /jobs?status= deletes in batches: 204 when everything that matched is
  gone; with its time budget spent, 200 {"deleted", "more": true}, and
  repeating finishes the job. No active job is ever deleted, also not one that
  turns active while a batch waits for it, and every job goes with all of its
  events, tables and files (checked in SQL).
- Retention (JOB_RETENTION) deletes, as a chore, only terminal jobs older than
  the setting; bad values stop the start-up.
- flask --app app prune: its output and what it deletes.

Small batches and a zero budget come from the test config, so every
interleaving here is decided by row locks, never by timing.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import psycopg2
import pytest

from app import create_app
from jobs import chores

from support.races import wait_until_blocked
from support.service import create_job, file_entry, flask_caller, make_app, move_to

TERMINAL_SETUP = ("COMPLETED", "FAILED", "STOPPED")
ACTIVE_SETUP = ("SCHEDULED", "RUNNING", "STOP_REQUESTED", "STOPPING", "RETRIED")

# Rows whose job is gone, and jobs without the creation event every job has.
ORPHANS = """
SELECT (SELECT count(*) FROM job_events e
        WHERE NOT EXISTS (SELECT FROM jobs j WHERE j.id = e.job_id)),
       (SELECT count(*) FROM job_tables t
        WHERE NOT EXISTS (SELECT FROM jobs j WHERE j.id = t.job_id)),
       (SELECT count(*) FROM job_files f
        WHERE NOT EXISTS (SELECT FROM jobs j WHERE j.id = f.job_id)),
       (SELECT count(*) FROM jobs j
        WHERE NOT EXISTS (SELECT FROM job_events e
                          WHERE e.job_id = j.id AND e.event_type = 'SCHEDULED'))
"""


def job_with_history(call, status: str, files: int = 0) -> int:
    """A job brought to ``status`` (events on the way), with ``files`` files in 2 tables."""
    job_id = create_job(call)["id"]
    if files:
        move_to(call, job_id, "RUNNING")
        for table in ("blocks", "logs"):
            batch = [file_entry(f"{table}-{n}", n * 10, n * 10 + 9) for n in range(files)]
            code, body = call("POST", f"/jobs/{job_id}/tables/{table}/files", batch)
            assert code == 201, body
        steps = {"COMPLETED": ["COMPLETED"], "FAILED": ["FAILED"], "RUNNING": []}[status]
        for step in steps:
            assert call("PUT", f"/jobs/{job_id}/status", {"status": step})[0] == 200
    else:
        move_to(call, job_id, status)
    return job_id


def statuses_in_db(db_conn) -> dict[int, str]:
    with db_conn.cursor() as cur:
        cur.execute("SELECT id, status FROM jobs")
        return dict(cur.fetchall())


def history_counts(db_conn) -> dict[int, tuple[int, int, int]]:
    """Per remaining job: (events, tables, files)."""
    with db_conn.cursor() as cur:
        cur.execute(
            """SELECT j.id,
                      (SELECT count(*) FROM job_events e WHERE e.job_id = j.id),
                      (SELECT count(*) FROM job_tables t WHERE t.job_id = j.id),
                      (SELECT count(*) FROM job_files f WHERE f.job_id = j.id)
               FROM jobs j"""
        )
        return {row[0]: row[1:] for row in cur.fetchall()}


def orphans(db_conn) -> tuple[int, int, int, int]:
    with db_conn.cursor() as cur:
        cur.execute(ORPHANS)
        return cur.fetchone()


def mixed_jobs(call) -> tuple[set[int], set[int]]:
    """Two of every terminal and every active status, some with files: (terminal, active)."""
    terminal = {job_with_history(call, s) for s in TERMINAL_SETUP * 2}
    terminal |= {job_with_history(call, s, files=3) for s in ("COMPLETED", "FAILED")}
    active = {job_with_history(call, s) for s in ACTIVE_SETUP * 2}
    active.add(job_with_history(call, "RUNNING", files=3))
    return terminal, active


# ---- DELETE /jobs?status= in batches --------------------------------------------------


def test_a_delete_within_its_budget_deletes_everything_in_batches(apps, db_conn):
    app = apps(BULK_DELETE_BATCH=2)  # many batches, the default 10 s budget
    call = flask_caller(app)
    terminal, active = mixed_jobs(call)
    before = history_counts(db_conn)
    assert len(terminal) == 8

    assert call("DELETE", "/jobs?status=terminal") == (204, None)

    assert set(statuses_in_db(db_conn)) == active
    # The active jobs kept all of their history; nothing of the others remains.
    assert history_counts(db_conn) == {job_id: before[job_id] for job_id in active}
    assert orphans(db_conn) == (0, 0, 0, 0)
    assert call("DELETE", "/jobs?status=terminal") == (204, None)


def test_a_delete_whose_budget_runs_out_answers_how_far_it_got(apps, db_conn):
    """With no budget, each request runs one batch; repeating finishes with 204."""
    app = apps(BULK_DELETE_BUDGET_MS=0, BULK_DELETE_BATCH=2)
    call = flask_caller(app)
    completed = {job_with_history(call, "COMPLETED") for _ in range(4)}
    completed.add(job_with_history(call, "COMPLETED", files=2))
    failed = {job_with_history(call, "FAILED") for _ in range(2)}
    active = {job_with_history(call, "RUNNING") for _ in range(2)}

    answers = []
    while True:
        code, body = call("DELETE", "/jobs?status=completed")
        answers.append((code, body))
        if code != 200:
            break
        assert len(answers) < 10, answers
    assert answers == [
        (200, {"deleted": 2, "more": True}),
        (200, {"deleted": 2, "more": True}),
        (204, None),  # the last job: fewer candidates than a batch takes, so none are left
    ]
    remaining = statuses_in_db(db_conn)
    assert set(remaining) == failed | active
    assert not completed & set(remaining)
    assert orphans(db_conn) == (0, 0, 0, 0)


def test_the_answer_200_counts_only_what_this_request_deleted(apps, db_conn):
    app = apps(BULK_DELETE_BUDGET_MS=0, BULK_DELETE_BATCH=3)
    call = flask_caller(app)
    for _ in range(4):
        job_with_history(call, "FAILED")
    job_with_history(call, "SCHEDULED")
    assert call("DELETE", "/jobs?status=error") == (200, {"deleted": 3, "more": True})
    assert call("DELETE", "/jobs?status=failed") == (204, None)
    assert list(statuses_in_db(db_conn).values()) == ["SCHEDULED"]


def test_a_job_that_turns_active_while_a_batch_waits_for_it_survives(apps, database_url, db_conn):
    """Five FAILED jobs, batches of two. A retry of the third (FAILED -> SCHEDULED with its
    event, not yet committed) holds its row when the second batch comes to it: the delete
    waits there, with the first batch already deleted and committed. Committed, the retry
    wins: the batch rechecks the row, leaves it, and the delete finishes without it."""
    app = apps(BULK_DELETE_BATCH=2)
    call = flask_caller(app)
    jobs = [job_with_history(call, "FAILED") for _ in range(5)]
    retried = jobs[2]
    side = psycopg2.connect(database_url)
    answer: list = []
    try:
        with side.cursor() as cur:
            cur.execute(
                "UPDATE jobs SET status = 'SCHEDULED', updated_at = clock_timestamp()"
                " WHERE id = %s",
                (retried,),
            )
            cur.execute(
                "INSERT INTO job_events (job_id, event_type, node_id)"
                " VALUES (%s, 'SCHEDULED', 'worker-01')",
                (retried,),
            )
        deleter = threading.Thread(
            target=lambda: answer.append(flask_caller(app)("DELETE", "/jobs?status=terminal"))
        )
        deleter.start()
        wait_until_blocked(database_url, 1)
        # Mid-way: the first batch is gone for good while the second one waits.
        assert set(statuses_in_db(db_conn)) == set(jobs[2:])
        side.commit()
        deleter.join(10)
        assert not deleter.is_alive()
    finally:
        side.close()
    assert answer == [(204, None)]
    assert statuses_in_db(db_conn) == {retried: "SCHEDULED"}
    types = [e["event_type"] for e in call("GET", f"/jobs/{retried}/events")[1]["events"]]
    assert types == ["SCHEDULED", "RUNNING", "FAILED", "SCHEDULED"]
    assert orphans(db_conn) == (0, 0, 0, 0)


def test_a_delete_that_waits_for_a_job_being_written_takes_it_whole(apps, database_url, db_conn):
    """A job whose row is held (a status report in flight, here one that keeps it FAILED and
    adds an event) is deleted once released, with the event added meanwhile: no orphan."""
    app = apps(BULK_DELETE_BATCH=2)
    call = flask_caller(app)
    jobs = [job_with_history(call, "FAILED", files=1) for _ in range(3)]
    side = psycopg2.connect(database_url)
    answer: list = []
    try:
        with side.cursor() as cur:
            cur.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (jobs[1],))
            cur.execute(
                "INSERT INTO job_events (job_id, event_type) VALUES (%s, 'FAILED')", (jobs[1],)
            )
        deleter = threading.Thread(
            target=lambda: answer.append(flask_caller(app)("DELETE", "/jobs?status=failed"))
        )
        deleter.start()
        wait_until_blocked(database_url, 1)
        side.commit()
        deleter.join(10)
        assert not deleter.is_alive()
    finally:
        side.close()
    assert answer == [(204, None)]
    assert statuses_in_db(db_conn) == {}
    assert orphans(db_conn) == (0, 0, 0, 0)


def test_the_job_ids_form_stays_all_or_nothing(apps, db_conn):
    app = apps(BULK_DELETE_BUDGET_MS=0, BULK_DELETE_BATCH=1)
    call = flask_caller(app)
    done = [job_with_history(call, "COMPLETED") for _ in range(3)]
    running = job_with_history(call, "RUNNING")
    code, body = call("DELETE", "/jobs", {"job_ids": [*done, running]})
    assert (code, body["error_code"]) == (409, "JOB_CONFLICT")
    assert len(statuses_in_db(db_conn)) == 4
    assert call("DELETE", "/jobs", {"job_ids": done}) == (204, None)
    assert statuses_in_db(db_conn) == {running: "RUNNING"}


def test_jobs_deleted_by_status_are_counted(apps):
    app = apps(BULK_DELETE_BATCH=2)
    call = flask_caller(app)
    client = app.test_client()

    def counted() -> float:
        for line in client.get("/metrics").get_data(as_text=True).splitlines():
            if line.startswith('jobs_pruned_total{via="api"}'):
                return float(line.split()[-1])
        raise AssertionError("jobs_pruned_total{via=api} is not exported")

    before = counted()
    for _ in range(5):
        job_with_history(call, "STOPPED")
    assert call("DELETE", "/jobs?status=stopped") == (204, None)
    assert counted() == before + 5


# ---- Retention ---------------------------------------------------------------------------


def age(db_conn, job_ids, hours: float) -> None:
    """Make the jobs' last change ``hours`` ago (as if they had finished then)."""
    with db_conn.cursor() as cur:
        cur.execute(
            "UPDATE jobs SET updated_at = now() - make_interval(secs => %s) WHERE id = ANY(%s)",
            (hours * 3600, list(job_ids)),
        )


def run_retention(app) -> bool:
    """Run the retention chore now, as the after-response hook would (claim included)."""
    with app.app_context():
        return chores.of(app).run_claimed(chores.of(app).named("retention"))


def run_retention_until_idle(app, db_conn) -> None:
    """Run the chore again and again (each run one batch, its size tuned by the box's
    speed), dropping its claim in between, until a run deletes nothing."""
    for _ in range(50):
        before = len(statuses_in_db(db_conn))
        with db_conn.cursor() as cur:
            cur.execute("DELETE FROM service_chores WHERE name = 'retention'")
        assert run_retention(app)
        if len(statuses_in_db(db_conn)) == before:
            return
    raise AssertionError("retention did not finish in 50 runs")


@pytest.fixture
def unclaimed(db_conn):
    """No earlier claim of the retention chore stands in the way."""
    with db_conn.cursor() as cur:
        cur.execute("DELETE FROM service_chores WHERE name = 'retention'")


def test_retention_deletes_only_terminal_jobs_older_than_the_setting(apps, db_conn, unclaimed):
    setup = flask_caller(apps())  # retention off while the jobs are made
    old_terminal = {job_with_history(setup, s) for s in TERMINAL_SETUP}
    old_terminal.add(job_with_history(setup, "COMPLETED", files=2))
    old_active = {job_with_history(setup, s) for s in ACTIVE_SETUP}
    young_terminal = {job_with_history(setup, s) for s in TERMINAL_SETUP}
    age(db_conn, old_terminal | old_active, hours=2)
    age(db_conn, young_terminal, hours=0.5)
    before = history_counts(db_conn)

    app = apps(JOB_RETENTION="1h")
    assert app.config["JOB_RETENTION"] == timedelta(hours=1)
    run_retention_until_idle(app, db_conn)

    remaining = set(statuses_in_db(db_conn))
    assert remaining == old_active | young_terminal
    assert history_counts(db_conn) == {job_id: before[job_id] for job_id in remaining}
    assert orphans(db_conn) == (0, 0, 0, 0)


def test_retention_runs_once_per_interval_across_processes(apps, db_conn, unclaimed):
    """Two apps stand for two replicas: the second finds the chore claimed and runs nothing."""
    setup = flask_caller(apps())
    first = job_with_history(setup, "COMPLETED")
    replica_a, replica_b = apps(JOB_RETENTION="1h"), apps(JOB_RETENTION="1h")
    age(db_conn, [first], hours=2)
    assert run_retention(replica_a)
    second = job_with_history(setup, "FAILED")
    age(db_conn, [second], hours=2)
    assert not run_retention(replica_b)
    assert set(statuses_in_db(db_conn)) == {second}


def test_retention_is_off_by_default(apps, db_conn):
    app = apps()
    assert app.config["JOB_RETENTION"] is None
    with app.app_context():
        assert chores.of(app).named("retention") not in chores.of(app).due()


def test_retention_runs_after_a_response_when_set(apps, db_conn, unclaimed):
    """Enabled, the chore is due and runs after any response (here a /healthz), on its own."""
    setup = flask_caller(apps())
    job_id = job_with_history(setup, "COMPLETED")
    age(db_conn, [job_id], hours=48)
    app = apps(JOB_RETENTION="1d")
    response = app.test_client().get("/healthz")
    response.close()  # the chore starts when the server is done with the response
    # ... in a thread (a greenlet under gevent) of its own, so the connection's
    # next request does not wait for it: give it a moment.
    deadline = time.monotonic() + 10
    while statuses_in_db(db_conn) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert statuses_in_db(db_conn) == {}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        (" 7d ", timedelta(days=7)),
        ("", None),
        (None, None),
    ],
)
def test_job_retention_accepts(database_url, value, expected):
    app = make_app(database_url, JOB_RETENTION=value)
    assert app.config["JOB_RETENTION"] == expected


@pytest.mark.parametrize(
    "value",
    ["30", "d", "30x", "30D", "1.5h", "-1d", "+1d", "0s", "0d", "30 d", "1d12h", "P30D",
     "36501d", "9999999999s", "30d\n1h", "٣d"],
)  # fmt: skip
def test_job_retention_refuses_bad_values_at_start_up(database_url, monkeypatch, value):
    with pytest.raises(ValueError, match=r"^JOB_RETENTION: ") as refused:
        make_app(database_url, JOB_RETENTION=value)
    assert repr(value.strip()) in str(refused.value)
    # The same from the environment, as production sets it.
    monkeypatch.setenv("JOB_RETENTION", value)
    with pytest.raises(ValueError, match=r"^JOB_RETENTION: "):
        create_app({"TESTING": True, "DATABASE_URL": database_url})


# ---- flask --app app prune -----------------------------------------------------------------


def test_prune_deletes_in_batches_and_says_what_it_did(app, runner, db_conn):
    call = flask_caller(app)
    old_completed = {job_with_history(call, "COMPLETED") for _ in range(4)}
    old_completed.add(job_with_history(call, "COMPLETED", files=2))
    old_failed = job_with_history(call, "FAILED")
    young_completed = job_with_history(call, "COMPLETED")
    old_running = job_with_history(call, "RUNNING")
    age(db_conn, [*old_completed, old_failed, old_running], hours=3)

    result = runner.invoke(
        args=["prune", "--older-than", "2h", "--status", "completed", "--batch-size", "2"]
    )

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "pruning COMPLETED older than 2h"
    assert lines[1].startswith("  2 jobs deleted so far (1 batch), ")  # after the first batch
    assert lines[-1].startswith("pruned 5 jobs (COMPLETED older than 2h) in ")
    assert " batches), " in lines[-1] and lines[-1].endswith(" jobs/s")
    assert set(statuses_in_db(db_conn)) == {old_failed, young_completed, old_running}
    assert orphans(db_conn) == (0, 0, 0, 0)


def test_prune_defaults_to_every_terminal_job_of_any_age(app, runner, db_conn):
    call = flask_caller(app)
    for status in TERMINAL_SETUP:
        job_with_history(call, status)
    running = job_with_history(call, "RUNNING")
    result = runner.invoke(args=["prune"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "pruning COMPLETED, STOPPED, FAILED of any age"
    assert result.output.splitlines()[-1].startswith("pruned 3 jobs (")
    assert statuses_in_db(db_conn) == {running: "RUNNING"}
    again = runner.invoke(args=["prune", "--status", "stopped,error", "--status", "completed"])
    assert again.exit_code == 0, again.output
    assert again.output.splitlines()[-1].startswith("pruned 0 jobs (COMPLETED, STOPPED, FAILED ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--older-than", "30x"], "'30x' is not a duration"),
        (["--older-than", "0s"], "out of range"),
        (["--status", "running"], "'running': status must be comma-separated tokens among: "),
        (["--status", ""], "tokens among: terminal"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_prune_refuses_bad_options_and_deletes_nothing(app, runner, db_conn, args, message):
    job_with_history(flask_caller(app), "COMPLETED")
    result = runner.invoke(args=["prune", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(statuses_in_db(db_conn)) == 1
