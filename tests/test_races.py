"""Races: many threads at once against the state guards (CONTRACT.md §3, §4).

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

The workload and the checks take a ``call(method, path, body) -> (status, json)``
so test_scaleout.py runs the same ones over HTTP against gunicorn.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

import psycopg2
import pytest
from test_chain import reference_progress

import chain
from app import create_app

Call = Callable[..., tuple[int, object]]

ACTIVE = ("SCHEDULED", "RUNNING", "STOP_REQUESTED", "STOPPING")
TERMINAL = ("COMPLETED", "STOPPED", "FAILED")
# CONTRACT.md §4.2's table, plus the operators' stop move of §3.
WORKER_MOVES = {
    ("SCHEDULED", "RUNNING"),
    ("SCHEDULED", "FAILED"),
    ("RUNNING", "COMPLETED"),
    ("RUNNING", "FAILED"),
    ("STOP_REQUESTED", "FAILED"),
    ("STOP_REQUESTED", "STOPPING"),
    ("STOPPING", "FAILED"),
    ("STOPPING", "STOPPED"),
    ("FAILED", "SCHEDULED"),
}
STOP_MOVES = {("SCHEDULED", "STOP_REQUESTED"), ("RUNNING", "STOP_REQUESTED")}
LEGAL_MOVES = WORKER_MOVES | STOP_MOVES
REPORTABLE = ("RUNNING", "COMPLETED", "FAILED", "STOPPING", "STOPPED", "SCHEDULED")

# How to bring a new (SCHEDULED) job to each status.
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


# ---- Plumbing ----------------------------------------------------------------


def flask_caller(app) -> Call:
    client = app.test_client()

    def call(method: str, path: str, body=None):
        kwargs = {} if body is None else {"json": body}
        response = client.open(path, method=method, **kwargs)
        return response.status_code, response.get_json(silent=True)

    return call


def race(make_call: Callable[[], Call], tasks: list[Callable], timeout: float = 60) -> list:
    """Run ``task(call, barrier)`` for each task in its own thread, all released together.

    The barrier is passed on so a task can meet the others again (lock-step rounds).
    """
    barrier = threading.Barrier(len(tasks))
    results: list = [None] * len(tasks)
    errors: list[BaseException] = []

    def run(i: int, task) -> None:
        try:
            call = make_call()
            barrier.wait(timeout=timeout)
            results[i] = task(call, barrier)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i, t), daemon=True) for i, t in enumerate(tasks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(t.is_alive() for t in threads), "a racing thread hung"
    if errors:
        real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        raise (real or errors)[0]
    return results


def create_job(call: Call, node_id: str = "worker-01", **extra) -> dict:
    code, body = call("POST", "/jobs", {"node_id": node_id, "descriptor": {}, **extra})
    assert code == 201, body
    return body


def drive(call: Call, job_id: int, status: str) -> None:
    for step in SETUP_PATHS[status]:
        if step == "stop":
            code, body = call("PUT", f"/jobs/{job_id}/stop")
        else:
            code, body = call("PUT", f"/jobs/{job_id}/status", {"status": step})
        assert code == 200, body


def all_jobs(call: Call) -> dict[int, str]:
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


def check_history(job_id: int, status: str, events: list[dict]) -> None:
    """A legal path: created SCHEDULED, legal moves only (no repeats), ending in ``status``."""
    types = [e["event_type"] for e in events]
    assert types, f"job {job_id} has no events"
    assert types[0] == "SCHEDULED", (job_id, types)
    for before, after in pairwise(types):
        assert (before, after) in LEGAL_MOVES, f"job {job_id}: illegal {before}->{after}: {types}"
    assert types[-1] == status, (job_id, status, types)
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids)), (job_id, ids)
    stamps = [e["created_at"] for e in events]
    assert stamps == sorted(stamps), (job_id, stamps)


# ---- The audit trail -------------------------------------------------------------

AUDIT_SETUP = """
DROP TRIGGER IF EXISTS race_audit ON jobs;
DROP TABLE IF EXISTS race_audit;
CREATE TABLE race_audit (
    seq bigserial PRIMARY KEY, job_id bigint NOT NULL, op text NOT NULL,
    old_status text, new_status text
);
CREATE OR REPLACE FUNCTION race_audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO race_audit (job_id, op, old_status) VALUES (OLD.id, 'DELETE', OLD.status);
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO race_audit (job_id, op, new_status) VALUES (NEW.id, 'INSERT', NEW.status);
    ELSIF OLD.status IS DISTINCT FROM NEW.status THEN
        INSERT INTO race_audit (job_id, op, old_status, new_status)
        VALUES (NEW.id, 'UPDATE', OLD.status, NEW.status);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER race_audit AFTER INSERT OR UPDATE OR DELETE ON jobs
    FOR EACH ROW EXECUTE FUNCTION race_audit_row();
"""

AUDIT_TEARDOWN = """
DROP TRIGGER IF EXISTS race_audit ON jobs;
DROP TABLE IF EXISTS race_audit;
DROP FUNCTION IF EXISTS race_audit_row();
"""


class Audit:
    """What really happened to each job, recorded by a row trigger on ``jobs``.

    Changes to one job are serialised by its row lock and the trigger runs
    under it, so per job the ``seq`` order is the real order.
    """

    def __init__(self, conn):
        self.conn = conn

    def history(self) -> dict[int, list[tuple[str, str | None, str | None]]]:
        with self.conn.cursor() as cur:
            cur.execute("SELECT job_id, op, old_status, new_status FROM race_audit ORDER BY seq")
            rows = cur.fetchall()
        out: dict[int, list] = defaultdict(list)
        for job_id, op, old, new in rows:
            out[job_id].append((op, old, new))
        return out

    def check(self, call: Call) -> None:
        """Every move legal, every deletion of a terminal job, events == status changes."""
        existing = all_jobs(call)
        for job_id, rows in self.history().items():
            assert rows[0] == ("INSERT", None, "SCHEDULED"), (job_id, rows)
            status: str | None = "SCHEDULED"
            moves = []
            for op, old, new in rows[1:]:
                assert status is not None, f"job {job_id} changed after its deletion: {rows}"
                assert op in ("UPDATE", "DELETE"), (job_id, rows)
                assert old == status, (job_id, rows)
                if op == "DELETE":
                    assert old in TERMINAL, f"job {job_id} was deleted while {old}: {rows}"
                    status = None
                else:
                    assert (old, new) in LEGAL_MOVES, f"job {job_id}: illegal {old}->{new}"
                    moves.append(new)
                    status = new
            if status is None:
                assert job_id not in existing, f"job {job_id} was deleted but is listed"
                continue
            assert existing.get(job_id) == status, (job_id, existing.get(job_id), rows)
            types = [e["event_type"] for e in events_of(call, job_id)]
            assert types == ["SCHEDULED", *moves], f"job {job_id}: events {types} vs {rows}"


@contextlib.contextmanager
def audit_trail(database_url: str):
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(AUDIT_SETUP)
        yield Audit(conn)
    finally:
        with conn.cursor() as cur:
            cur.execute(AUDIT_TEARDOWN)
        conn.close()


# ---- The chaos workload: stop vs transitions vs deletes ------------------------------


@dataclass
class ChaosRecord:
    """What the clients saw: enough to judge the run without the audit."""

    initial: dict[int, str] = field(default_factory=dict)
    ever_terminal: set[int] = field(default_factory=set)
    gone: set[int] = field(default_factory=set)  # named by a 204 delete
    answers: list[tuple] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, *entry) -> None:
        with self.lock:
            self.answers.append(entry)


def setup_round(call: Call, per_status: int) -> dict[int, str]:
    jobs = {}
    for status in SETUP_PATHS:
        for _ in range(per_status):
            job_id = create_job(call)["id"]
            drive(call, job_id, status)
            jobs[job_id] = status
    return jobs


def chaos_step(call: Call, rng: random.Random, job_ids: list[int], rec: ChaosRecord) -> None:
    op = rng.choices(
        ["stop", "report", "delete", "bulk_status", "bulk_ids"], weights=[20, 45, 15, 4, 12]
    )[0]
    if op == "stop":
        job_id = rng.choice(job_ids)
        code, body = call(rng.choice(["PUT", "POST"]), f"/jobs/{job_id}/stop")
        if code == 200:
            assert body["id"] == job_id
            # The stop moved it, or it could not be moved by a stop.
            assert body["status"] not in ("SCHEDULED", "RUNNING"), body
        else:
            assert (code, body["error_code"]) == (404, "JOB_NOT_FOUND"), (code, body)
        rec.note(op, job_id, code)
    elif op == "report":
        job_id = rng.choice(job_ids)
        to = rng.choice(REPORTABLE)
        if rng.random() < 0.6:
            # An informed worker: read the status, then report a legal next move
            # (which a concurrent request may already have made illegal).
            code, body = call("GET", f"/jobs/{job_id}")
            if code == 200:
                nexts = [b for a, b in WORKER_MOVES if a == body["status"]]
                to = rng.choice(sorted(nexts)) if nexts else to
        code, body = call("PUT", f"/jobs/{job_id}/status", {"status": to})
        if code == 200:
            assert (body["id"], body["status"]) == (job_id, to), body
            if to in TERMINAL:
                with rec.lock:
                    rec.ever_terminal.add(job_id)
        elif code == 409:
            assert body["error_code"] == "INVALID_STATE_TRANSITION", body
        else:
            assert (code, body["error_code"]) == (404, "JOB_NOT_FOUND"), (code, body)
        rec.note(op, job_id, to, code)
    elif op == "delete":
        job_id = rng.choice(job_ids)
        code, body = call("DELETE", f"/jobs/{job_id}")
        if code == 204:
            with rec.lock:
                rec.gone.add(job_id)
        else:
            assert (code, body["error_code"]) == (409, "JOB_CONFLICT"), (code, body)
            assert any(s in body["error_message"] for s in ACTIVE), body
        rec.note(op, job_id, code)
    elif op == "bulk_status":
        token = rng.choice(["terminal", "completed", "stopped", "error", "failed", "TERMINAL"])
        code, body = call("DELETE", f"/jobs?status={token}")
        assert code == 204, (code, body)
        rec.note(op, token, code)
    else:
        chosen = sorted(rng.sample(job_ids, rng.randint(1, 4)))
        code, body = call("DELETE", "/jobs", {"job_ids": chosen})
        if code == 204:
            with rec.lock:
                rec.gone.update(chosen)
        else:
            assert (code, body["error_code"]) == (409, "JOB_CONFLICT"), (code, body)
        rec.note(op, tuple(chosen), code)


def run_chaos(
    setup_call: Call,
    make_call: Callable[[], Call],
    threads: int = 16,
    rounds: int = 3,
    steps: int = 20,
    per_status: int = 3,
    seed: int = 0,
) -> ChaosRecord:
    rec = ChaosRecord()
    for r in range(rounds):
        jobs = setup_round(setup_call, per_status)
        rec.initial.update(jobs)
        rec.ever_terminal.update(j for j, s in jobs.items() if s in TERMINAL or s == "RETRIED")
        tasks = [
            chaos_task(sorted(jobs), rec, steps, seed * 1000 + r * 100 + t) for t in range(threads)
        ]
        race(make_call, tasks)
    return rec


def chaos_task(job_ids: list[int], rec: ChaosRecord, steps: int, seed: int):
    def task(call, barrier):
        rng = random.Random(seed)
        for _ in range(steps):
            barrier.wait(timeout=30)  # lock-step: every step is a fresh pile-up
            chaos_step(call, rng, job_ids, rec)

    return task


def check_chaos(call: Call, rec: ChaosRecord) -> dict[int, str]:
    existing = all_jobs(call)
    never_terminal = set(rec.initial) - rec.ever_terminal
    lost = sorted(never_terminal - set(existing))
    assert not lost, f"jobs deleted although never terminal: {lost}"
    resurrected = sorted(rec.gone & set(existing))
    assert not resurrected, f"jobs still there after a 204 delete: {resurrected}"
    for job_id, status in existing.items():
        check_history(job_id, status, events_of(call, job_id))
    # The run must have exercised the guards, not just 404s.
    codes = defaultdict(int)
    for entry in rec.answers:
        codes[entry[0], entry[-1]] += 1
    for wanted in [("report", 200), ("report", 409), ("delete", 204), ("stop", 200)]:
        assert codes[wanted] > 0, dict(codes)
    return existing


# ---- Fixtures ------------------------------------------------------------------------


@pytest.fixture
def race_app(app, database_url):
    """The service with a pool big enough for every racing thread (``app`` truncated the DB)."""
    racing = create_app({"TESTING": True, "DATABASE_URL": database_url, "DB_POOL_SIZE": 40})
    yield racing
    pool = racing.extensions.get("jobs_db_pool")
    if pool is not None:
        pool.drop_idle()


@pytest.fixture
def make_call(race_app):
    return lambda: flask_caller(race_app)


@pytest.fixture
def audit(app, database_url):
    with audit_trail(database_url) as trail:
        yield trail


# ---- (a) stop vs transitions vs deletes ----------------------------------------------


def test_stop_transitions_and_deletes_race(make_call, audit):
    setup = make_call()
    rec = run_chaos(setup, make_call, threads=16, rounds=6, steps=10, per_status=4)
    check_chaos(setup, rec)
    audit.check(setup)


def test_retry_races_deletes(make_call, audit):
    retry_vs_deletes(make_call)
    audit.check(make_call())


def retry_vs_deletes(make_call, n_jobs: int = 30) -> set[int]:
    """A FAILED job retried (-> SCHEDULED) while every kind of delete goes for it."""
    setup = make_call()
    jobs = []
    for _ in range(n_jobs):
        job_id = create_job(setup)["id"]
        drive(setup, job_id, "RUNNING")
        jobs.append(job_id)
    retried: set[int] = set()
    lock = threading.Lock()

    def step_through(call, barrier, prepare: bool):
        # Lock-step over the jobs: one turns FAILED, then everyone goes for it.
        for job_id in jobs:
            barrier.wait(timeout=30)
            if prepare:
                code, body = call("PUT", f"/jobs/{job_id}/status", {"status": "FAILED"})
                assert code == 200, body
            barrier.wait(timeout=30)
            yield job_id

    def retrier(prepare: bool = False):
        def task(call, barrier):
            for job_id in step_through(call, barrier, prepare):
                code, body = call("PUT", f"/jobs/{job_id}/status", {"status": "SCHEDULED"})
                assert code in (200, 404), (code, body)
                if code == 200:
                    assert body["status"] == "SCHEDULED"
                    with lock:
                        retried.add(job_id)

        return task

    def deleter(kind, seed):
        def task(call, barrier):
            rng = random.Random(seed)
            for job_id in step_through(call, barrier, False):
                if kind == "status":
                    code, body = call("DELETE", f"/jobs?status={rng.choice(['terminal', 'error'])}")
                    assert code == 204, body
                elif kind == "ids":
                    chosen = sorted({job_id, *rng.sample(jobs, rng.randint(0, 2))})
                    code, body = call("DELETE", "/jobs", {"job_ids": chosen})
                    assert code in (204, 409), (code, body)
                else:
                    code, body = call("DELETE", f"/jobs/{job_id}")
                    assert code in (204, 409), (code, body)

        return task

    tasks = [retrier(prepare=True)] + [retrier()] * 5
    tasks += [deleter(kind, i) for i, kind in enumerate(["status", "ids", "single"] * 4)]
    race(make_call, tasks)
    existing = all_jobs(setup)
    # A job that became SCHEDULED again is active for good: no delete may take it.
    assert retried, "no retry won against the deletes; the race did not happen"
    assert len(retried) < len(jobs), "no delete won against the retries"
    assert retried <= set(existing), sorted(retried - set(existing))
    assert set(existing) & set(jobs) <= retried
    for job_id in retried:
        assert existing[job_id] == "SCHEDULED"
        check_history(job_id, "SCHEDULED", events_of(setup, job_id))
    return retried


def wait_until_blocked(conn, count: int, timeout: float = 5.0) -> None:
    """Wait until ``count`` backends of the service wait on a lock."""
    deadline = time.monotonic() + timeout
    with conn.cursor() as cur:
        while time.monotonic() < deadline:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = 'jobs-service' AND wait_event_type = 'Lock'"
            )
            if cur.fetchone()[0] >= count:
                return
            time.sleep(0.01)
    raise AssertionError(f"{count} requests did not block in time")


def test_bulk_deletes_by_status_and_by_ids_do_not_deadlock(make_call, database_url):
    """Both kinds of bulk delete lock rows; in different orders they would deadlock.

    A side transaction holds job A so that the by-ids delete (which locks A, then B)
    waits first in A's queue, then the by-status delete, which visits B before A
    (B's row is physically first), comes in. With the same lock order in both, the
    two just queue; with opposite orders PostgreSQL kills one as a deadlock (500).
    """
    setup = make_call()
    a, b = create_job(setup)["id"], create_job(setup)["id"]
    drive(setup, b, "COMPLETED")
    drive(setup, a, "COMPLETED")
    side = psycopg2.connect(database_url)
    try:
        with side.cursor() as cur:
            cur.execute("SELECT id FROM jobs WHERE id IN (%s, %s) ORDER BY ctid", (a, b))
            assert [r[0] for r in cur.fetchall()] == [b, a], "B must come first in a scan"
            cur.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (a,))  # holds A
        watcher = psycopg2.connect(database_url)
        watcher.autocommit = True
        results: dict[str, tuple] = {}

        def run(name, method, path, body=None):
            results[name] = make_call()(method, path, body)

        by_ids = threading.Thread(target=run, args=("ids", "DELETE", "/jobs", {"job_ids": [a, b]}))
        by_status = threading.Thread(
            target=run, args=("status", "DELETE", "/jobs?status=completed")
        )
        by_ids.start()
        wait_until_blocked(watcher, 1)
        by_status.start()
        wait_until_blocked(watcher, 2)
        side.rollback()  # releases A
        by_ids.join(10)
        by_status.join(10)
        watcher.close()
    finally:
        side.close()
    assert results["ids"][0] == 204, results
    assert results["status"][0] == 204, results
    assert all_jobs(setup) == {}


@pytest.mark.parametrize("kind", ["status", "ids", "single"])
def test_a_job_retried_while_a_delete_waits_for_it_survives(make_call, database_url, kind):
    """The delete is blocked on the FAILED job's lock while it turns SCHEDULED."""
    setup = make_call()
    a, b = create_job(setup)["id"], create_job(setup)["id"]
    drive(setup, a, "FAILED")
    drive(setup, b, "FAILED")
    side = psycopg2.connect(database_url)
    watcher = psycopg2.connect(database_url)
    watcher.autocommit = True
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
        wait_until_blocked(watcher, 1)
        side.commit()
        deleter.join(10)
    finally:
        side.close()
        watcher.close()
    code, body = answer[0]
    remaining = all_jobs(setup)
    assert remaining.get(a) == "SCHEDULED", (code, body, remaining)
    if kind == "status":
        assert code == 204 and b not in remaining
    else:
        assert (code, body["error_code"]) == (409, "JOB_CONFLICT"), body
        assert "SCHEDULED" in body["error_message"]
        assert remaining.get(b) == "FAILED"  # all or nothing


# ---- (b) two workers, two outcomes -----------------------------------------------------


def reporter(job_id: int, what: str, detail=None):
    """A task reporting ``what`` (or requesting a stop): returns (what, code, body)."""

    def task(call, barrier):
        if what == "stop":
            return what, *call("PUT", f"/jobs/{job_id}/stop")
        return what, *call("PUT", f"/jobs/{job_id}/status", {"status": what, "detail": detail})

    return task


def poster(path: str, payload, tag=None):
    def task(call, barrier):
        return tag, *call("POST", path, payload)

    return task


def test_completed_vs_failed_exactly_one_wins(make_call):
    one_winner_rounds(make_call, 10)


def one_winner_rounds(make_call, rounds: int) -> None:
    """8 workers report COMPLETED and 8 FAILED on one RUNNING job, per round."""
    setup = make_call()
    for _ in range(rounds):
        job_id = create_job(setup)["id"]
        drive(setup, job_id, "RUNNING")
        tasks = [reporter(job_id, to, {"w": to}) for to in ["COMPLETED", "FAILED"] * 8]
        results = race(make_call, tasks)
        won = {to for to, code, _ in results if code == 200}
        assert len(won) == 1, results
        (winner,) = won
        for to, code, body in results:
            if to == winner:
                assert (code, body["status"]) == (200, winner), body
            else:
                assert (code, body["error_code"]) == (409, "INVALID_STATE_TRANSITION"), body
                assert winner in body["error_message"], body
        events = events_of(setup, job_id)
        assert [e["event_type"] for e in events] == ["SCHEDULED", "RUNNING", winner]
        assert events[-1]["detail"] == {"w": winner}
        code, body = setup("GET", f"/jobs/{job_id}")
        assert body["status"] == winner


def test_stop_racing_worker_reports(make_call, audit):
    """stop vs COMPLETED vs FAILED vs STOPPING on RUNNING jobs: one legal path each."""
    setup = make_call()
    for _ in range(8):
        job_id = create_job(setup)["id"]
        drive(setup, job_id, "RUNNING")
        plan = ["stop"] * 4 + ["COMPLETED"] * 4 + ["FAILED"] * 4 + ["STOPPING"] * 4
        results = race(make_call, [reporter(job_id, what) for what in plan])
        for what, code, body in results:
            assert code in (200, 409), (what, code, body)
        code, job = setup("GET", f"/jobs/{job_id}")
        events = events_of(setup, job_id)
        check_history(job_id, job["status"], events)
        assert sum(e["event_type"] in TERMINAL for e in events) <= 1
    audit.check(setup)


# ---- (c) file registration races ---------------------------------------------------------


def file_body(name, start, end, size=1, **hashes) -> dict:
    return {"file_name": name, "start_block": start, "end_block": end, "size_bytes": size, **hashes}


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
    drive(setup, job_id, "RUNNING")
    for n in range(4):
        body = file_body(f"f{n}.parquet", n * 10, n * 10 + 9, 100 + n)
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
    bodies = [file_body("x.parquet", 0, 9, size) for size in range(20)]
    results = race(make_call, [poster(path, body, body) for body in bodies])
    stored = [body for body, code, _ in results if code == 201]
    assert len(stored) == 1, results
    for _, code, answer in results:
        if code != 201:
            assert (code, answer["error_code"]) == (409, "FILE_CONFLICT"), answer
    rows = files_in_db(database_url, job_id)
    assert [(r[2], r[5]) for r in rows] == [("x.parquet", stored[0]["size_bytes"])]
    # Two versions, ten each: the winner's twins are retries, the others conflicts.
    a, b = file_body("y.parquet", 10, 19, 1), file_body("y.parquet", 10, 29, 1)
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
                "POST", f"/jobs/{job_id}/tables/{table}/files", file_body(name, start, start + 9, 7)
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
        drive(setup, job_id, "RUNNING")
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
            "POST", f"/jobs/{job_id}/tables/t0/files", file_body("late.parquet", 0, 1, 1)
        )
        assert (code, body["error_code"]) == (409, "JOB_CONFLICT")


def test_a_stop_is_not_starved_by_busy_registrations(make_call):
    """16 workers registering files back to back must not keep an operator's stop out.

    (Row share locks let new share lockers pass a waiting exclusive locker, so
    a job share-locked by every registration could not be stopped while busy.)
    """
    setup = make_call()
    job_id = create_job(setup)["id"]
    drive(setup, job_id, "RUNNING")
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
                    file_body(name, k * 10, k * 10 + 9, 1),
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
    idempotent_creation_rounds(make_call, 5)
    assert len(all_jobs(make_call())) == 5


def idempotent_creation_rounds(make_call, rounds: int) -> None:
    """20 identical POST /jobs with one idempotency_key per round: one job."""
    setup = make_call()
    for n in range(rounds):
        key = f"deploy-{n}-{'k' * n}"
        payload = {"node_id": f"worker-{n}", "descriptor": {"n": n}, "idempotency_key": key}
        results = race(make_call, [poster("/jobs", payload)] * 20)
        codes = sorted(code for _, code, _ in results)
        assert codes == [200] * 19 + [201], codes
        assert len({body["id"] for _, _, body in results}) == 1
        job = results[0][2]
        assert all(body == job for _, _, body in results), results
        assert (job["status"], job["node_id"], job["descriptor"]) == (
            "SCHEDULED",
            f"worker-{n}",
            {"n": n},
        )
        assert [e["event_type"] for e in events_of(setup, job["id"])] == ["SCHEDULED"]


# ---- (e) concurrent registrations keep the canonical progress ---------------------------


def h(n: int) -> str:
    return "0x" + f"{n:064x}"


def messy_files(rng: random.Random, prefix: str) -> list[dict]:
    """A linked chain of 30 files, plus forks, reorgs, overlaps, gaps and mismatches."""
    files, prev = [], h(0)
    for i in range(30):
        files.append(
            file_body(f"{prefix}base{i}", i * 10, i * 10 + 9, rng.randint(1, 9), prev_hash=prev)
        )
        files[-1]["block_hash"] = prev = h(1000 + i)
    for i in range(30):
        start = rng.randrange(0, 300, 10) + rng.choice([0, 0, 0, 5])
        end = start + rng.choice([4, 9, 9, 14, 19])
        extra = {}
        if rng.random() < 0.7:
            extra["block_hash"] = h(rng.randint(1, 40))
        if rng.random() < 0.7:
            # Mostly the base chain's hash (links), sometimes another.
            k = start // 10 - 1
            extra["prev_hash"] = (
                h(1000 + k) if k >= 0 and rng.random() < 0.6 else h(rng.randint(1, 40))
            )
        files.append(file_body(f"{prefix}x{i}", start, end, rng.randint(1, 2**40), **extra))
    files.append(file_body(f"{prefix}huge", 300, 309, 2**63 - 1, prev_hash=prev))
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
        drive(setup, job_id, "RUNNING")
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
