"""Attempts and fencing (docs/API.md, "Attempts and retries"): every job's attempt,
max_attempts and retry_at; reports and file registrations that name their worker
and attempt, refused as STALE_ATTEMPT when either is not the job's; the leases a
heartbeat hands out; files replaced by a later attempt; the lease sweep's guard
on what it read; bad input; and init-db bringing a database made before
attempts up to date.

The two holes measured on the version before fencing are replayed step by
step: a worker starting a job an operator had moved to another worker, and a
worker whose lease expired reporting into the job's next attempt elsewhere.
"""

from __future__ import annotations

import json
import threading
from urllib.parse import quote

import psycopg2
import pytest

from app import create_app
from jobs.store import jobs as job_store

from support.databases import init_db, lose_worker
from support.oracle import (
    LEASE_MOVES,
    LEGAL_MOVES,
    expected_progress,
    history_problems,
    reference_progress,
)
from support.races import audit_trail, race, wait_until_blocked
from support.retrying import (
    leases_of,
    make_due,
    register,
    register_files_as,
    report,
    rows_of,
    sweep_retries,
)
from support.service import (
    assert_error,
    create_job,
    events_of,
    file_entry,
    flask_caller,
    metric_samples,
    metric_value,
    move_to,
    sweep_leases,
)

ALL_MOVES = LEGAL_MOVES | LEASE_MOVES | {("SCHEDULED", "SCHEDULED")}


@pytest.fixture
def call(app):
    return flask_caller(app)


def get(call, job_id: int) -> dict:
    code, job = call("GET", f"/jobs/{job_id}")
    assert code == 200, job
    return job


def stale(answer, node_id: str, attempt: int) -> None:
    """A 409 STALE_ATTEMPT whose message names the job's node and attempt."""
    code, body = answer
    assert (code, body["error_code"]) == (409, "STALE_ATTEMPT"), body
    assert f"'{node_id}'" in body["error_message"], body
    assert f"attempt {attempt}" in body["error_message"], body


def ok(answer) -> dict:
    code, body = answer
    assert code in (200, 201), body
    return body


# ---- The job's fields ------------------------------------------------------------------------


def test_every_route_that_returns_a_job_shows_its_attempts(app, call):
    job = create_job(call, "w-1")
    assert (job["attempt"], job["max_attempts"], job["retry_at"]) == (1, 1, None)
    three = create_job(call, "w-1", max_attempts=3)
    assert three["max_attempts"] == 3
    # GET, the list, a report, a stop: the same fields.
    assert get(call, three["id"]) == three
    code, listing = call("GET", "/jobs?status=all")
    assert [j["max_attempts"] for j in listing["jobs"]] == [3, 1]
    running = ok(report(call, three["id"], "RUNNING"))
    assert (running["attempt"], running["max_attempts"], running["retry_at"]) == (1, 3, None)
    stopped = ok(call("PUT", f"/jobs/{job['id']}/stop"))
    assert (stopped["attempt"], stopped["retry_at"]) == (1, None)
    # The idempotent repeat returns the job as created, whatever it says now.
    keyed_body = {"node_id": "w-1", "idempotency_key": "k", "max_attempts": 5}
    code, keyed = call("POST", "/jobs", keyed_body)
    assert (code, keyed["max_attempts"]) == (201, 5)
    assert call("POST", "/jobs", {"node_id": "w-1", "idempotency_key": "k"}) == (200, keyed)


def test_the_default_max_attempts_is_the_setting(database_url):
    app = create_app({"TESTING": True, "DATABASE_URL": database_url, "JOB_MAX_ATTEMPTS": 4})
    try:
        call = flask_caller(app)
        assert create_job(call)["max_attempts"] == 4
        assert create_job(call, max_attempts=1)["max_attempts"] == 1
    finally:
        app.extensions.get("jobs_db_pool") and app.extensions["jobs_db_pool"].drop_idle()


def test_only_a_retry_starts_the_next_attempt(call):
    job = create_job(call, "w-1")
    # A move to another node keeps the attempt.
    moved = ok(report(call, job["id"], "SCHEDULED", "w-2"))
    assert (moved["node_id"], moved["attempt"]) == ("w-2", 1)
    ok(report(call, job["id"], "RUNNING"))
    ok(report(call, job["id"], "FAILED"))
    retried = ok(report(call, job["id"], "SCHEDULED"))
    assert (retried["status"], retried["attempt"], retried["node_id"]) == ("SCHEDULED", 2, "w-2")
    ok(report(call, job["id"], "FAILED"))
    assert ok(report(call, job["id"], "SCHEDULED", "w-3"))["attempt"] == 3


# ---- Hole 1: a moved job started by the worker that lost it ----------------------------------


def test_a_moved_job_cannot_be_started_by_the_worker_that_lost_it(call):
    register(call, "A")
    register(call, "B")
    job_id = create_job(call, "A")["id"]
    assert leases_of(call, "A") == {job_id: 1}  # A hears of the job
    moved = ok(report(call, job_id, "SCHEDULED", "B"))  # an operator moves it to B
    assert moved["node_id"] == "B"
    assert leases_of(call, "A") == {}
    events = len(events_of(call, job_id))
    # A starts it anyway, with its lease: refused, nothing changes.
    stale(report(call, job_id, "RUNNING", "A", 1), "B", 1)
    assert get(call, job_id) == moved
    assert len(events_of(call, job_id)) == events
    # B, whose heartbeat lists it, starts it.
    assert leases_of(call, "B") == {job_id: 1}
    assert ok(report(call, job_id, "RUNNING", "B", 1))["status"] == "RUNNING"
    # A's repeat of RUNNING is not a silent no-op either: the job is B's.
    stale(report(call, job_id, "RUNNING", "A", 1), "B", 1)
    assert [e["event_type"] for e in events_of(call, job_id)] == [
        "SCHEDULED",
        "SCHEDULED",
        "RUNNING",
    ]


def test_two_workers_starting_one_job_have_exactly_one_winner(app, database_url):
    setup = flask_caller(app)
    register(setup, "A")
    register(setup, "B")
    with audit_trail(database_url) as audit:
        for round_ in range(6):
            # B's job; A heard of it before it was moved, or is simply wrong.
            job_id = create_job(setup, "B")["id"]
            answers = race(
                lambda: flask_caller(app),
                [
                    lambda c, b, node=node, job_id=job_id: (
                        node,
                        *report(c, job_id, "RUNNING", node, 1),
                    )
                    for node in ("A", "B") * 3
                ],
            )
            by_node = {node: {code for n, code, _ in answers if n == node} for node in "AB"}
            assert by_node["A"] == {409}, (round_, answers)  # always stale
            assert by_node["B"] == {200}, (round_, answers)  # one moved it, the others no-ops
            assert [e["event_type"] for e in events_of(setup, job_id)] == ["SCHEDULED", "RUNNING"]
        assert audit.problems(setup) == []


# ---- Hole 2: a dead worker's late results in another worker's run ----------------------------


def test_a_dead_workers_late_results_never_land_in_the_next_attempt(app, call, database_url):
    register(call, "A")
    register(call, "B")
    job_id = create_job(call, "A", max_attempts=2)["id"]
    assert leases_of(call, "A") == {job_id: 1}
    ok(report(call, job_id, "RUNNING", "A", 1))
    ok(register_files_as(call, job_id, "blocks", file_entry("blocks_000.parquet", 0, 999), "A", 1))
    # A's lease expires, and the job is retried on B.
    lose_worker(database_url, "A")
    assert sweep_leases(app) == {"FAILED": 1}
    make_due(database_url, job_id)
    assert sweep_retries(app) == (1, 1)
    assert leases_of(call, "B") == {job_id: 2}
    ok(report(call, job_id, "RUNNING", "B", 2))
    b_files = [file_entry("blocks_001.parquet", 1000, 1999)]
    progress = ok(register_files_as(call, job_id, "blocks", b_files, "B", 2))["progress"]
    assert progress == expected_progress(0, 1999, 2, 2)
    before = rows_of_job(database_url)

    # A comes back. Its file covering blocks 0-5,000,000 is refused and B's
    # progress does not move.
    big = file_entry("blocks_all.parquet", 0, 5_000_000, size=10**9)
    stale(register_files_as(call, job_id, "blocks", big, "A", 1), "B", 2)
    stale(register_files_as(call, job_id, "blocks", big, "A"), "B", 2)
    stale(register_files_as(call, job_id, "blocks", big, None, 1), "B", 2)
    # Its COMPLETED is refused: no status, no event credited to B.
    stale(report(call, job_id, "COMPLETED", "A", 1), "B", 2)
    assert rows_of_job(database_url) == before

    # B's own registrations and its COMPLETED go through.
    more = ok(register_files_as(call, job_id, "blocks", file_entry("b_002", 2000, 2999), "B", 2))
    assert more["registered"] == 1 and more["progress"]["current_block"] == 2999
    done = ok(report(call, job_id, "COMPLETED", "B", 2))
    assert (done["status"], done["node_id"], done["attempt"]) == ("COMPLETED", "B", 2)
    assert [(e["event_type"], e["node_id"]) for e in events_of(call, job_id)][-2:] == [
        ("RUNNING", "B"),
        ("COMPLETED", "B"),
    ]


def rows_of_job(database_url):
    conn = psycopg2.connect(database_url)
    try:
        return rows_of(conn)
    finally:
        conn.close()


def test_a_retried_jobs_stale_reports_are_all_refused(call):
    job_id = create_job(call, "w")["id"]
    ok(report(call, job_id, "RUNNING", "w", 1))
    ok(report(call, job_id, "FAILED", "w", 1))
    ok(report(call, job_id, "SCHEDULED"))  # an operator's retry: attempt 2
    for status in ("RUNNING", "COMPLETED", "FAILED", "SCHEDULED", "STOPPING"):
        stale(report(call, job_id, status, "w", 1), "w", 2)
    stale(register_files_as(call, job_id, "t", file_entry("f", 0, 9), "w", 1), "w", 2)
    assert get(call, job_id)["status"] == "SCHEDULED"
    # The current attempt's reports work, and so do unfenced ones, as before.
    ok(report(call, job_id, "RUNNING", "w", 2))
    ok(report(call, job_id, "RUNNING"))
    assert (
        ok(register_files_as(call, job_id, "t", file_entry("f", 0, 9), "w", 2))["registered"] == 1
    )


# ---- The order of the checks -----------------------------------------------------------------


def test_the_fence_comes_before_every_other_answer(call):
    job_id = create_job(call, "w")["id"]
    ok(report(call, job_id, "RUNNING"))
    ok(register_files_as(call, job_id, "t", file_entry("f", 0, 9)))
    # The job's own status (a no-op otherwise): stale.
    stale(report(call, job_id, "RUNNING", "x"), "w", 1)
    # An illegal move (INVALID_STATE_TRANSITION otherwise): stale.
    stale(report(call, job_id, "STOPPED", None, 7), "w", 1)
    # A file conflict (FILE_CONFLICT otherwise): stale.
    stale(register_files_as(call, job_id, "t", file_entry("f", 0, 19), "x"), "w", 1)
    ok(report(call, job_id, "COMPLETED"))
    # A terminal job (JOB_CONFLICT otherwise): stale.
    stale(register_files_as(call, job_id, "t", file_entry("g", 10, 19), None, 2), "w", 1)
    # The job's own worker and attempt get the usual answers.
    code, body = report(call, job_id, "RUNNING", "w", 1)
    assert (code, body["error_code"]) == (409, "INVALID_STATE_TRANSITION")
    code, body = register_files_as(call, job_id, "t", file_entry("g", 10, 19), "w", 1)
    assert (code, body["error_code"]) == (409, "JOB_CONFLICT")
    # A job that does not exist is still a 404.
    code, body = report(call, 999, "RUNNING", "w", 1)
    assert (code, body["error_code"]) == (404, "JOB_NOT_FOUND")


def test_a_stale_report_changes_nothing(call, db_conn):
    job_id = create_job(call, "w", max_attempts=3)["id"]
    ok(report(call, job_id, "RUNNING"))
    ok(register_files_as(call, job_id, "t", file_entry("f", 0, 9)))
    before = rows_of(db_conn)
    for answer in (
        report(call, job_id, "FAILED", "w", 2, detail={"e": 1}),
        report(call, job_id, "COMPLETED", "v"),
        report(call, job_id, "FAILED", "v", 1, retryable=False),
        register_files_as(call, job_id, "t", file_entry("f", 0, 99), "w", 3),
        register_files_as(call, job_id, "u", [file_entry("g", 0, 9)], "v", 1),
    ):
        assert answer[1]["error_code"] == "STALE_ATTEMPT"
    assert rows_of(db_conn) == before


def test_stale_reports_are_counted(app, call):
    job_id = create_job(call, "w")["id"]
    before = metric_samples(app.test_client())
    stale(report(call, job_id, "RUNNING", "v"), "w", 1)
    stale(register_files_as(call, job_id, "t", file_entry("f", 0, 9), "v"), "w", 1)
    stale(register_files_as(call, job_id, "t", file_entry("f", 0, 9), None, 4), "w", 1)
    after = metric_samples(app.test_client())

    def grew(kind):
        name = "jobs_stale_reports_total"
        return metric_value(after, name, report=kind) - metric_value(before, name, report=kind)

    assert (grew("status"), grew("files")) == (1, 2)


# ---- Racing stale and current reports --------------------------------------------------------


def reporter_task(job_id: int, who: str, status: str, attempt: int):
    def task(call, barrier):
        return (who, *report(call, job_id, status, "w", attempt))

    return task


def test_racing_stale_and_current_reports_have_one_winner_and_one_event(app, database_url):
    setup = flask_caller(app)
    with audit_trail(database_url) as audit:
        for _ in range(5):
            job_id = create_job(setup, "w")["id"]
            for status in ("RUNNING", "FAILED", "SCHEDULED", "RUNNING"):
                ok(report(setup, job_id, status))  # now attempt 2, RUNNING
            tasks = [
                reporter_task(job_id, who, status, attempt)
                for who, attempt in (("stale", 1), ("current", 2))
                for status in ("COMPLETED", "FAILED")
            ]
            answers = race(lambda: flask_caller(app), tasks)
            won = [(who, body["status"]) for who, code, body in answers if code == 200]
            assert len(won) == 1 and won[0][0] == "current", answers
            for who, code, body in answers:
                if who == "stale":
                    assert (code, body["error_code"]) == (409, "STALE_ATTEMPT"), answers
                elif code != 200:
                    assert body["error_code"] == "INVALID_STATE_TRANSITION", answers
            job = get(setup, job_id)
            assert job["status"] == won[0][1]
            types = [e["event_type"] for e in events_of(setup, job_id)]
            assert types[-2:] == ["RUNNING", won[0][1]]
            assert history_problems(job_id, job["status"], events_of(setup, job_id)) == []
        assert audit.problems(setup) == []


# ---- Leases in the heartbeat -----------------------------------------------------------------


def test_the_heartbeat_lists_every_active_job_with_its_attempt(call):
    register(call, "w")
    ids = {}
    for status in ("SCHEDULED", "RUNNING", "STOP_REQUESTED", "STOPPING", "COMPLETED", "STOPPED"):
        ids[status] = create_job(call, "w")["id"]
        move_to(call, ids[status], status)
    ids["FAILED"] = create_job(call, "w")["id"]
    move_to(call, ids["FAILED"], "FAILED")
    retried = create_job(call, "w")["id"]
    move_to(call, retried, "RETRIED")  # FAILED, then SCHEDULED again: attempt 2
    create_job(call, "other")
    code, beat = call("POST", "/workers/w/heartbeat")
    assert code == 200
    active = ("SCHEDULED", "RUNNING", "STOP_REQUESTED", "STOPPING")
    assert beat["leases"] == sorted(
        [{"job_id": ids[s], "attempt": 1, "status": s} for s in active]
        + [{"job_id": retried, "attempt": 2, "status": "SCHEDULED"}],
        key=lambda lease: lease["job_id"],
    )
    assert beat["scheduled"] == [ids["SCHEDULED"], retried]


def test_the_leases_are_at_most_1000_oldest_first(call, db_conn):
    register(call, "busy")
    with db_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO jobs (node_id, status, attempt) SELECT 'busy', s, 1 + g % 3"
            " FROM generate_series(1, 400) g,"
            " unnest(ARRAY['SCHEDULED', 'RUNNING', 'STOPPING', 'COMPLETED']) s"
        )
        cur.execute(
            "SELECT id, attempt, status FROM jobs WHERE node_id = 'busy'"
            " AND status <> 'COMPLETED' ORDER BY id LIMIT 1000"
        )
        expected = [{"job_id": i, "attempt": a, "status": s} for i, a, s in cur.fetchall()]
    code, beat = call("POST", "/workers/busy/heartbeat")
    assert code == 200
    assert len(beat["leases"]) == 1000
    assert beat["leases"] == expected


# ---- Files across attempts -------------------------------------------------------------------


def test_a_later_attempt_replaces_an_earlier_attempts_files(call):
    job_id = create_job(call, "w", max_attempts=3)["id"]
    ok(report(call, job_id, "RUNNING", "w", 1))
    first = [
        file_entry("blocks_000.parquet", 0, 999, 10),
        file_entry("blocks_001.parquet", 1000, 1999, 10),
        file_entry("blocks_002.parquet", 2000, 2999, 10),
    ]
    ok(register_files_as(call, job_id, "blocks", first, "w", 1))
    # Within the attempt, another blocks_000.parquet is a conflict.
    code, body = register_files_as(
        call, job_id, "blocks", file_entry("blocks_000.parquet", 0, 499, 5), "w", 1
    )
    assert (code, body["error_code"]) == (409, "FILE_CONFLICT")
    ok(report(call, job_id, "FAILED", "w", 1))
    ok(report(call, job_id, "SCHEDULED"))
    ok(report(call, job_id, "RUNNING", "w", 2))

    # Attempt 2 rewrites blocks_000.parquet with a shorter range: it replaces
    # the old entry, and the chain is the one the files now make (blocks_001
    # no longer links: a gap after 499).
    rewritten = file_entry("blocks_000.parquet", 0, 499, 5)
    answer = ok(register_files_as(call, job_id, "blocks", rewritten, "w", 2))
    assert answer["registered"] == 1 and answer["unchanged"] == 0
    files = [*first[1:], rewritten]  # in registration order: the replacement is the newest
    assert answer["progress"] == reference_progress(files) == expected_progress(0, 499, 1, 5)
    # Then the attempt fills the gap: the chain runs on through the old files.
    gap = file_entry("blocks_000b.parquet", 500, 999, 5)
    answer = ok(register_files_as(call, job_id, "blocks", gap, "w", 2))
    files.append(gap)
    assert answer["progress"] == reference_progress(files) == expected_progress(0, 2999, 4, 30)
    # Within attempt 2 the rewritten file is fixed again.
    code, body = register_files_as(
        call, job_id, "blocks", file_entry("blocks_000.parquet", 0, 999, 10), "w", 2
    )
    assert (code, body["error_code"]) == (409, "FILE_CONFLICT")
    # An earlier attempt's file registered again identically is unchanged,
    # and belongs to attempt 2 from then on: changing it now is a conflict.
    again = ok(register_files_as(call, job_id, "blocks", first[2], "w", 2))
    assert (again["registered"], again["unchanged"]) == (0, 1)
    changed = {**first[2], "size_bytes": 11}
    code, body = register_files_as(call, job_id, "blocks", changed, "w", 2)
    assert (code, body["error_code"]) == (409, "FILE_CONFLICT")
    code, progress = call("GET", f"/jobs/{job_id}/progress")
    assert progress["tables"]["blocks"] == reference_progress(files)


def test_a_replacement_batch_is_all_or_nothing(call, db_conn):
    job_id = create_job(call, "w")["id"]
    ok(register_files_as(call, job_id, "t", [file_entry("a", 0, 9), file_entry("b", 10, 19)]))
    ok(report(call, job_id, "FAILED"))
    ok(report(call, job_id, "SCHEDULED"))
    ok(register_files_as(call, job_id, "t", file_entry("c", 20, 29)))  # attempt 2's
    before = rows_of(db_conn)
    # a would be replaced, but c is this attempt's: nothing of the batch is stored.
    batch = [file_entry("a", 0, 4), file_entry("new", 30, 39), file_entry("c", 20, 25)]
    code, body = register_files_as(call, job_id, "t", batch)
    assert (code, body["error_code"]) == (409, "FILE_CONFLICT")
    assert "'c'" in body["error_message"]
    assert rows_of(db_conn) == before


def test_replacements_keep_the_chain_exact(call):
    """Many rewrites across attempts, each checked against the chain recomputed from
    the definition with the files as they are after it."""
    job_id = create_job(call, "w")["id"]
    files: dict[str, dict] = {}
    order: list[str] = []  # registration order, a replacement moving to the end
    ranges = [(0, 99), (100, 199), (200, 299), (300, 399), (100, 149), (150, 199), (0, 49)]
    for attempt in range(1, 5):
        for i, (start, end) in enumerate(ranges):
            if (i + attempt) % 3 == 0:
                continue
            name = f"f{i}"
            shrink = (attempt * 7 + i) % 3
            entry = file_entry(name, start, max(start, end - shrink * 10), size=attempt + i)
            answer = ok(register_files_as(call, job_id, "t", entry, "w", attempt))
            if files.get(name) != entry:
                order = [n for n in order if n != name] + [name]
                files[name] = entry
            assert answer["progress"] == reference_progress([files[n] for n in order]), (
                attempt,
                name,
            )
        ok(report(call, job_id, "FAILED"))
        ok(report(call, job_id, "SCHEDULED"))


# ---- The lease sweep's guard -----------------------------------------------------------------


def test_the_lease_sweep_never_expires_a_job_retried_after_it_looked(app, call, database_url):
    """The sweep reads RUNNING attempt 1; before it can lock the job, the job fails and
    is retried and started again on the same worker (attempt 2, RUNNING): the
    sweep must leave that attempt alone."""
    register(call, "w")
    job_id = create_job(call, "w")["id"]
    ok(report(call, job_id, "RUNNING"))
    lose_worker(database_url, "w")
    conn = psycopg2.connect(database_url)
    result = {}
    try:
        with conn.cursor() as cur:  # the retry, caught before its commit
            for status in ("FAILED", "SCHEDULED", "RUNNING"):
                outcome = job_store.change_status(cur, job_id, status)
                assert isinstance(outcome, job_store.Moved), outcome
        thread = threading.Thread(
            target=lambda: result.setdefault("moved", sweep_leases(app)), daemon=True
        )
        thread.start()
        wait_until_blocked(database_url)
        conn.commit()
        thread.join(10)
    finally:
        conn.close()
    assert result["moved"] == {}
    job = get(call, job_id)
    assert (job["status"], job["attempt"]) == ("RUNNING", 2)
    # Its own lease still expires, at the next sweep.
    assert sweep_leases(app) == {"FAILED": 1}


# ---- Bad input -------------------------------------------------------------------------------

ATTEMPTS_BAD = [None, "1", "", 1.0, 1.5, True, False, 0, -1, 2**63, [], {}, [1]]


@pytest.mark.parametrize("value", ATTEMPTS_BAD, ids=repr)
def test_a_malformed_attempt_is_refused_naming_it(call, db_conn, value):
    job_id = create_job(call, "w")["id"]
    before = rows_of(db_conn)
    for status in ("RUNNING", "FAILED", "SCHEDULED"):
        code, body = call("PUT", f"/jobs/{job_id}/status", {"status": status, "attempt": value})
        assert (code, body["error_code"]) == (400, "INVALID_PAYLOAD_FORMAT"), body
        assert body["error_message"].startswith("attempt:"), body
    assert rows_of(db_conn) == before


def test_an_attempt_is_given_as_a_json_integer(app, db_conn):
    # 1.0 and "1" are not integers on the wire; exponent forms are floats.
    client = app.test_client()
    job_id = create_job(flask_caller(app), "w")["id"]
    before = rows_of(db_conn)
    for raw in (b'{"status": "RUNNING", "attempt": 1.0}', b'{"status": "RUNNING", "attempt": 1e0}'):
        response = client.put(f"/jobs/{job_id}/status", data=raw)
        assert "attempt" in assert_error(response, 400, "INVALID_PAYLOAD_FORMAT")
    assert rows_of(db_conn) == before
    response = client.put(f"/jobs/{job_id}/status", data=b'{"status": "RUNNING", "attempt": 1}')
    assert response.status_code == 200


@pytest.mark.parametrize("value", [None, 0, 101, -1, "3", 1.5, 3.0, True, [], {}], ids=repr)
def test_a_malformed_max_attempts_is_refused_naming_it(call, db_conn, value):
    before = rows_of(db_conn)
    code, body = call("POST", "/jobs", {"node_id": "w", "max_attempts": value})
    assert (code, body["error_code"]) == (400, "INVALID_PAYLOAD_FORMAT"), body
    assert body["error_message"].startswith("max_attempts:"), body
    assert rows_of(db_conn) == before


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("attempt=0", "attempt"),
        ("attempt=-1", "attempt"),
        ("attempt=%2B1", "attempt"),
        ("attempt=01", "attempt"),
        ("attempt=1.5", "attempt"),
        ("attempt=1e3", "attempt"),
        ("attempt=abc", "attempt"),
        ("attempt=", "attempt"),
        ("attempt=%201", "attempt"),
        ("attempt=99999999999999999999", "attempt"),
        ("attempt=" + "9" * 1000, "attempt"),
        ("node_id=1bad", "node_id"),
        ("node_id=", "node_id"),
        ("node_id=" + "a" * 129, "node_id"),
        ("node_id=" + quote("a b"), "node_id"),
        ("node_id=w&node_id=w", "node_id"),
        ("attempt=1&attempt=1", "attempt"),
        ("atempt=1", "atempt"),
    ],
)
def test_malformed_registration_parameters_are_refused_naming_them(call, db_conn, query, name):
    job_id = create_job(call, "w")["id"]
    before = rows_of(db_conn)
    code, body = call("POST", f"/jobs/{job_id}/tables/t/files?{query}", file_entry("f", 0, 9))
    assert (code, body["error_code"]) == (400, "INVALID_QUERY_PARAMETERS"), body
    assert name in body["error_message"], body
    assert rows_of(db_conn) == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        *[
            ({"status": s, "retryable": False}, "retryable")
            for s in ("RUNNING", "COMPLETED", "STOPPING", "STOPPED", "SCHEDULED")
        ],
        ({"status": "RUNNING", "retryable": True}, "retryable"),
        *[
            ({"status": "FAILED", "retryable": v}, "retryable")
            for v in (None, "false", 0, 1, "yes", [], {})
        ],
        ({"status": "FAILED", "node_id": "1bad"}, "node_id"),
    ],
    ids=repr,
)
def test_malformed_report_fields_are_refused_naming_them(call, db_conn, body, field):
    job_id = create_job(call, "w")["id"]
    before = rows_of(db_conn)
    code, answer = call("PUT", f"/jobs/{job_id}/status", body)
    assert (code, answer["error_code"]) == (400, "INVALID_PAYLOAD_FORMAT"), answer
    assert answer["error_message"].startswith(f"{field}:"), answer
    assert rows_of(db_conn) == before


# ---- init-db on a database made before attempts ----------------------------------------------

# The jobs table, its rendering and a few rows as the version before attempts
# made them (schema.sql of that version, abridged to what attempts touch).
BEFORE_ATTEMPTS = """
CREATE TABLE jobs (
    id              bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    node_id         text        NOT NULL,
    status          text        NOT NULL DEFAULT 'SCHEDULED',
    descriptor      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    idempotency_key text UNIQUE,
    job_json        text        NOT NULL
);
CREATE FUNCTION jobs_render_json() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.job_json := json_build_object('id', NEW.id, 'node_id', NEW.node_id,
                                      'status', NEW.status, 'descriptor', NEW.descriptor)::text;
    RETURN NEW;
END $$;
CREATE TRIGGER jobs_render_json BEFORE INSERT OR UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_render_json();
CREATE TABLE job_tables (
    job_id bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    table_name text NOT NULL,
    start_block bigint, current_block bigint, tip_hash text,
    files_count bigint NOT NULL DEFAULT 0, total_size_bytes numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, table_name)
);
CREATE TABLE job_files (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id bigint NOT NULL, table_name text NOT NULL, file_name text NOT NULL,
    start_block bigint NOT NULL, end_block bigint NOT NULL, size_bytes bigint NOT NULL,
    block_hash text, prev_hash text, created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT job_files_table_fk FOREIGN KEY (job_id, table_name)
        REFERENCES job_tables (job_id, table_name) ON DELETE CASCADE,
    CONSTRAINT job_files_name_unique UNIQUE (job_id, table_name, file_name)
);
INSERT INTO jobs (node_id, status, descriptor)
SELECT 'old-' || g, (ARRAY['RUNNING', 'FAILED', 'COMPLETED'])[1 + g % 3], '{"retry_at": 1}'
FROM generate_series(1, 12000) g;
INSERT INTO job_tables (job_id, table_name) VALUES (1, 't');
INSERT INTO job_files (job_id, table_name, file_name, start_block, end_block, size_bytes)
VALUES (1, 't', 'f', 0, 9, 1);
"""


def test_init_db_brings_a_database_made_before_attempts_up_to_date(postgres_url):
    """In a schema of its own (search_path in the URL), init-db upgrades the tables in
    place: every existing job renders attempt 1 of 1, the version before keeps
    writing, and a second run changes nothing."""
    schema = "jobs_before_attempts"
    conn = psycopg2.connect(postgres_url)
    conn.autocommit = True
    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}options=-csearch_path%3D{schema}"
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            cur.execute(f"CREATE SCHEMA {schema}")
            cur.execute(f"SET search_path = {schema}")
            cur.execute(BEFORE_ATTEMPTS)
        init_db(url)
        with conn.cursor() as cur:
            cur.execute("SELECT job_json FROM jobs ORDER BY id")
            jobs = [json.loads(row[0]) for row in cur.fetchall()]
            assert len(jobs) == 12000
            assert all(
                (j["attempt"], j["max_attempts"], j["retry_at"]) == (1, 1, None) for j in jobs
            )
            assert jobs[0]["descriptor"] == {"retry_at": 1}
            cur.execute("SELECT name, done_at IS NOT NULL FROM schema_upgrades")
            assert cur.fetchall() == [("render jobs with attempts", True)]
            cur.execute("SELECT attempt FROM job_files")
            assert cur.fetchall() == [(1,)]
            # What the version before writes (its INSERT and its status guard) is
            # rendered with the new fields too.
            cur.execute("INSERT INTO jobs (node_id, descriptor) VALUES ('old-writer', '{}')")
            cur.execute("UPDATE jobs SET status = 'SCHEDULED' WHERE id = 2")
            cur.execute("SELECT job_json FROM jobs WHERE id = 2 OR node_id = 'old-writer'")
            for (rendered,) in cur.fetchall():
                assert json.loads(rendered)["attempt"] == 1
            cur.execute("SELECT xmin::text FROM jobs ORDER BY id")
            versions = cur.fetchall()
        init_db(url)  # every deploy runs it: nothing is rendered again
        with conn.cursor() as cur:
            cur.execute("SELECT xmin::text FROM jobs ORDER BY id")
            assert cur.fetchall() == versions
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.close()
