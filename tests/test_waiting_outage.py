"""Waiting through a database outage (docs/API.md, Waiting without polling): a waiting
request answers its route's JSON error when the database goes away, waiting resumes
by itself when it returns, and a change made while nothing listened still wakes its
waiter (every waiter checks again once listening resumes).

A throwaway PostgreSQL of this module's own (pg_factory), stopped and started.
"""

from __future__ import annotations

import time

import psycopg2
import pytest

from dev.gunicorn import Server

from support.service import create_job, served_metric
from support.waiting import Background, until, until_requests_wait

# Under pytest-xdist, on one worker: its PostgreSQL and gunicorn are the module's.
pytestmark = pytest.mark.xdist_group("waiting_outage")

GENERIC = "database error; the request was not completed"


@pytest.fixture(scope="module")
def server(pg):
    server = Server(pg.url, workers=1, env={"STATEMENT_TIMEOUT_MS": "500"}).start()
    try:
        yield server
    finally:
        server.stop()
        server.cleanup()


def sql(url: str, statement: str, params=()):
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def test_a_database_restart_during_waits(restart_pg, server):
    pg = restart_pg
    call = server.caller(timeout=30)
    assert call("PUT", "/workers/w-out")[0] == 200
    job_id = create_job(call, "w-other")["id"]
    beat = Background(call, "POST", "/workers/w-out/heartbeat?wait=30")
    events = Background(call, "GET", f"/jobs/{job_id}/events?wait=30")
    until_requests_wait(server, "heartbeat")
    until_requests_wait(server, "events")
    connects = served_metric(server, "jobs_wait_connects_total", mode="listen")

    pg.stop()
    stopped_at = time.monotonic()
    # Each answers its route's JSON error within the usual bounds, not at its timeout.
    assert beat.join() == (500, {"error_code": "WORKER_HEARTBEAT_ERROR", "error_message": GENERIC})
    assert events.join() == (500, {"error_code": "GET_JOB_EVENTS_ERROR", "error_message": GENERIC})
    assert max(beat.answered_at, events.answered_at) - stopped_at < 5
    # A wait that starts meanwhile fails as fast.
    started = time.monotonic()
    assert call("POST", "/workers/w-out/heartbeat?wait=30")[0] == 500
    assert time.monotonic() - started < 5

    pg.start()
    until(lambda: call("GET", "/readyz")[0] == 200, what="readiness")
    # Waiting resumes by itself: a new wait hears of a job created afterwards.
    beat = Background(call, "POST", "/workers/w-out/heartbeat?wait=20")
    until_requests_wait(server, "heartbeat")
    job_id = create_job(call, "w-out")["id"]
    created_at = time.monotonic()
    status, body = beat.join()
    assert (status, body["scheduled"]) == (200, [job_id])
    assert beat.answered_at - created_at < 1.0
    assert served_metric(server, "jobs_wait_connects_total", mode="listen") > connects
    log = server.log()
    assert "Traceback" not in log and "Worker exiting" not in log


def test_a_change_made_while_nothing_listened_still_wakes_its_waiter(pg, server):
    """The listening connection dies; a job is created before it listens again."""
    call = server.caller(timeout=30)
    assert call("PUT", "/workers/w-lost-note")[0] == 200
    beat = Background(call, "POST", "/workers/w-lost-note/heartbeat?wait=20")
    until_requests_wait(server, "heartbeat")
    listening = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
    until(
        lambda: sql(pg.url, listening, ("jobs-service-waiting",))[0][0] == 1,
        what="the listening connection",
    )
    # Gone for good (pg_terminate_backend waits until it is), then the job at once:
    # its NOTIFY reaches nobody.
    sql(
        pg.url,
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
        " WHERE application_name = 'jobs-service-waiting'",
    )
    (job_id,) = sql(
        pg.url,
        """
        WITH job AS (INSERT INTO jobs (node_id) VALUES ('w-lost-note') RETURNING id, node_id)
        INSERT INTO job_events (job_id, event_type, node_id)
        SELECT id, 'SCHEDULED', node_id FROM job RETURNING job_id
        """,
    )[0]
    created_at = time.monotonic()
    status, body = beat.join()
    assert (status, body["scheduled"]) == (200, [job_id])
    assert beat.answered_at - created_at < 2.0  # reconnect (<= 1 s) and a look
