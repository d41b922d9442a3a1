"""jobs.job_json and the prepared statements behind the hot reads.

A job's JSON is rendered by a trigger whenever its row is written, and reads
send it as stored; the list and get queries are prepared once per session.
These tests hold the stored rendering to the columns whatever writes them
(the service, an operator's UPDATE, a bulk load that skips ordinary
triggers), and show the prepared statements survive what a session can lose.
"""

from __future__ import annotations

import json
from datetime import UTC
from pathlib import Path

import psycopg2

from jobs.schemas import JobSchema

from support.oracle import JOB_FIELDS

ROOT = Path(__file__).resolve().parent.parent


def rfc3339(value) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def stored_and_expected(db_conn, job_id: int) -> tuple[dict, dict]:
    with db_conn.cursor() as cur:
        cur.execute(
            f"SELECT job_json, {', '.join(JOB_COLUMNS)} FROM jobs WHERE id = %s",
            (job_id,),
        )
        rendered, *columns = cur.fetchone()
    return json.loads(rendered), expected_json(columns)


# Every field of the job's JSON is a column of the same name.
JOB_COLUMNS = JOB_FIELDS


def expected_json(columns) -> dict:
    expected = dict(zip(JOB_COLUMNS, columns, strict=True))
    for key in ("created_at", "updated_at", "retry_at"):
        if expected[key] is not None:
            expected[key] = rfc3339(expected[key])
    return expected


def test_rendering_follows_every_write_of_the_service(client, db_conn):
    job = client.post("/jobs", json={"node_id": "w-1", "descriptor": {"a": [1, 2]}}).get_json()
    moves = [("RUNNING", {}), ("FAILED", {}), ("SCHEDULED", {"node_id": "w-2"}), ("RUNNING", {})]
    for status, extra in moves:
        response = client.put(f"/jobs/{job['id']}/status", json={"status": status, **extra})
        assert response.status_code == 200
        stored, expected = stored_and_expected(db_conn, job["id"])
        assert stored == expected
        assert stored["status"] == status
        assert JobSchema().validate(stored) == {}
        assert client.get(f"/jobs/{job['id']}").get_json() == expected
    assert stored["node_id"] == "w-2"
    stopped = client.put(f"/jobs/{job['id']}/stop").get_json()
    assert stopped == stored_and_expected(db_conn, job["id"])[1]
    assert stopped["status"] == "STOP_REQUESTED"


def test_zero_microseconds_still_show_six_digits(client, db_conn):
    job = client.post("/jobs", json={"node_id": "w-1", "descriptor": {}}).get_json()
    with db_conn, db_conn.cursor() as cur:
        cur.execute(
            "UPDATE jobs SET updated_at = timestamptz '2026-11-28 11:42:56+00' WHERE id = %s",
            (job["id"],),
        )
    assert client.get(f"/jobs/{job['id']}").get_json()["updated_at"] == (
        "2026-11-28T11:42:56.000000Z"
    )


def test_an_operators_direct_update_is_rendered_too(client, db_conn):
    job = client.post("/jobs", json={"node_id": "w-1", "descriptor": {"x": 1}}).get_json()
    with db_conn, db_conn.cursor() as cur:
        cur.execute(
            "UPDATE jobs SET descriptor = '{\"x\": 2}', node_id = 'fixed' WHERE id = %s",
            (job["id"],),
        )
    got = client.get(f"/jobs/{job['id']}").get_json()
    assert (got["descriptor"], got["node_id"]) == ({"x": 2}, "fixed")
    listed = client.get("/jobs?status=all").get_json()["jobs"]
    assert [j["descriptor"] for j in listed if j["id"] == job["id"]] == [{"x": 2}]


def test_a_bulk_load_that_skips_ordinary_triggers_is_rendered(client, db_conn):
    # session_replication_role = replica is how restores and seeding skip
    # foreign-key checks; the rendering trigger is ENABLE ALWAYS.
    with db_conn, db_conn.cursor() as cur:
        cur.execute("SET LOCAL session_replication_role = replica")
        cur.execute(
            "INSERT INTO jobs (node_id, status, descriptor) VALUES ('bulk', 'RUNNING', '{}')"
            " RETURNING id"
        )
        job_id = cur.fetchone()[0]
    stored, expected = stored_and_expected(db_conn, job_id)
    assert stored == expected


def test_every_page_size_gives_the_same_pages(client):
    """Some page sizes run a prepared statement and the others plain SQL (the service
    chooses which); every size from 1 to 1000 is tried, so both kinds are, whichever."""
    for _ in range(3):
        client.post("/jobs", json={"node_id": "w", "descriptor": {}})
    for limit in range(1, 1001):
        body = client.get(f"/jobs?limit={limit}&status=all").get_json()
        assert [j["id"] for j in body["jobs"]] == [3, 2, 1][:limit], limit
        assert body["next_cursor"] == (body["jobs"][-1]["id"] if limit < 3 else None), limit


def test_a_session_that_lost_its_prepared_statements_prepares_again(app, client):
    job = client.post("/jobs", json={"node_id": "w", "descriptor": {}}).get_json()
    assert client.get(f"/jobs/{job['id']}").status_code == 200
    assert client.get("/jobs").status_code == 200
    # A new connection (after an outage, or a recycled one) starts with none.
    pool = app.extensions["jobs_db_pool"]
    pool.drop_idle()
    assert client.get(f"/jobs/{job['id']}").get_json() == job
    assert client.get("/jobs").get_json()["jobs"] == [job]
    with app.app_context():
        conn = pool.getconn()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT name FROM pg_prepared_statements ORDER BY name")
                names = [row[0] for row in cur.fetchall()]
            assert names == sorted(conn.prepared) and "get_job" in names
            with conn.cursor() as cur:
                cur.execute("SHOW plan_cache_mode")
                assert cur.fetchone()[0] == "force_generic_plan"
        finally:
            pool.putconn(conn)


def test_init_db_adds_job_json_to_a_database_made_before_it(database_url):
    """A jobs table as it was before job_json (in a schema of its own) is brought up to date."""
    schema = "jobs_before_job_json"
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            cur.execute(f"CREATE SCHEMA {schema}")
            cur.execute(f"SET search_path = {schema}")
            cur.execute(
                """
                CREATE TABLE jobs (
                    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                    created_at timestamptz NOT NULL DEFAULT now(),
                    updated_at timestamptz NOT NULL DEFAULT now(),
                    node_id text NOT NULL,
                    status text NOT NULL DEFAULT 'SCHEDULED',
                    descriptor jsonb NOT NULL DEFAULT '{}'::jsonb,
                    idempotency_key text UNIQUE
                );
                INSERT INTO jobs (node_id, status, descriptor)
                VALUES ('old-1', 'RUNNING', '{"a": 1}'), ('old-2', 'FAILED', '{}');
                """
            )
            for _ in range(2):  # every deploy runs it: the second run changes nothing
                cur.execute((ROOT / "schema.sql").read_text())
            cur.execute(
                "SELECT attnotnull FROM pg_attribute"
                " WHERE attrelid = 'jobs'::regclass AND attname = 'job_json'"
            )
            assert cur.fetchone() == (True,)
            cur.execute("UPDATE jobs SET status = 'SCHEDULED' WHERE node_id = 'old-2'")
            cur.execute("INSERT INTO jobs (node_id) VALUES ('new-3')")
            cur.execute(f"SELECT job_json, {', '.join(JOB_COLUMNS)} FROM jobs ORDER BY id")
            rows = cur.fetchall()
        assert len(rows) == 3
        for rendered, *columns in rows:
            assert json.loads(rendered) == expected_json(columns)
            # Jobs made before attempts are on their first, of one.
            assert (json.loads(rendered)["attempt"], json.loads(rendered)["max_attempts"]) == (1, 1)
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.close()
