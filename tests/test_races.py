"""Races: many threads at once against the state guards
(docs/API.md: the status machine, DELETE /jobs).

Every test starts its threads together on a ``threading.Barrier`` and gives
each thread its own test client of an app whose pool holds enough connections.
What is checked afterwards:

- through the API: no job that never was terminal is gone; a 204 delete leaves
  its jobs gone; every remaining job's events are a legal path through the
  transition table (created SCHEDULED, each step a legal move, no repeats) and
  end in its current status;
- through an audit trigger installed on ``jobs`` for the test only: every
  status change of every job (also of the deleted ones) was a legal move, every
  deletion removed a job that was terminal at that instant, and the events of
  the remaining jobs are exactly their status changes.

The audit trail is conftest.py's ``audit`` fixture (support/races.py). The
workloads shared with test_scaleout.py (which runs them over HTTP against
two gunicorn instances) live in support/races.py; they take a ``call(method, path,
body) -> (status, json)`` and return what they saw, and the tests here assert.
"""

from __future__ import annotations

import random
import threading
import time

import psycopg2
import pytest

from jobs import db
from jobs.store import chain

from support.oracle import TERMINAL, history_problems, reference_progress
from support.races import (
    chaos_problems,
    idempotent_round_problems,
    one_winner_problems,
    poster,
    race,
    race_completed_against_failed,
    race_idempotent_creations,
    race_retries_against_deletes,
    reporter,
    retry_race_problems,
    run_chaos,
    wait_until_blocked,
)
from support.service import (
    block_hash,
    create_job,
    events_of,
    file_entry,
    flask_caller,
    job_statuses,
    move_to,
)

# ---- Fixtures ------------------------------------------------------------------------


@pytest.fixture
def race_app(apps):
    """The service with a pool big enough for every racing thread (on the emptied database)."""
    return apps(DB_POOL_SIZE=40)


@pytest.fixture
def make_call(race_app):
    return lambda: flask_caller(race_app)


# ---- (a) stop vs transitions vs deletes ----------------------------------------------


def test_stop_transitions_and_deletes_race(make_call, audit):
    setup = make_call()
    rec = run_chaos(setup, make_call, threads=16, rounds=6, steps=10, per_status=4)
    assert chaos_problems(setup, rec) == []
    assert audit.problems(setup) == []


def test_retry_races_deletes(make_call, audit):
    """A FAILED job retried (-> SCHEDULED) while every kind of delete goes for it."""
    setup = make_call()
    result = race_retries_against_deletes(make_call)
    # A job that became SCHEDULED again is active for good: no delete may take it.
    assert retry_race_problems(setup, result) == []
    assert audit.problems(setup) == []


def test_bulk_deletes_by_status_and_by_ids_do_not_deadlock(make_call, database_url):
    """Both kinds of bulk delete lock rows; in different orders they would deadlock.

    A side transaction holds job A so that the by-ids delete (which locks A, then B)
    waits first in A's queue, then the by-status delete, which visits B before A
    (B's row is physically first), comes in. With the same lock order in both, the
    two just queue; with opposite orders PostgreSQL kills one as a deadlock (500).
    """
    setup = make_call()
    a, b = create_job(setup)["id"], create_job(setup)["id"]
    move_to(setup, b, "COMPLETED")
    move_to(setup, a, "COMPLETED")
    side = psycopg2.connect(database_url)
    try:
        with side.cursor() as cur:
            cur.execute("SELECT id FROM jobs WHERE id IN (%s, %s) ORDER BY ctid", (a, b))
            assert [r[0] for r in cur.fetchall()] == [b, a], "B must come first in a scan"
            cur.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (a,))  # holds A
        results: dict[str, tuple] = {}

        def run(name, method, path, body=None):
            results[name] = make_call()(method, path, body)

        by_ids = threading.Thread(target=run, args=("ids", "DELETE", "/jobs", {"job_ids": [a, b]}))
        by_status = threading.Thread(
            target=run, args=("status", "DELETE", "/jobs?status=completed")
        )
        by_ids.start()
        wait_until_blocked(database_url, 1)
        by_status.start()
        wait_until_blocked(database_url, 2)
        side.rollback()  # releases A
        by_ids.join(10)
        by_status.join(10)
    finally:
        side.close()
    assert results["ids"][0] == 204, results
    assert results["status"][0] == 204, results
    assert job_statuses(setup) == {}


@pytest.mark.parametrize("kind", ["status", "ids", "single"])
def test_a_job_retried_while_a_delete_waits_for_it_survives(make_call, database_url, kind):
    """The delete is blocked on the FAILED job's lock while it turns SCHEDULED."""
    setup = make_call()
    a, b = create_job(setup)["id"], create_job(setup)["id"]
    move_to(setup, a, "FAILED")
    move_to(setup, b, "FAILED")
    side = psycopg2.connect(database_url)
    answer: list[tuple] = []
    request = {
        "status": ("DELETE", "/jobs?status=terminal", None),
        "ids": ("DELETE", "/jobs", {"job_ids": [a, b]}),
        "single": ("DELETE", f"/jobs/{a}", None),
    }[kind]
    try:
        with side.cursor() as cur:
            # What a retry does, held open: FAILED -> SCHEDULED, not yet committed.
            cur.execute("UPDATE jobs SET status = 'SCHEDULED' WHERE id = %s", (a,))
        deleter = threading.Thread(target=lambda: answer.append(make_call()(*request)))
        deleter.start()
        wait_until_blocked(database_url, 1)
        side.commit()
        deleter.join(10)
    finally:
        side.close()
    code, body = answer[0]
    remaining = job_statuses(setup)
    assert remaining.get(a) == "SCHEDULED", (code, body, remaining)
    if kind == "status":
        assert code == 204 and b not in remaining
    else:
        assert (code, body["error_code"]) == (409, "JOB_CONFLICT"), body
        assert "SCHEDULED" in body["error_message"]
        assert remaining.get(b) == "FAILED"  # all or nothing


# ---- (b) two workers, two outcomes -----------------------------------------------------


def test_completed_vs_failed_exactly_one_wins(make_call):
    """8 workers report COMPLETED and 8 FAILED on one RUNNING job, per round."""
    for round_ in race_completed_against_failed(make_call, rounds=10):
        assert one_winner_problems(round_) == []


def test_stop_racing_worker_reports(make_call, audit):
    """stop vs COMPLETED vs FAILED vs STOPPING on RUNNING jobs: one legal path each."""
    setup = make_call()
    for _ in range(8):
        job_id = create_job(setup)["id"]
        move_to(setup, job_id, "RUNNING")
        plan = ["stop"] * 4 + ["COMPLETED"] * 4 + ["FAILED"] * 4 + ["STOPPING"] * 4
        results = race(make_call, [reporter(job_id, what) for what in plan])
        for what, code, body in results:
            assert code in (200, 409), (what, code, body)
        code, job = setup("GET", f"/jobs/{job_id}")
        events = events_of(setup, job_id)
        assert history_problems(job_id, job["status"], events) == []
        assert sum(e["event_type"] in TERMINAL for e in events) <= 1
    assert audit.problems(setup) == []


# ---- (c) file registration races ---------------------------------------------------------


def files_in_db(database_url, job_id, table=None) -> list[tuple]:
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT id, table_name, file_name, start_block, end_block, size_bytes,"
                " block_hash, prev_hash, created_at FROM job_files"
                " WHERE job_id = %s AND (%s::text IS NULL OR table_name = %s) ORDER BY id",
                (job_id, table, table),
            )
            return cur.fetchall()
    finally:
        conn.close()


def test_identical_registrations_store_one_file(make_call, database_url):
    setup = make_call()
    job_id = create_job(setup)["id"]
    move_to(setup, job_id, "RUNNING")
    for n in range(4):
        body = file_entry(f"f{n}.parquet", n * 10, n * 10 + 9, 100 + n)
        path = f"/jobs/{job_id}/tables/blocks/files"
        payload = body if n % 2 else [body]
        results = race(make_call, [poster(path, payload)] * 20)
        codes = sorted(code for _, code, _ in results)
        assert codes == [200] * 19 + [201], results
        for _, code, answer in results:
            expected = (1, 0) if code == 201 else (0, 1)
            assert (answer["registered"], answer["unchanged"]) == expected, answer
            assert answer["progress"]["current_block"] == n * 10 + 9, answer
    rows = files_in_db(database_url, job_id)
    assert [r[2] for r in rows] == [f"f{n}.parquet" for n in range(4)]
    code, progress = setup("GET", f"/jobs/{job_id}/progress")
    assert progress["tables"]["blocks"] == {
        "start_block": 0,
        "current_block": 39,
        "files_count": 4,
        "total_size_bytes": 100 + 101 + 102 + 103,
    }


def test_conflicting_registrations(make_call, database_url):
    setup = make_call()
    job_id = create_job(setup)["id"]
    path = f"/jobs/{job_id}/tables/blocks/files"
    # All different: one stored, every other one is a conflict.
    bodies = [file_entry("x.parquet", 0, 9, size) for size in range(20)]
    results = race(make_call, [poster(path, body, body) for body in bodies])
    stored = [body for body, code, _ in results if code == 201]
    assert len(stored) == 1, results
    for _, code, answer in results:
        if code != 201:
            assert (code, answer["error_code"]) == (409, "FILE_CONFLICT"), answer
    rows = files_in_db(database_url, job_id)
    assert [(r[2], r[5]) for r in rows] == [("x.parquet", stored[0]["size_bytes"])]
    # Two versions, ten each: the winner's twins are retries, the others conflicts.
    a, b = file_entry("y.parquet", 10, 19, 1), file_entry("y.parquet", 10, 29, 1)
    results = race(make_call, [poster(path, body, body) for body in [a, b] * 10])
    (winner,) = [body for body, code, _ in results if code == 201]
    for body, code, answer in results:
        if code == 201:
            continue
        if body == winner:
            assert code == 200, answer
        else:
            assert (code, answer["error_code"]) == (409, "FILE_CONFLICT"), answer
    assert sorted(code for _, code, _ in results) == [200] * 9 + [201] + [409] * 10
    rows = files_in_db(database_url, job_id)
    assert [(r[2], r[4]) for r in rows][1:] == [("y.parquet", winner["end_block"])]


def registrar(job_id: int, thread: int):
    """Registers new files, one request each, until the job refuses them."""

    def task(call, barrier):
        seen = []
        table = f"t{thread % 3}"
        for k in range(40):
            name = f"w{thread}_{k}.parquet"
            start = (thread * 1000 + k) * 10
            began = time.monotonic()
            code, body = call(
                "POST",
                f"/jobs/{job_id}/tables/{table}/files",
                file_entry(name, start, start + 9, 7),
            )
            seen.append((name, began, code, body))
            if code != 201:
                break
        return seen

    return task


def finisher(job_id: int, terminal: str, finished_at: list[float]):
    def task(call, barrier):
        time.sleep(random.uniform(0.005, 0.05))
        code, body = call("PUT", f"/jobs/{job_id}/status", {"status": terminal})
        finished_at.append(time.monotonic())
        assert (code, body["status"]) == (200, terminal), body
        return []

    return task


@pytest.mark.parametrize("terminal", ["COMPLETED", "FAILED"])
def test_registration_racing_a_terminal_transition(make_call, database_url, terminal):
    setup = make_call()
    for _ in range(2):
        job_id = create_job(setup)["id"]
        move_to(setup, job_id, "RUNNING")
        finished_at: list[float] = []
        tasks = [registrar(job_id, t) for t in range(15)]
        results = race(make_call, [*tasks, finisher(job_id, terminal, finished_at)])
        answers = [a for seen in results for a in seen]
        stored = {r[2]: r for r in files_in_db(database_url, job_id)}
        accepted = {name for name, _, code, _ in answers if code == 201}
        for name, began, code, body in answers:
            if code == 201:
                assert name in stored
                # A registration sent after the job was seen terminal must be refused.
                assert began < finished_at[0], (name, began, finished_at)
            else:
                assert (code, body["error_code"]) == (409, "JOB_CONFLICT"), body
                assert name not in stored
        assert set(stored) == accepted
        assert any(code == 409 for _, _, code, _ in answers), "the transition came too late"
        # In the database's own clock: every file was written before the job turned terminal.
        events = events_of(setup, job_id)
        assert [e["event_type"] for e in events][-1] == terminal
        conn = psycopg2.connect(database_url)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FROM job_files f JOIN job_events e ON e.job_id = f.job_id"
                    " WHERE f.job_id = %s AND e.event_type = %s AND f.created_at > e.created_at",
                    (job_id, terminal),
                )
                assert cur.fetchone()[0] == 0
        finally:
            conn.close()
        # And nothing is accepted afterwards.
        code, body = setup(
            "POST", f"/jobs/{job_id}/tables/t0/files", file_entry("late.parquet", 0, 1, 1)
        )
        assert (code, body["error_code"]) == (409, "JOB_CONFLICT")


def test_a_stop_is_not_starved_by_busy_registrations(make_call):
    """16 workers registering files back to back must not keep an operator's stop out.

    (Row share locks let new share lockers pass a waiting exclusive locker, so
    a job share-locked by every registration could not be stopped while busy.)
    """
    setup = make_call()
    job_id = create_job(setup)["id"]
    move_to(setup, job_id, "RUNNING")
    done = threading.Event()
    timings: list[float] = []

    def busy_worker(thread):
        def task(call, barrier):
            for k in range(10_000):
                if done.is_set():
                    return
                name = f"busy{thread}_{k}"
                code, body = call(
                    "POST",
                    f"/jobs/{job_id}/tables/t{thread}/files",
                    file_entry(name, k * 10, k * 10 + 9, 1),
                )
                assert code in (201, 409), body

        return task

    def operator(call, barrier):
        try:
            time.sleep(0.3)  # let the registrations pile up first
            began = time.monotonic()
            code, body = call("PUT", f"/jobs/{job_id}/stop")
            timings.append(time.monotonic() - began)
            assert (code, body["status"]) == (200, "STOP_REQUESTED"), body
        finally:
            done.set()

    race(make_call, [busy_worker(t) for t in range(16)] + [operator])
    assert timings[0] < 2.0, f"the stop waited {timings[0]:.2f}s behind registrations"


# ---- (d) idempotent creation -------------------------------------------------------------


def test_idempotency_key_race_creates_one_job(make_call):
    """20 identical POST /jobs with one idempotency_key per round: one job."""
    rounds = race_idempotent_creations(make_call, 5)
    for round_ in rounds:
        assert idempotent_round_problems(round_) == []
    assert len(job_statuses(make_call())) == 5


# ---- (e) concurrent registrations keep the canonical progress ---------------------------


def messy_files(rng: random.Random, prefix: str) -> list[dict]:
    """A linked chain of 30 files, plus forks, reorgs, overlaps, gaps and mismatches."""
    files, prev = [], block_hash(0)
    for i in range(30):
        files.append(
            file_entry(f"{prefix}base{i}", i * 10, i * 10 + 9, rng.randint(1, 9), prev_hash=prev)
        )
        files[-1]["block_hash"] = prev = block_hash(1000 + i)
    for i in range(30):
        start = rng.randrange(0, 300, 10) + rng.choice([0, 0, 0, 5])
        end = start + rng.choice([4, 9, 9, 14, 19])
        extra = {}
        if rng.random() < 0.7:
            extra["block_hash"] = block_hash(rng.randint(1, 40))
        if rng.random() < 0.7:
            # Mostly the base chain's hash (links), sometimes another.
            k = start // 10 - 1
            extra["prev_hash"] = (
                block_hash(1000 + k)
                if k >= 0 and rng.random() < 0.6
                else block_hash(rng.randint(1, 40))
            )
        files.append(file_entry(f"{prefix}x{i}", start, end, rng.randint(1, 2**40), **extra))
    files.append(file_entry(f"{prefix}huge", 300, 309, 2**63 - 1, prev_hash=prev))
    rng.shuffle(files)
    return files


def batch_registrar(job_id: int, share: list[dict], seed: int):
    """Registers ``share`` in batches of 1..3; returns (names, progress answered) per batch."""
    rng, batches, i = random.Random(seed), [], 0
    while i < len(share):
        n = rng.randint(1, 3)
        batches.append(share[i : i + n])
        i += n

    def task(call, barrier):
        seen = []
        for batch in batches:
            code, body = call("POST", f"/jobs/{job_id}/tables/blocks/files", batch)
            assert code == 201, body
            seen.append(([f["file_name"] for f in batch], body["progress"]))
        return seen

    return task


def progress_of_rows(rows: list[tuple]) -> dict:
    """chain.walk over job_files rows (id, table, name, start, end, size, hashes...)."""
    in_walk_order = sorted(rows, key=lambda r: (r[3], -r[0]))
    walked = chain.walk(chain.ChainFile(*r[3:8]) for r in in_walk_order)
    expected = {
        "start_block": walked.start_block,
        "current_block": walked.current_block,
        "files_count": walked.files_count,
        "total_size_bytes": walked.total_size_bytes,
    }
    # The independent reference agrees (registration order = id order).
    keys = ("start_block", "end_block", "size_bytes", "block_hash", "prev_hash")
    files = [dict(zip(keys, r[3:8], strict=True)) for r in sorted(rows)]
    assert reference_progress(files) == expected
    return expected


def test_concurrent_registrations_keep_canonical_progress(make_call, database_url):
    setup = make_call()
    rng = random.Random(7)
    for round_ in range(3):
        job_id = create_job(setup)["id"]
        move_to(setup, job_id, "RUNNING")
        files = messy_files(rng, f"r{round_}_")
        # Each of 16 threads registers its share in batches of 1..3.
        tasks = [batch_registrar(job_id, files[t::16], round_ * 100 + t) for t in range(16)]
        results = race(make_call, tasks)
        rows = files_in_db(database_url, job_id, "blocks")
        assert len(rows) == len(files)
        id_of = {r[2]: r[0] for r in rows}
        # Every registration answered the progress right after its own files, in the
        # order the database registered them (the id order)...
        for seen in results:
            for names, progress in seen:
                last = max(id_of[n] for n in names)
                assert progress == progress_of_rows([r for r in rows if r[0] <= last]), names
        # ...and the final progress is the walk over all of them.
        _, body = setup("GET", f"/jobs/{job_id}/progress")
        assert body["tables"] == {"blocks": progress_of_rows(rows)}


# ---- A new app's first requests --------------------------------------------------------


def test_the_first_requests_of_a_new_app_share_one_pool(apps, monkeypatch):
    """Twenty threads make a new app's first requests at once: one pool is made, and
    every connection goes back to the pool it came from. (Two pools made at once let
    a request give its connection back to the other one: ValueError, seen once in
    the idempotency race through PgBouncer.) Making a pool is slowed here, so that
    the moment between looking for the pool and keeping it is wide."""
    made = []
    new_pool = db._new_pool

    def slow_new_pool(cfg, url):
        made.append(url)
        time.sleep(0.05)
        return new_pool(cfg, url)

    monkeypatch.setattr(db, "_new_pool", slow_new_pool)
    app = apps(DB_POOL_SIZE=40)
    answers = race(lambda: flask_caller(app), [lambda call, _: call("GET", "/jobs")] * 20)
    assert [status for status, _ in answers] == [200] * 20
    assert len(made) == 1
