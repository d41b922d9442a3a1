"""Bounded everywhere (docs/API.md, Bounds): what a client can make the service store
or send has a limit, and the limits hold. The bounds of one route are that route's
module's in tests/routes/: a report's ``detail`` (test_put_status.py), a descriptor
(test_post_jobs.py), a page of GET /jobs (test_get_jobs.py), GET /workers paged by
an opaque cursor and DELETE /workers/{node_id} (test_workers.py). Here, what spans
the routes:

- A job whose history is huge (many large details, inserted with SQL) does
  not slow the reads of other jobs, even while that history is read.
- WORKER_RETENTION forgets long-lost idle workers, a bounded batch per run.
- Numbers in descriptors and details come back exactly as sent, through every read.
- /openapi.json states the constraints: input the service refuses is invalid
  by the document too, and the cross-field rules are read from the schemas.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from datetime import timedelta

import jsonschema
import pytest

from dev.gunicorn import serving
from jobs import chores
from jobs.api.openapi import rules_of
from jobs.chores import workers as worker_chore
from jobs.domain import MAX_DESCRIPTOR_BYTES, MAX_DETAIL_BYTES
from jobs.schemas import FileBatchSchema, FileSchema, StatusReportSchema
from jobs.settings import from_environment

from support.databases import lose_worker
from support.openapi_schema import to_json_schema
from support.service import (
    assert_error,
    create_job,
    detail_of,
    flask_caller,
    make_app,
    move_to,
    register_worker,
    status_of,
    sweep_leases,
)

# ---- Exact numbers ----------------------------------------------------------------------

EXACT = (
    b'{"tiny": 0.30000000000000000000000000000001, "scale": 1.50, "neg": -12.000,'
    b' "big": 123456789012345678901234567890, "deep": [{"x": 2.718281828459045235360287471352}]}'
)


def test_decimals_round_trip_exactly_through_every_read(client):
    raw = b'{"node_id": "w", "idempotency_key": "exact", "descriptor": ' + EXACT + b"}"
    created = client.post("/jobs", data=raw)
    assert created.status_code == 201, created.data
    job = created.get_json()["id"]
    for answer in (
        created,
        client.post("/jobs", data=raw),  # the idempotent replay
        client.get(f"/jobs/{job}"),
        client.get("/jobs?status=all"),
        client.get("/jobs?node_id=w&status=all&limit=7"),  # the unprepared list
    ):
        assert b"0.30000000000000000000000000000001" in answer.data, answer.data
        assert b"1.50" in answer.data and b"-12.000" in answer.data
        assert b"123456789012345678901234567890" in answer.data
        assert b"2.718281828459045235360287471352" in answer.data
    # The detail of a report too, and its event read alone.
    report = b'{"status": "FAILED", "detail": ' + EXACT + b"}"
    assert client.put(f"/jobs/{job}/status", data=report).status_code == 200
    events = client.get(f"/jobs/{job}/events")
    assert b"0.30000000000000000000000000000001" in events.data
    event_id = events.get_json()["events"][-1]["id"]
    one = client.get(f"/jobs/{job}/events/{event_id}")
    assert b"2.718281828459045235360287471352" in one.data and b"1.50" in one.data


def test_numbers_come_back_as_postgresql_writes_them(client):
    raw = b'{"node_id": "w", "descriptor": {"e": 1e2, "small": 1.5E-3, "f": 2.5}}'
    job = client.post("/jobs", data=raw)
    assert job.status_code == 201
    assert json.loads(client.get(f"/jobs/{job.get_json()['id']}").data)["descriptor"] == {
        "e": 100,
        "small": 0.0015,
        "f": 2.5,
    }
    # More fraction digits than PostgreSQL's numeric holds: refused, not rounded.
    many = b'{"node_id": "w", "descriptor": {"x": 0.' + b"1" * 16384 + b"}}"
    message = assert_error(client.post("/jobs", data=many), 400, "INVALID_PAYLOAD_FORMAT")
    assert message.startswith("descriptor: ")
    fine = b'{"node_id": "w", "descriptor": {"x": 0.' + b"1" * 16383 + b"}}"
    created = client.post("/jobs", data=fine)
    assert created.status_code == 201 and b"1" * 16383 in created.data
    # A fraction elsewhere in a body is no integer (strict integers stay strict).
    file = {"file_name": "a", "start_block": 1.0, "end_block": 2, "size_bytes": 1}
    jid = created.get_json()["id"]
    assert_error(client.post(f"/jobs/{jid}/tables/t/files", json=file), 400,
                 "INVALID_PAYLOAD_FORMAT")


# ---- A job with a huge history does not slow the others ----------------------------------


def bomb(db_conn, job_id: int, events: int, detail_bytes: int) -> None:
    with db_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO job_events (job_id, event_type, node_id, detail)"
            " SELECT %s, CASE WHEN g %% 2 = 0 THEN 'FAILED' ELSE 'SCHEDULED' END, 'w',"
            "        jsonb_build_object('error', repeat(md5(g::text), %s / 32))"
            " FROM generate_series(1, %s) g",
            (job_id, detail_bytes, events),
        )


def latencies(call, paths: list[str], rounds: int) -> list[float]:
    timings = []
    for i in range(rounds):
        started = time.perf_counter()
        status, _ = call("GET", paths[i % len(paths)])
        timings.append(time.perf_counter() - started)
        assert status == 200
    return timings


def test_a_huge_history_keeps_other_reads_fast_and_details_stay_bounded(_schema, db_conn):
    from support.databases import truncate

    truncate(_schema)
    with serving(_schema, workers=2) as server:
        call = server.caller()
        bombed = create_job(call)["id"]
        others = [create_job(call)["id"] for _ in range(5)]
        # 1,500 events with 16 KiB details: a ~25 MB history, as fast as SQL writes it.
        bomb(db_conn, bombed, 1500, MAX_DETAIL_BYTES)
        paths = [f"/jobs/{others[0]}", "/jobs?limit=5", f"/jobs/{bombed}"]
        quiet = latencies(call, paths, 60)
        # Two clients read the whole history again and again meanwhile.
        stop, reads, failures = threading.Event(), [], []

        def read_history():
            # The whole history, page by page (a page ends at 1,000 events or 1 MiB).
            while not stop.is_set():
                events, after, ok = 0, "", True
                while ok:
                    status, body = call("GET", f"/jobs/{bombed}/events{after}")
                    ok = status == 200
                    if ok:
                        events += len(body["events"])
                        if body["next_cursor"] is None:
                            break
                        after = f"?after={body['next_cursor']}"
                (reads if ok and events == 1501 else failures).append(1)

        readers = [threading.Thread(target=read_history) for _ in range(2)]
        for reader in readers:
            reader.start()
        try:
            deadline = time.monotonic() + 60
            while not reads and not failures and time.monotonic() < deadline:
                time.sleep(0.01)
            busy = latencies(call, paths, 60)
        finally:
            stop.set()
            for reader in readers:
                reader.join(30)
        assert reads and not failures
        # The history's reads take their worker's time while they serialise; the
        # other reads share the workers with them and stay within a few of those.
        assert statistics.median(busy) < max(0.1, 10 * statistics.median(quiet)), (quiet, busy)
        assert max(busy) < 2.0, sorted(busy)[-5:]
        # And a worker still cannot add a detail over the bound.
        status, body = call(
            "PUT", f"/jobs/{others[1]}/status",
            {"status": "FAILED", "detail": detail_of(1024 * 1024 - 100)},
        )
        assert status == 400 and body["error_code"] == "INVALID_PAYLOAD_FORMAT"
        assert body["error_message"].startswith("detail: ")


# ---- WORKER_RETENTION -----------------------------------------------------------------------


def worker_names(db_conn) -> set[str]:
    with db_conn.cursor() as cur:
        cur.execute("SELECT node_id FROM workers")
        return {row[0] for row in cur.fetchall()}


def run_worker_retention(app, db_conn) -> bool:
    """Run the chore now, as the after-response hook would, its last claim dropped."""
    with db_conn.cursor() as cur:
        cur.execute("DELETE FROM service_chores WHERE name = 'worker_retention'")
    with app.app_context():
        return chores.of(app).run_claimed(chores.of(app).named("worker_retention"))


def test_retention_forgets_long_lost_idle_workers_only(app, client, db_conn, database_url):
    assert app.config["WORKER_RETENTION"] == timedelta(days=7)
    call = flask_caller(app)
    for node in ("old-idle", "old-busy", "old-done", "young-lost", "alive"):
        register_worker(client, node)
    busy = create_job(call, "old-busy")["id"]
    move_to(call, busy, "RUNNING")
    move_to(call, create_job(call, "old-done")["id"], "COMPLETED")
    for node in ("old-idle", "old-busy", "old-done"):
        lose_worker(database_url, node, seconds=8 * 86400)
    lose_worker(database_url, "young-lost", seconds=6 * 86400)

    assert run_worker_retention(app, db_conn)
    assert worker_names(db_conn) == {"old-busy", "young-lost", "alive"}
    # The busy one goes once its job has moved on (the lease sweep fails it).
    sweep_leases(app)
    assert status_of(client, busy) == "FAILED"
    assert run_worker_retention(app, db_conn)
    assert worker_names(db_conn) == {"young-lost", "alive"}
    # Claimed a moment ago: no second run within the interval.
    with app.app_context():
        assert not chores.of(app).run_claimed(chores.of(app).named("worker_retention"))
    # A forgotten worker that comes back registers again.
    assert_error(client.post("/workers/old-idle/heartbeat"), 404, "WORKER_NOT_FOUND")


def test_one_run_forgets_a_bounded_batch(app, db_conn, monkeypatch):
    monkeypatch.setattr(worker_chore, "FORGET_BATCH", 40)
    with db_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO workers (node_id, created_at, registered_at, heartbeat_at)"
            " SELECT 'w' || g, t, t, t FROM generate_series(1, 100) g,"
            " LATERAL (SELECT now() - interval '30 days' - g * interval '1 s') x(t)"
        )
    # w100 has the oldest heartbeat: a run takes the 40 oldest.
    assert run_worker_retention(app, db_conn)
    assert worker_names(db_conn) == {f"w{g}" for g in range(1, 61)}
    forgotten = []
    for _ in range(3):
        before = worker_names(db_conn)
        assert run_worker_retention(app, db_conn)
        forgotten.append(len(before - worker_names(db_conn)))
    assert forgotten == [40, 20, 0]


def test_a_run_looks_at_a_bounded_number_of_the_longest_lost(app, db_conn, monkeypatch):
    """FORGET_SCAN longest lost at most: busy ones (a SCHEDULED job waiting) are passed
    over within it, and only as many busy ones as it looks at can hold the rest back."""
    monkeypatch.setattr(worker_chore, "FORGET_BATCH", 40)
    monkeypatch.setattr(worker_chore, "FORGET_SCAN", 5)
    with db_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO workers (node_id, created_at, registered_at, heartbeat_at)"
            " SELECT 'w' || g, t, t, t FROM generate_series(1, 10) g,"
            " LATERAL (SELECT now() - interval '30 days' - g * interval '1 s') x(t)"
        )
        # The three longest lost (w8, w9, w10) each keep a job waiting.
        cur.execute("INSERT INTO jobs (node_id) SELECT 'w' || g FROM generate_series(8, 10) g")
    busy = {"w8", "w9", "w10"}
    assert run_worker_retention(app, db_conn)
    assert worker_names(db_conn) == busy | {f"w{g}" for g in range(1, 6)}  # w6, w7 went
    assert run_worker_retention(app, db_conn)
    assert worker_names(db_conn) == busy | {"w1", "w2", "w3"}
    monkeypatch.setattr(worker_chore, "FORGET_SCAN", 3)
    assert run_worker_retention(app, db_conn)
    assert worker_names(db_conn) == busy | {"w1", "w2", "w3"}  # held back, as documented


def test_retention_follows_the_setting(app, database_url, db_conn, monkeypatch):
    off = make_app(database_url, WORKER_RETENTION="off")
    short = make_app(database_url, WORKER_RETENTION="1h")
    try:
        assert off.config["WORKER_RETENTION"] is None
        assert not off.extensions["jobs_chores"].named("worker_retention").enabled(off.config)
        assert short.config["WORKER_RETENTION"] == timedelta(hours=1)
        register_worker(short.test_client(), "w-2h")
        register_worker(short.test_client(), "w-30m")
        lose_worker(database_url, "w-2h", seconds=7200)
        lose_worker(database_url, "w-30m", seconds=1800)
        assert run_worker_retention(short, db_conn)
        assert worker_names(db_conn) == {"w-30m"}
    finally:
        for a in (off, short):
            if "jobs_db_pool" in a.extensions:
                a.extensions["jobs_db_pool"].drop_idle()
    # From the environment: unset or empty is the default, "off" turns it off,
    # anything else that is no duration stops the start-up, naming the setting.
    for value, expected in (("", timedelta(days=7)), ("OFF", None), (" 12h ", timedelta(hours=12))):
        monkeypatch.setenv("WORKER_RETENTION", value)
        assert make_app(database_url).config["WORKER_RETENTION"] == expected
    monkeypatch.delenv("WORKER_RETENTION")
    assert from_environment()["WORKER_RETENTION"] == "7d"
    for bad in ("7", "1.5h", "0s", "never", "7d12h"):
        monkeypatch.setenv("WORKER_RETENTION", bad)
        with pytest.raises(ValueError, match="WORKER_RETENTION"):
            make_app(database_url)


# ---- /openapi.json states what validation refuses ------------------------------------------


@pytest.fixture(scope="module")
def document():
    from app import create_app

    return create_app({"TESTING": True}).test_client().get("/openapi.json").get_json()


def body_schema(document, path: str, method: str):
    schema = document["paths"][path][method]["requestBody"]["content"]["application/json"]
    return jsonschema.Draft4Validator(
        to_json_schema(schema["schema"], document["components"]["schemas"])
    )


def param_schema(document, path: str, method: str, name: str):
    (param,) = [p for p in document["paths"][path][method]["parameters"] if p["name"] == name]
    return jsonschema.Draft4Validator(param["schema"])


REFUSED_BODIES = [
    ("/jobs/{job_id}/status", "put", {"status": "STOP_REQUESTED"}),
    ("/jobs/{job_id}/status", "put", {"status": "running"}),
    ("/jobs/{job_id}/status", "put", {"status": "RUNNING", "extra": 1}),
    ("/jobs/{job_id}/status", "put", {"status": "RUNNING", "detail": "oops"}),
    ("/jobs/{job_id}/status", "put", {"detail": {}}),
    ("/jobs/{job_id}/status", "put", {"status": "SCHEDULED", "node_id": "9bad"}),
    ("/jobs", "post", {"node_id": "w", "idempotency_key": ""}),
    ("/jobs", "post", {"node_id": "w", "idempotency_key": "k" * 257}),
    ("/jobs", "post", {"node_id": "w", "idempotency_key": "a\x00b"}),
    ("/jobs", "post", {"node_id": "w" * 129}),
    ("/jobs", "post", {"node_id": "w", "descriptor": []}),
    ("/workers/{node_id}", "put", {"info": {"version": "v" * 257}}),
    ("/workers/{node_id}", "put", {"info": {"version": "v\x001"}}),
    ("/workers/{node_id}", "put", {"info": {"flavour": "x"}}),
    ("/jobs/{job_id}/tables/{table}/files", "post", {"file_name": "a", "start_block": -1,
                                                     "end_block": 1, "size_bytes": 1}),
    ("/jobs/{job_id}/tables/{table}/files", "post", []),
    ("/jobs/{job_id}/tables/{table}/files", "post", {"file_name": "", "start_block": 0,
                                                     "end_block": 1, "size_bytes": 1}),
    ("/jobs", "delete", {"job_ids": [0]}),
]


def concrete(path: str, job_id: int) -> str:
    return path.format(job_id=job_id, node_id="w-1", table="blocks")


def test_bodies_the_service_refuses_are_invalid_by_the_document(client, document):
    job = create_job(flask_caller(client.application))["id"]
    for path, method, body in REFUSED_BODIES:
        answer = client.open(concrete(path, job), method=method.upper(), json=body)
        assert_error(answer, 400, "INVALID_PAYLOAD_FORMAT")
        assert not body_schema(document, path, method).is_valid(body), (path, body)
    # And what it accepts is valid by it.
    for path, method, body in [
        ("/jobs/{job_id}/status", "put", {"status": "SCHEDULED", "node_id": "w-2"}),
        ("/jobs", "post", {"node_id": "w", "idempotency_key": "k", "descriptor": {"a": 1}}),
        ("/workers/{node_id}", "put", {"info": {"version": "v1"}}),
    ]:
        assert client.open(concrete(path, job), method=method.upper(), json=body).status_code < 300
        assert body_schema(document, path, method).is_valid(body), (path, body)


def test_query_values_the_service_refuses_are_invalid_by_the_document(client, document):
    for path, name, raw, value in [
        ("/jobs", "limit", "1001", 1001),
        ("/jobs", "limit", "0", 0),
        ("/jobs", "last_job_id", "0", 0),
        ("/jobs", "node_id", "9x", "9x"),
        ("/workers", "limit", "1001", 1001),
        ("/workers", "limit", "0", 0),
        ("/workers", "cursor", "", ""),
    ]:
        assert client.get(f"{path}?{name}={raw}").status_code == 400
        assert not param_schema(document, path, "get", name).is_valid(value), (path, name)


def test_cross_field_rules_and_size_bounds_are_described_from_the_code(client, document):
    components = document["components"]["schemas"]
    # The rules are the schemas' own (their @validates_schema docstrings), so the
    # document changes with them.
    for name, schema in (("StatusReport", StatusReportSchema), ("File", FileSchema)):
        rules = rules_of(schema)
        assert rules, name
        for rule in rules:
            assert rule in components[name]["description"], (name, rule)
    assert "end_block must be >= start_block" in components["File"]["description"]
    files = document["paths"]["/jobs/{job_id}/tables/{table}/files"]["post"]["requestBody"]
    batch = files["content"]["application/json"]["schema"]["oneOf"][1]
    assert rules_of(FileBatchSchema)[0] in batch["description"]
    # The bounds validation enforces on the free-form objects are stated.
    detail = components["StatusReport"]["properties"]["detail"]
    assert str(MAX_DETAIL_BYTES) in detail["description"]
    descriptor = components["CreateJob"]["properties"]["descriptor"]
    assert str(MAX_DESCRIPTOR_BYTES) in descriptor["description"]
    # The cross-field refusals the descriptions state are real.
    job = create_job(flask_caller(client.application))["id"]
    bad_blocks = {"file_name": "a", "start_block": 5, "end_block": 4, "size_bytes": 1}
    message = assert_error(
        client.post(f"/jobs/{job}/tables/t/files", json=bad_blocks), 400, "INVALID_PAYLOAD_FORMAT"
    )
    assert message.endswith("end_block: must be >= start_block."), message
    # node_id on a report other than SCHEDULED names the reporting worker (fencing):
    # another worker's report is refused, and changes nothing.
    late_node = {"status": "RUNNING", "node_id": "w-2"}
    message = assert_error(client.put(f"/jobs/{job}/status", json=late_node), 409, "STALE_ATTEMPT")
    assert "worker-01" in message
