"""Racing requests, what really happened, and the workloads of the race tests.

- Racing: ``race`` runs tasks in threads released together (a task is
  ``task(call, barrier)``; ``reporter`` and ``poster`` make the common ones);
  ``wait_until_blocked`` waits for the service's requests to queue on a lock.
- What really happened: ``audit_trail`` yields an ``Audit`` of every status
  change, recorded in the database by a row trigger; ``illegal_histories``
  judges jobs' events by the status machine (support.oracle).
- The workloads shared by test_races.py (in process) and test_scaleout.py (two
  gunicorn instances): ``run_chaos``, ``race_retries_against_deletes``,
  ``race_completed_against_failed``, ``race_idempotent_creations``. They send
  requests and return what they saw; the checks of what they saw are the
  ``*_problems`` functions (and ``wrong_*_answers``), and the tests assert
  that there are none.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg2

from dev.gunicorn import Call

from support.oracle import ACTIVE, LEGAL_MOVES, REPORTABLE, TERMINAL, WORKER_MOVES, history_problems
from support.service import SETUP_PATHS, create_job, events_of, job_statuses, move_to

# ---- Racing requests -------------------------------------------------------------------


def race(make_call: Callable[[], Call], tasks: list[Callable], timeout: float = 60) -> list:
    """Run ``task(call, barrier)`` for each task in its own thread, all released together.

    Returns each task's result, in order. The barrier is passed on so a task can
    meet the others again (lock-step rounds). An exception in a task (or a
    thread still running after ``timeout``) fails the caller.
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


def wait_until_blocked(database_url: str, count: int = 1, timeout: float = 10.0) -> None:
    """Wait until ``count`` of the service's backends wait on a lock."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with conn.cursor() as cur:
                # Only this database's: other pytest-xdist workers may share the server.
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = 'jobs-service' AND wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                )
                if cur.fetchone()[0] >= count:
                    return
            time.sleep(0.01)
        raise AssertionError(f"{count} requests did not block on a lock in {timeout}s")
    finally:
        conn.close()


def reporter(job_id: int, what: str, detail=None):
    """A task reporting ``what`` (or requesting a stop): returns (what, code, body)."""

    def task(call, barrier):
        if what == "stop":
            return what, *call("PUT", f"/jobs/{job_id}/stop")
        return what, *call("PUT", f"/jobs/{job_id}/status", {"status": what, "detail": detail})

    return task


def poster(path: str, payload, tag=None):
    """A task POSTing ``payload``: returns (tag, code, body)."""

    def task(call, barrier):
        return tag, *call("POST", path, payload)

    return task


# ---- The audit trail: every status change, recorded by the database --------------------

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

    def problems(self, call: Call, legal: set = LEGAL_MOVES) -> list[str]:
        """Where the record breaks a rule (none: it keeps them all).

        The rules: every status change a legal move, every deletion of a job that
        was terminal at that instant, nothing after a deletion, a deleted job no
        longer listed, and each remaining job listed with its last status and
        its events exactly its status changes.
        """
        existing = job_statuses(call)
        problems = []
        for job_id, rows in self.history().items():
            problem = self._job_problem(call, job_id, rows, existing, legal)
            if problem:
                problems.append(problem)
        return problems

    @staticmethod
    def _job_problem(
        call: Call, job_id: int, rows: list, existing: dict[int, str], legal: set
    ) -> str | None:
        if rows[0] != ("INSERT", None, "SCHEDULED"):
            return f"job {job_id} was not created SCHEDULED: {rows}"
        status: str | None = "SCHEDULED"
        moves = []
        for op, old, new in rows[1:]:
            if status is None:
                return f"job {job_id} changed after its deletion: {rows}"
            if op not in ("UPDATE", "DELETE") or old != status:
                return f"job {job_id}: inconsistent record {rows}"
            if op == "DELETE":
                if old not in TERMINAL:
                    return f"job {job_id} was deleted while {old}: {rows}"
                status = None
            elif (old, new) not in legal:
                return f"job {job_id}: illegal {old}->{new}: {rows}"
            else:
                moves.append(new)
                status = new
        if status is None:
            return f"job {job_id} was deleted but is listed" if job_id in existing else None
        if existing.get(job_id) != status:
            return f"job {job_id} is listed as {existing.get(job_id)}, was last {status}: {rows}"
        types = [e["event_type"] for e in events_of(call, job_id)]
        if types != ["SCHEDULED", *moves]:
            return f"job {job_id}: events {types} vs status changes {rows}"
        return None


@contextlib.contextmanager
def audit_trail(database_url: str):
    """An ``Audit`` of the test's requests: the trigger exists inside the block only."""
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


# ---- Workload: stops vs status reports vs deletes --------------------------------------


@dataclass
class ChaosRecord:
    """What the clients of ``run_chaos`` sent and saw."""

    initial: dict[int, str] = field(default_factory=dict)  # id -> status set up
    ever_terminal: set[int] = field(default_factory=set)  # set up or reported terminal
    gone: set[int] = field(default_factory=set)  # named by a 204 delete
    answers: list[tuple] = field(default_factory=list)  # (op, target, sent, code, body)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, op: str, target, sent, code: int, body) -> None:
        with self.lock:
            self.answers.append((op, target, sent, code, body))

    def never_terminal(self) -> set[int]:
        return set(self.initial) - self.ever_terminal

    def outcomes(self) -> Counter:
        """How often each (op, status code) was answered."""
        return Counter((op, code) for op, _, _, code, _ in self.answers)


def run_chaos(
    setup_call: Call,
    make_call: Callable[[], Call],
    threads: int = 16,
    rounds: int = 3,
    steps: int = 20,
    per_status: int = 3,
    seed: int = 0,
) -> ChaosRecord:
    """Rounds of ``threads`` clients stopping, reporting and deleting at random, in lock-step.

    Each round sets up ``per_status`` jobs in every status of SETUP_PATHS; every
    step of every thread is a fresh pile-up on those jobs.
    """
    rec = ChaosRecord()
    for r in range(rounds):
        jobs = {}
        for status in SETUP_PATHS:
            for _ in range(per_status):
                job_id = create_job(setup_call)["id"]
                move_to(setup_call, job_id, status)
                jobs[job_id] = status
        rec.initial.update(jobs)
        rec.ever_terminal.update(j for j, s in jobs.items() if s in TERMINAL or s == "RETRIED")
        tasks = [
            _chaos_task(sorted(jobs), rec, steps, seed * 1000 + r * 100 + t) for t in range(threads)
        ]
        race(make_call, tasks)
    return rec


def _chaos_task(job_ids: list[int], rec: ChaosRecord, steps: int, seed: int):
    def task(call, barrier):
        rng = random.Random(seed)
        for _ in range(steps):
            barrier.wait(timeout=30)  # lock-step: every step is a fresh pile-up
            _chaos_step(call, rng, job_ids, rec)

    return task


def _chaos_step(call: Call, rng: random.Random, job_ids: list[int], rec: ChaosRecord) -> None:
    op = rng.choices(
        ["stop", "report", "delete", "bulk_status", "bulk_ids"], weights=[20, 45, 15, 4, 12]
    )[0]
    if op == "stop":
        job_id = rng.choice(job_ids)
        code, body = call(rng.choice(["PUT", "POST"]), f"/jobs/{job_id}/stop")
        rec.note(op, job_id, None, code, body)
    elif op == "report":
        job_id = rng.choice(job_ids)
        to = rng.choice(REPORTABLE)
        if rng.random() < 0.6:
            # An informed worker: read the status, then report a legal next move
            # (which a concurrent request may already have made illegal).
            code, body = call("GET", f"/jobs/{job_id}")
            if code == 200:
                nexts = sorted(WORKER_MOVES[body["status"]])
                to = rng.choice(nexts) if nexts else to
        code, body = call("PUT", f"/jobs/{job_id}/status", {"status": to})
        if code == 200 and to in TERMINAL:
            with rec.lock:
                rec.ever_terminal.add(job_id)
        rec.note(op, job_id, to, code, body)
    elif op == "delete":
        job_id = rng.choice(job_ids)
        code, body = call("DELETE", f"/jobs/{job_id}")
        if code == 204:
            with rec.lock:
                rec.gone.add(job_id)
        rec.note(op, job_id, None, code, body)
    elif op == "bulk_status":
        token = rng.choice(["terminal", "completed", "stopped", "error", "failed", "TERMINAL"])
        code, body = call("DELETE", f"/jobs?status={token}")
        rec.note(op, token, None, code, body)
    else:
        chosen = sorted(rng.sample(job_ids, rng.randint(1, 4)))
        code, body = call("DELETE", "/jobs", {"job_ids": chosen})
        if code == 204:
            with rec.lock:
                rec.gone.update(chosen)
        rec.note(op, tuple(chosen), None, code, body)


def wrong_chaos_answers(rec: ChaosRecord) -> list[tuple]:
    """The answers of ``run_chaos`` that no interleaving allows (none: all allowed).

    - a stop: 200 with the job, no longer SCHEDULED or RUNNING (the stop moved it,
      or a stop cannot move it), or 404 JOB_NOT_FOUND;
    - a status report: 200 with the job in the reported status, 409
      INVALID_STATE_TRANSITION, or 404 JOB_NOT_FOUND;
    - a delete of one job: 204, or 409 JOB_CONFLICT naming an active status;
    - a delete by status: 204;
    - a delete by IDs: 204, or 409 JOB_CONFLICT.
    """
    wrong = []
    for op, target, sent, code, body in rec.answers:
        error = _error_code(body)
        if op == "stop":
            ok = (
                code == 200
                and body["id"] == target
                and body["status"] not in ("SCHEDULED", "RUNNING")
            ) or (code, error) == (404, "JOB_NOT_FOUND")
        elif op == "report":
            ok = (
                (code == 200 and (body["id"], body["status"]) == (target, sent))
                or (code, error) == (409, "INVALID_STATE_TRANSITION")
                or (code, error) == (404, "JOB_NOT_FOUND")
            )
        elif op == "delete":
            ok = code == 204 or (
                (code, error) == (409, "JOB_CONFLICT")
                and any(s in body["error_message"] for s in ACTIVE)
            )
        elif op == "bulk_status":
            ok = code == 204
        else:
            ok = code == 204 or (code, error) == (409, "JOB_CONFLICT")
        if not ok:
            wrong.append((op, target, sent, code, body))
    return wrong


# ---- Workload: a retry (FAILED -> SCHEDULED) vs every kind of delete ---------------------


@dataclass
class RetryRace:
    jobs: list[int]  # the jobs raced for, in order
    retried: set[int]  # the jobs a retry moved back to SCHEDULED (answered 200)
    answers: list[tuple]  # (who, job_id, code, body); who: fail, retry, delete_*


def race_retries_against_deletes(make_call: Callable[[], Call], n_jobs: int = 30) -> RetryRace:
    """Job by job in lock-step: one thread fails the job, then 6 threads retry it while
    12 delete it (by status, by IDs, alone)."""
    setup = make_call()
    jobs = []
    for _ in range(n_jobs):
        job_id = create_job(setup)["id"]
        move_to(setup, job_id, "RUNNING")
        jobs.append(job_id)
    retried: set[int] = set()
    answers: list[tuple] = []
    lock = threading.Lock()

    def note(who, job_id, code, body):
        with lock:
            answers.append((who, job_id, code, body))
            if who == "retry" and code == 200:
                retried.add(job_id)

    def step_through(call, barrier, prepare: bool):
        # Lock-step over the jobs: one turns FAILED, then everyone goes for it.
        for job_id in jobs:
            barrier.wait(timeout=30)
            if prepare:
                note("fail", job_id, *call("PUT", f"/jobs/{job_id}/status", {"status": "FAILED"}))
            barrier.wait(timeout=30)
            yield job_id

    def retrier(prepare: bool = False):
        def task(call, barrier):
            for job_id in step_through(call, barrier, prepare):
                note(
                    "retry", job_id, *call("PUT", f"/jobs/{job_id}/status", {"status": "SCHEDULED"})
                )

        return task

    def deleter(kind, seed):
        def task(call, barrier):
            rng = random.Random(seed)
            for job_id in step_through(call, barrier, False):
                if kind == "status":
                    token = rng.choice(["terminal", "error"])
                    answer = call("DELETE", f"/jobs?status={token}")
                elif kind == "ids":
                    chosen = sorted({job_id, *rng.sample(jobs, rng.randint(0, 2))})
                    answer = call("DELETE", "/jobs", {"job_ids": chosen})
                else:
                    answer = call("DELETE", f"/jobs/{job_id}")
                note(f"delete_{kind}", job_id, *answer)

        return task

    tasks = [retrier(prepare=True)] + [retrier()] * 5
    tasks += [deleter(kind, i) for i, kind in enumerate(["status", "ids", "single"] * 4)]
    race(make_call, tasks)
    return RetryRace(jobs, retried, answers)


def wrong_retry_race_answers(result: RetryRace) -> list[tuple]:
    """Answers no interleaving allows: failing a RUNNING job is 200; a retry is 200
    (SCHEDULED) or 404 (deleted first); a delete by status is 204; by IDs or alone,
    204 or 409."""
    wrong = []
    for who, job_id, code, body in result.answers:
        if who == "fail":
            ok = code == 200
        elif who == "retry":
            ok = (code == 200 and body["status"] == "SCHEDULED") or code == 404
        elif who == "delete_status":
            ok = code == 204
        else:
            ok = code in (204, 409)
        if not ok:
            wrong.append((who, job_id, code, body))
    return wrong


# ---- Workload: two workers, two outcomes -----------------------------------------------


@dataclass
class OneJobRound:
    job_id: int
    answers: list[tuple]  # (what was sent, code, body), one per racing request
    events: list[dict]  # the job's events afterwards
    job: dict | None  # GET /jobs/{id} afterwards


def race_completed_against_failed(make_call: Callable[[], Call], rounds: int) -> list[OneJobRound]:
    """Per round, 8 workers report COMPLETED and 8 FAILED (detail {"w": status}) on one
    RUNNING job."""
    setup = make_call()
    out = []
    for _ in range(rounds):
        job_id = create_job(setup)["id"]
        move_to(setup, job_id, "RUNNING")
        tasks = [reporter(job_id, to, {"w": to}) for to in ["COMPLETED", "FAILED"] * 8]
        answers = race(make_call, tasks)
        out.append(
            OneJobRound(
                job_id, answers, events_of(setup, job_id), setup("GET", f"/jobs/{job_id}")[1]
            )
        )
    return out


# ---- Workload: idempotent creation ------------------------------------------------------


@dataclass
class CreationRound:
    payload: dict  # what all 20 requests sent
    answers: list[tuple]  # (None, code, body), one per request
    events: dict[int, list[dict]]  # the events of each job answered


def race_idempotent_creations(make_call: Callable[[], Call], rounds: int) -> list[CreationRound]:
    """Per round, 20 identical POST /jobs with one idempotency_key at once."""
    setup = make_call()
    out = []
    for n in range(rounds):
        key = f"deploy-{n}-{'k' * n}"
        payload = {"node_id": f"worker-{n}", "descriptor": {"n": n}, "idempotency_key": key}
        answers = race(make_call, [poster("/jobs", payload)] * 20)
        ids = {body["id"] for _, code, body in answers if code in (200, 201)}
        out.append(CreationRound(payload, answers, {i: events_of(setup, i) for i in ids}))
    return out


def illegal_histories(call: Call, statuses: dict[int, str]) -> list[str]:
    """``history_problems`` of each job in ``statuses`` (id -> its current status)."""
    return [
        problem
        for job_id, status in statuses.items()
        for problem in history_problems(job_id, status, events_of(call, job_id))
    ]


def _error_code(body) -> str | None:
    return body.get("error_code") if isinstance(body, dict) else None


# ---- What a race's record must show (used by test_races and test_scaleout) -------------------


def chaos_problems(setup: Call, rec) -> list[str]:
    """Everything wrong with a run_chaos record, beside the answers no interleaving allows:
    an active job deleted, a deleted job still listed, an illegal history, or a run that
    never exercised the guards (only 404s)."""
    existing = job_statuses(setup)
    problems = [f"wrong answer: {wrong}" for wrong in wrong_chaos_answers(rec)]
    problems += [
        f"deleted although never terminal: {j}" for j in rec.never_terminal() - set(existing)
    ]
    problems += [f"still listed after a 204 delete: {j}" for j in rec.gone & set(existing)]
    problems += [f"illegal history: {h}" for h in illegal_histories(setup, existing)]
    outcomes = rec.outcomes()
    for wanted in [("report", 200), ("report", 409), ("delete", 204), ("stop", 200)]:
        if not outcomes[wanted]:
            problems.append(f"never happened: {wanted} (outcomes {dict(outcomes)})")
    return problems


def idempotent_round_problems(round_) -> list[str]:
    """One round of race_idempotent_creations: exactly one 201 and nineteen 200s, all
    answering the same job, as sent, with its one SCHEDULED event."""
    problems = []
    codes = sorted(code for _, code, _ in round_.answers)
    if codes != [200] * 19 + [201]:
        problems.append(f"codes {codes}")
    bodies = [body for _, _, body in round_.answers]
    job = bodies[0]
    if any(body != job for body in bodies):
        problems.append(f"different answers {bodies}")
    sent = round_.payload
    if (job["status"], job["node_id"], job["descriptor"]) != (
        "SCHEDULED",
        sent["node_id"],
        sent["descriptor"],
    ):
        problems.append(f"not the job sent: {job}")
    events = [e["event_type"] for e in round_.events[job["id"]]]
    if events != ["SCHEDULED"]:
        problems.append(f"events {events}")
    return problems


def one_winner_problems(round_) -> list[str]:
    """One round of race_completed_against_failed: exactly one outcome won (200), every
    other report got a 409 naming it, and the job has exactly the winner's event."""
    won = {to for to, code, _ in round_.answers if code == 200}
    if len(won) != 1:
        return [f"winners {sorted(won)}: {round_.answers}"]
    (winner,) = won
    problems = []
    for to, code, body in round_.answers:
        if to == winner and (code, body.get("status")) != (200, winner):
            problems.append(f"the winner's answer {code} {body}")
        elif to != winner and (
            (code, body.get("error_code")) != (409, "INVALID_STATE_TRANSITION")
            or winner not in body["error_message"]
        ):
            problems.append(f"a loser's answer {code} {body}")
    events = [e["event_type"] for e in round_.events]
    if events != ["SCHEDULED", "RUNNING", winner] or round_.events[-1]["detail"] != {"w": winner}:
        problems.append(f"events {round_.events}")
    if round_.job["status"] != winner:
        problems.append(f"job {round_.job}")
    return problems


def retry_race_problems(setup: Call, result) -> list[str]:
    """A race_retries_against_deletes result: both sides won somewhere, no retried
    (active again, for good) job was deleted or left in another status, and the
    histories are legal."""
    existing = job_statuses(setup)
    problems = [f"wrong answer: {wrong}" for wrong in wrong_retry_race_answers(result)]
    if not result.retried:
        problems.append("no retry won against the deletes; the race did not happen")
    if len(result.retried) >= len(result.jobs):
        problems.append("no delete won against the retries")
    problems += [f"a retried job was deleted: {j}" for j in result.retried - set(existing)]
    survivors = set(existing) & set(result.jobs)
    problems += [f"not retried yet not deleted: {j}" for j in survivors - result.retried]
    problems += [
        f"retried job {j} is {existing[j]}"
        for j in result.retried & set(existing)
        if existing[j] != "SCHEDULED"
    ]
    scheduled = {job_id: "SCHEDULED" for job_id in result.retried}
    problems += [f"illegal history: {h}" for h in illegal_histories(setup, scheduled)]
    return problems
