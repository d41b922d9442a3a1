"""GET /jobs (docs/API.md, "GET /jobs"): newest first, the status filter and its
tokens, the node filter, the cursor (``last_job_id``, ``next_cursor``) and
``limit``; every malformed, unknown or repeated query parameter refused; a page's
byte budget (docs/API.md, "Bounds"); ``/jobs/`` is no route.

Successful answers are checked by support.checked, refusals by support.refusals.
The query's tests read the jobs of support.refusals.built_world (``world``).
"""

from __future__ import annotations

import itertools
import random
from urllib.parse import quote

import psycopg2
import pytest

from jobs.domain import MAX_PAGE_BYTES
from jobs.store import jobs as job_store

from support.checked import create, get_job, list_jobs, make_job, report
from support.oracle import ACTIVE, STATUSES, TERMINAL
from support.refusals import BAD_IDS, create_id, db_rows, refused
from support.service import MAX_ID, assert_error, flask_caller, job_in

# ---- Order, filters, cursor ----------------------------------------------------------


def test_list_empty(client):
    assert list_jobs(client) == {"jobs": [], "next_cursor": None}
    assert list_jobs(client, status="all") == {"jobs": [], "next_cursor": None}
    response = client.get("/jobs")
    assert response.headers["Content-Type"].split(";")[0] == "application/json"


def test_list_newest_first_and_default_filter_is_active(client):
    jobs = {s: make_job(client, s) for s in STATUSES}
    jobs["SCHEDULED2"] = create(client)
    body = list_jobs(client)
    expected = sorted(
        (j for j in jobs.values() if j["status"] in ACTIVE), key=lambda j: j["id"], reverse=True
    )
    assert body["jobs"] == [get_job(client, j["id"]) for j in expected]
    assert body["next_cursor"] is None
    assert list_jobs(client, status="active") == body
    assert list_jobs(client, limit=50) == body


# token -> statuses, from docs/API.md, GET /jobs.
FILTERS = [
    ("scheduled", {"SCHEDULED"}),
    ("RUNNING", {"RUNNING"}),
    ("Stop_Requested", {"STOP_REQUESTED"}),
    ("stop_requested", {"STOP_REQUESTED"}),
    ("stopping", {"STOPPING"}),
    ("completed", {"COMPLETED"}),
    ("STOPPED", {"STOPPED"}),
    ("failed", {"FAILED"}),
    ("error", {"FAILED"}),
    ("ERROR", {"FAILED"}),
    ("active", set(ACTIVE)),
    ("ACTIVE", set(ACTIVE)),
    ("terminal", set(TERMINAL)),
    ("Terminal", set(TERMINAL)),
    ("all", set(STATUSES)),
    ("ALL", set(STATUSES)),
    ("running,completed", {"RUNNING", "COMPLETED"}),
    (" running , FAILED ", {"RUNNING", "FAILED"}),
    ("error,failed", {"FAILED"}),
    ("active,terminal", set(STATUSES)),
    ("active,running", set(ACTIVE)),
    ("terminal,scheduled", {*TERMINAL, "SCHEDULED"}),
    ("stopped,stopping,stop_requested", {"STOPPED", "STOPPING", "STOP_REQUESTED"}),
    ("all,error", set(STATUSES)),
]


@pytest.mark.parametrize(("token", "wanted"), FILTERS)
def test_list_status_filter(client, token, wanted):
    ids = {}
    for status in STATUSES:
        for _ in range(2):
            ids.setdefault(status, []).append(make_job(client, status)["id"])
    body = list_jobs(client, status=token)
    expected = sorted((i for s in wanted for i in ids[s]), reverse=True)
    assert [j["id"] for j in body["jobs"]] == expected
    assert all(j["status"] in wanted for j in body["jobs"])
    assert body["next_cursor"] is None


def test_next_cursor_is_null_when_the_page_is_exactly_the_last(client):
    ids = [create(client)["id"] for _ in range(3)]
    body = list_jobs(client, limit=3)
    assert [j["id"] for j in body["jobs"]] == ids[::-1]
    assert body["next_cursor"] is None


def test_next_cursor_points_at_the_last_job_of_the_page(client):
    ids = [create(client)["id"] for _ in range(7)][::-1]  # newest first
    first = list_jobs(client, limit=3)
    assert [j["id"] for j in first["jobs"]] == ids[:3]
    assert first["next_cursor"] == ids[2]
    second = list_jobs(client, limit=3, last_job_id=first["next_cursor"])
    assert [j["id"] for j in second["jobs"]] == ids[3:6]
    assert second["next_cursor"] == ids[5]
    third = list_jobs(client, limit=3, last_job_id=second["next_cursor"])
    assert [j["id"] for j in third["jobs"]] == ids[6:]
    assert third["next_cursor"] is None


def test_next_cursor_ignores_later_jobs_that_do_not_match_the_filter(client):
    make_job(client, "COMPLETED")
    make_job(client, "FAILED")
    running = [make_job(client, "RUNNING")["id"] for _ in range(2)]
    body = list_jobs(client, limit=2)
    assert [j["id"] for j in body["jobs"]] == running[::-1]
    assert body["next_cursor"] is None
    body = list_jobs(client, limit=1, status="terminal")
    assert body["next_cursor"] == body["jobs"][0]["id"]
    last = list_jobs(client, limit=1, status="terminal", last_job_id=body["next_cursor"])
    assert len(last["jobs"]) == 1
    assert last["next_cursor"] is None


def test_last_job_id_returns_only_older_jobs(client):
    ids = [create(client)["id"] for _ in range(6)]
    assert [j["id"] for j in list_jobs(client, last_job_id=ids[3])["jobs"]] == ids[:3][::-1]
    assert list_jobs(client, last_job_id=ids[0]) == {"jobs": [], "next_cursor": None}
    assert list_jobs(client, last_job_id=1) == {"jobs": [], "next_cursor": None}
    everything = [j["id"] for j in list_jobs(client, last_job_id=MAX_ID)["jobs"]]
    assert everything == ids[::-1]
    assert [j["id"] for j in list_jobs(client, last_job_id=10**6)["jobs"]] == ids[::-1]
    # A cursor that is no longer a job (deleted) still works.
    report(client, ids[3], "FAILED")
    assert client.delete(f"/jobs/{ids[3]}").status_code == 204
    assert [j["id"] for j in list_jobs(client, last_job_id=ids[3])["jobs"]] == ids[:3][::-1]


def test_limit_default_is_50_and_bounds_are_accepted(client):
    ids = [create(client)["id"] for _ in range(51)][::-1]
    body = list_jobs(client)
    assert [j["id"] for j in body["jobs"]] == ids[:50]
    assert body["next_cursor"] == ids[49]
    rest = list_jobs(client, last_job_id=body["next_cursor"])
    assert [j["id"] for j in rest["jobs"]] == ids[50:]
    assert rest["next_cursor"] is None
    one = list_jobs(client, limit=1)
    assert [j["id"] for j in one["jobs"]] == ids[:1]
    assert one["next_cursor"] == ids[0]
    thousand = list_jobs(client, limit=1000)
    assert [j["id"] for j in thousand["jobs"]] == ids
    assert thousand["next_cursor"] is None


@pytest.fixture
def mixed_jobs(client):
    """57 jobs in pseudo-random statuses: {status: [ids]}."""
    rng = random.Random(57)
    by_status: dict[str, list[int]] = {s: [] for s in STATUSES}
    for _ in range(57):
        status = rng.choice(STATUSES)
        by_status[status].append(make_job(client, status)["id"])
    assert all(by_status[s] for s in STATUSES), "every status present"
    return by_status


@pytest.mark.parametrize(
    ("token", "wanted"),
    [
        (None, set(ACTIVE)),
        ("active", set(ACTIVE)),
        ("terminal", set(TERMINAL)),
        ("all", set(STATUSES)),
        ("running", {"RUNNING"}),
        ("completed,error", {"COMPLETED", "FAILED"}),
        ("stop_requested, STOPPING", {"STOP_REQUESTED", "STOPPING"}),
    ],
)
@pytest.mark.parametrize("limit", [5, 1])
def test_pagination_walk(client, mixed_jobs, token, wanted, limit):
    expected = sorted((i for s in wanted for i in mixed_jobs[s]), reverse=True)
    params = {"limit": limit} if token is None else {"limit": limit, "status": token}
    seen: list[int] = []
    pages = 0
    cursor = None
    while True:
        query = params if cursor is None else {**params, "last_job_id": cursor}
        body = list_jobs(client, **query)
        pages += 1
        page = [j["id"] for j in body["jobs"]]
        assert page, "never an empty page"
        assert len(page) <= limit
        assert all(j["status"] in wanted for j in body["jobs"])
        seen += page
        if body["next_cursor"] is None:
            break
        assert len(page) == limit
        assert body["next_cursor"] == page[-1]
        cursor = body["next_cursor"]
        assert pages < 100
    assert seen == expected, "each matching job exactly once, strictly descending"
    assert pages == -(-len(expected) // limit)


# ---- The node filter -----------------------------------------------------------------


def test_list_by_node(client):
    mine = {s: job_in(client, "worker-01", s) for s in ("SCHEDULED", "RUNNING", "COMPLETED")}
    others = [job_in(client, "worker-02", s) for s in ("SCHEDULED", "RUNNING", "COMPLETED")]
    mine["FAILED"] = job_in(client, "worker-01", "FAILED")

    def ids(query):
        response = client.get(f"/jobs?{query}")
        assert response.status_code == 200, response.get_json()
        return [j["id"] for j in response.get_json()["jobs"]]

    assert ids("node_id=worker-01") == [mine["RUNNING"], mine["SCHEDULED"]]
    assert ids("node_id=worker-01&status=terminal") == [mine["FAILED"], mine["COMPLETED"]]
    assert ids("node_id=worker-01&status=all") == sorted(mine.values(), reverse=True)
    assert ids("node_id=worker-02&status=completed,RUNNING") == [others[2], others[1]]
    assert ids("node_id=nobody&status=all") == []
    # Paging within the node.
    page = client.get("/jobs?node_id=worker-01&status=all&limit=3").get_json()
    assert [j["id"] for j in page["jobs"]] == sorted(mine.values(), reverse=True)[:3]
    assert page["next_cursor"] == page["jobs"][-1]["id"]
    rest = ids(f"node_id=worker-01&status=all&limit=3&last_job_id={page['next_cursor']}")
    assert rest == [min(mine.values())]
    last = client.get(f"/jobs?node_id=worker-01&status=all&last_job_id={min(mine.values())}")
    assert last.get_json() == {"jobs": [], "next_cursor": None}


@pytest.mark.parametrize(
    "query",
    ["node_id=", "node_id=1w", "node_id=w%20x", "node_id=" + "x" * 129, "node_id=a&node_id=b"],
)
def test_list_by_node_refuses_malformed_node_ids(client, query):
    assert_error(client.get(f"/jobs?{query}"), 400, "INVALID_QUERY_PARAMETERS")


def test_the_node_filter_reads_the_nodes_index(client, postgres_url):
    """A node with 10 active jobs among 100,000 finished ones: its listing reads only its
    own index entries (and no other node's), like a status filter."""
    db_conn = psycopg2.connect(postgres_url)  # directly: PREPARE and SET, as the service does
    db_conn.autocommit = True
    with db_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO jobs (node_id, status) SELECT 'busy', 'COMPLETED'"
            " FROM generate_series(1, 100000)"
        )
        cur.execute(
            "INSERT INTO jobs (node_id, status) SELECT 'other', 'RUNNING'"
            " FROM generate_series(1, 20000)"
        )
        cur.execute("INSERT INTO jobs (node_id) SELECT 'busy' FROM generate_series(1, 10)")
        cur.execute("VACUUM ANALYZE jobs")
    listing = client.get("/jobs?node_id=busy&limit=50").get_json()
    assert len(listing["jobs"]) == 10 and listing["next_cursor"] is None
    # The statement as the service runs it: prepared, with a generic plan.
    statement = job_store.list_statement(50, by_node=True)
    with db_conn.cursor() as cur:
        cur.execute("SET plan_cache_mode = force_generic_plan")
        cur.execute(statement.prepare_sql)
        cur.execute(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement.execute_sql,
            {"statuses": ["SCHEDULED", "RUNNING"], "max_id": MAX_ID, "node_id": "busy"},
        )
        plan = cur.fetchone()[0][0]["Plan"]
    db_conn.close()
    # 10 index entries and 10 rows: a few dozen buffers, not the thousands a
    # scan of the status index through the other node's 20,000 would touch.
    assert plan["Shared Hit Blocks"] + plan.get("Shared Read Blocks", 0) < 200, plan


# ---- Query parameters ----------------------------------------------------------------


def test_invalid_last_job_id_is_400(client, db_conn, world):
    before = db_rows(db_conn)
    for bad in [*BAD_IDS, ""]:
        response = client.get("/jobs?last_job_id=" + quote(bad, safe=""))
        assert response.status_code == 400, (bad, response.status_code, response.data[:200])
        message = assert_error(response, 400, "INVALID_QUERY_PARAMETERS")
        assert "last_job_id" in message
    assert db_rows(db_conn) == before


def test_valid_last_job_id_bounds(client, world):
    everything = client.get("/jobs?status=all&last_job_id=9223372036854775807").get_json()
    assert [j["id"] for j in everything["jobs"]] == list(range(12, 0, -1))
    assert client.get("/jobs?status=all&last_job_id=1").get_json() == {
        "jobs": [],
        "next_cursor": None,
    }
    older = client.get("/jobs?status=all&last_job_id=3").get_json()
    assert [j["id"] for j in older["jobs"]] == [2, 1]


@pytest.mark.parametrize(
    ("limit", "code"),
    [
        ("abc", "INVALID_QUERY_PARAMETERS"),
        ("1.5", "INVALID_QUERY_PARAMETERS"),
        ("1.0", "INVALID_QUERY_PARAMETERS"),
        ("", "INVALID_QUERY_PARAMETERS"),
        (" ", "INVALID_QUERY_PARAMETERS"),
        ("1e3", "INVALID_QUERY_PARAMETERS"),
        ("0x10", "INVALID_QUERY_PARAMETERS"),
        ("10abc", "INVALID_QUERY_PARAMETERS"),
        ("1,5", "INVALID_QUERY_PARAMETERS"),
        ("--1", "INVALID_QUERY_PARAMETERS"),
        ("1_0", "INVALID_QUERY_PARAMETERS"),
        ("\u0661", "INVALID_QUERY_PARAMETERS"),
        ("¹", "INVALID_QUERY_PARAMETERS"),
        ("\uff11\uff10", "INVALID_QUERY_PARAMETERS"),
        ("five", "INVALID_QUERY_PARAMETERS"),
        ("null", "INVALID_QUERY_PARAMETERS"),
        ("0", "LIMIT_INVALID"),
        ("00", "LIMIT_INVALID"),
        ("-1", "LIMIT_INVALID"),
        ("-1000", "LIMIT_INVALID"),
        ("-99999999999999999999", "LIMIT_INVALID"),
        ("1001", "LIMIT_TOO_LARGE"),
        ("1000000", "LIMIT_TOO_LARGE"),
        ("99999999999999999999", "LIMIT_TOO_LARGE"),
        ("9" * 1000, "LIMIT_TOO_LARGE"),
        # Longer than Python's int() will parse by default (4300 digits).
        ("9" * 5000, "LIMIT_TOO_LARGE"),
    ],
)
def test_invalid_limit(client, limit, code):
    create_id(client)
    message = assert_error(client.get("/jobs", query_string={"limit": limit}), 400, code)
    assert "limit" in message


@pytest.mark.parametrize("limit", ["1", "2", "999", "1000"])
def test_valid_limit(client, world, limit):
    body = client.get("/jobs", query_string={"status": "all", "limit": limit}).get_json()
    n = int(limit)
    assert [j["id"] for j in body["jobs"]] == list(range(12, 0, -1))[:n]
    assert body["next_cursor"] == (12 - n + 1 if n < 12 else None)


@pytest.mark.parametrize(
    "status",
    [
        "",
        ",",
        " ",
        "running,",
        ",running",
        "running,,failed",
        "running, ,failed",
        "bogus",
        "runnin",
        "runningg",
        "stop requested",
        "STOP-REQUESTED",
        "stoprequested",
        "*",
        "running;failed",
        "running|failed",
        "active terminal",
        "1",
        "null",
        "cancelled",
        "running\x00",
    ],
)
def test_invalid_status_filter(client, world, status):
    response = client.get("/jobs", query_string={"status": status})
    message = assert_error(response, 400, "INVALID_QUERY_PARAMETERS")
    assert "status" in message


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status=Running", {2, 9}),
        ("status=%20running%20", {2, 9}),
        ("status=running+,+STOPPED", {2, 9, 6}),
        ("status=%20error%20,%20Completed", {7, 10, 5, 11}),
        ("status=ACTIVE", {1, 2, 3, 4, 8, 9, 12}),
        ("status=Terminal", {5, 6, 7, 10, 11}),
        ("status=aLL", set(range(1, 13))),
        ("status=stop_requested,stopping", {3, 4}),
        ("", {1, 2, 3, 4, 8, 9, 12}),
    ],
)
def test_valid_status_filters(client, world, query, expected):
    response = client.get("/jobs?" + query)
    assert response.status_code == 200, response.data
    ids = [j["id"] for j in response.get_json()["jobs"]]
    assert ids == sorted(expected, reverse=True)


# Silently ignoring a parameter answers something the caller did not ask for (a
# misspelt filter lists every active job; a repeated limit is decided by the
# first value): each is a 400 that names the parameter, with nothing changed.
@pytest.mark.parametrize(
    ("query", "name", "code"),
    [
        ("?stauts=running", "stauts", "INVALID_QUERY_PARAMETERS"),
        ("?limit=1&limit=abc", "limit", "INVALID_QUERY_PARAMETERS"),
        ("?limit=5&limit=5", "limit", "INVALID_QUERY_PARAMETERS"),
        ("?status=running&status=bogus", "status", "INVALID_QUERY_PARAMETERS"),
        ("?last_job_id=5&last_job_id=9", "last_job_id", "INVALID_QUERY_PARAMETERS"),
        ("?node=worker-01", "node", "INVALID_QUERY_PARAMETERS"),
    ],
)
def test_list_refuses_unknown_and_repeated_parameters(client, db_conn, query, name, code):
    create_id(client)
    message = refused(client, db_conn, "GET", "/jobs" + query, None, None, code)
    assert repr(name) in message, message


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_jobs_with_a_trailing_slash_is_a_json_404(client, method):
    assert_error(client.open("/jobs/", method=method), 404, "NOT_FOUND")


# ---- A byte budget per page ----------------------------------------------------------


def insert_jobs(db_conn, sizes: list[int], status: str = "SCHEDULED", node: str = "n") -> list[int]:
    """Jobs with descriptors of about ``sizes`` bytes, in that (id) order."""
    with db_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO jobs (node_id, status, descriptor)"
            " SELECT %s, %s, jsonb_build_object('pad', repeat('x', s))"
            " FROM unnest(%s::int[]) WITH ORDINALITY AS u(s, n) ORDER BY n RETURNING id",
            (node, status, sizes),
        )
        return [row[0] for row in cur.fetchall()]


def json_sizes(db_conn) -> dict[int, int]:
    with db_conn.cursor() as cur:
        cur.execute("SELECT id, octet_length(job_json) FROM jobs")
        return dict(cur.fetchall())


def page_through(call, query: str) -> list[list[int]]:
    pages, path = [], f"/jobs?{query}"
    for _ in range(10_000):
        status, body = call("GET", path)
        assert status == 200, body
        pages.append([job["id"] for job in body["jobs"]])
        if body["next_cursor"] is None:
            return pages
        assert body["next_cursor"] == pages[-1][-1]
        path = f"/jobs?{query}&last_job_id={body['next_cursor']}"
    raise AssertionError("paging did not end")


def check_pages(pages: list[list[int]], expected: list[int], sizes: dict[int, int], limit: int):
    """Every job once, newest first; each page within the budget and as full as it may be."""
    assert [i for page in pages for i in page] == expected
    listed = iter(expected)
    for page in pages:
        assert page, "an empty page"
        assert [next(listed) for _ in page] == page
        total = sum(sizes[i] for i in page)
        assert len(page) <= limit
        assert total <= MAX_PAGE_BYTES or len(page) == 1, (len(page), total)
    # Full: the page's first job after it would have passed the limit or the budget.
    for page, after in itertools.pairwise(pages):
        total = sum(sizes[i] for i in page)
        assert len(page) == limit or total + sizes[after[0]] > MAX_PAGE_BYTES, (page, after)


def test_a_page_ends_at_the_byte_budget_and_paging_sees_every_job_once(client, db_conn):
    # 0.2-1 MB descriptors among small jobs, in a pattern that makes pages end
    # at the budget in various places; one job of 5 MiB (only SQL can make one)
    # alone on its page.
    sizes = [900_000, 150, 1_000_000, 200_000, 150, 150, 700_000, 1_000_000, 1_000_000, 999_000]
    sizes = sizes * 3 + [5 * 1024 * 1024] + [150] * 40 + [1_040_000] * 5
    ids = insert_jobs(db_conn, sizes)
    json_size = json_sizes(db_conn)
    call = flask_caller(client.application)
    newest_first = sorted(ids, reverse=True)
    for limit in (1000, 50, 3):
        pages = page_through(call, f"status=all&limit={limit}")
        check_pages(pages, newest_first, json_size, limit)
    # The 5 MiB job is a page of its own, and the one after it still comes.
    pages = page_through(call, "status=all&limit=1000")
    huge = max(json_size, key=json_size.get)
    assert [huge] in pages
    # A status filter and a node filter page the same way.
    other = insert_jobs(db_conn, [800_000] * 12, status="RUNNING", node="other")
    json_size = json_sizes(db_conn)
    pages = page_through(call, "status=running&node_id=other&limit=1000")
    check_pages(pages, sorted(other, reverse=True), json_size, 1000)
    assert len(pages) == 3  # 5 + 5 + 2 jobs of ~800 kB


def test_the_answer_is_the_page_and_nothing_more(client, db_conn):
    """What goes over the wire is the page's JSON, not limit + 1 jobs, and the
    page's last row says only that a next page exists."""
    insert_jobs(db_conn, [1_000_000] * 12)
    answer = client.get("/jobs?status=all&limit=1000")
    body = answer.get_json()
    assert len(body["jobs"]) == 4 and body["next_cursor"] == body["jobs"][-1]["id"]
    assert MAX_PAGE_BYTES - 1_100_000 < len(answer.data) <= MAX_PAGE_BYTES + 100


def test_a_large_job_deleted_while_its_page_is_read_is_left_out(client, db_conn, monkeypatch):
    """Large jobs' JSON comes from a second statement (store/jobs.jobs_json): one
    deleted in between is missing from the page, and paging goes on from its end."""
    from jobs.store import jobs as job_store

    ids = insert_jobs(db_conn, [2_000_000, 150, 2_000_000, 150], status="FAILED")
    read = job_store.jobs_json

    def deleted_first(cur, job_ids):
        with db_conn.cursor() as other:
            other.execute("DELETE FROM jobs WHERE id = %s", (max(job_ids),))
        return read(cur, job_ids)

    monkeypatch.setattr(job_store, "jobs_json", deleted_first)
    body = client.get("/jobs?status=failed&limit=3").get_json()
    # The page was ids[3], ids[2] (2 MB), ids[1]: ids[2] went, the cursor stays ids[1].
    assert [j["id"] for j in body["jobs"]] == [ids[3], ids[1]]
    assert body["next_cursor"] == ids[1]
    monkeypatch.setattr(job_store, "jobs_json", read)
    rest = client.get(f"/jobs?status=failed&limit=3&last_job_id={ids[1]}").get_json()
    assert [j["id"] for j in rest["jobs"]] == [ids[0]] and rest["next_cursor"] is None
