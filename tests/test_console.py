"""The operator's console at /ui/ (docs/API.md, Console), in a real browser.

Playwright drives Debian's headless Chromium (tests/support/browser.py) against the real
service under gunicorn (dev.gunicorn.Server), on the session's database; every test
starts from empty tables (the ``app`` fixture truncates them) and checks what it
did in the database itself. Every page a test opens must log no console error
and throw nothing (the ``page`` fixture checks at teardown), except the answers a
test provokes on purpose (a 401 before the token is given, a worker token's 403).

The job page follows the service's event stream (GET /jobs/{id}/events?follow=true);
against a service without it (one that refuses the parameter with a 400), the page
says live updates are unavailable, and that one refused request is the only console
error a job page may log (``expect_follow_refusal``, which asks the service's own
document whether it has the stream).
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time

import pytest

# tests/support/browser.py holds the browser fixtures (browser, page): a plugin of
# this module, with pytest's assertions like a test module's.
pytest.register_assert_rewrite("support.browser")
pytest_plugins = ["support.browser"]

from dev.gunicorn import serving  # noqa: E402
from jobs.api.console import CONSOLE_DIR, CONSOLE_FILES  # noqa: E402

from support.browser import ConsoleWatch, expect, screenshot  # noqa: E402
from support.databases import lose_worker  # noqa: E402
from support.service import create_job, file_entry, move_to  # noqa: E402

# Under pytest-xdist, on one worker: its gunicorn instances (and browser) are the module's.
pytestmark = pytest.mark.xdist_group("console")

ADMIN = "console-admin-token-7f3a9c2e51"
WORKER = "console-worker-token-0b8d4e6f13"

CSP_PARTS = {
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "connect-src 'self'",
    "img-src 'self'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
    "form-action 'self'",
}


# ---- The service, the database, the page ------------------------------------------------


@pytest.fixture(scope="module")
def server(_schema):
    """The service as production runs it, open (no ADMIN_TOKEN); a bulk delete does one
    batch of 100 jobs per request, so the clean-up takes many rounds."""
    with serving(
        _schema, env={"BULK_DELETE_BATCH": "100", "BULK_DELETE_BUDGET_MS": "1"}
    ) as instance:
        yield instance


@pytest.fixture(scope="module")
def tokened_server(_schema):
    with serving(_schema, env={"ADMIN_TOKEN": ADMIN, "WORKER_TOKEN": WORKER}) as instance:
        yield instance


@pytest.fixture
def fresh(app):
    """Empty tables (the app fixture truncates them before each test)."""
    return app


def admin_call(server):
    return server.caller(headers={"Authorization": f"Bearer {ADMIN}"})


def query(db_conn, sql: str, *params) -> list[tuple]:
    with db_conn.cursor() as cur:
        cur.execute(sql, params or None)
        return cur.fetchall()


def execute(db_conn, sql: str, *params) -> None:
    with db_conn.cursor() as cur:
        cur.execute(sql, params or None)


def visit(page, server, route: str = "") -> None:
    page.goto(f"{server.url}/ui/{route}")


def follow_stream_missing(server) -> bool:
    """Whether GET /jobs/{id}/events takes ``follow`` yet (from the service's own document)."""
    status, doc = server.caller()("GET", "/openapi.json")
    assert status == 200
    params = doc["paths"]["/jobs/{job_id}/events"]["get"].get("parameters", [])
    return not any(p.get("name") == "follow" for p in params)


def expect_follow_refusal(page, server) -> None:
    """Until the follow stream lands, Chromium logs the service's 400 to ?follow=true."""
    if follow_stream_missing(server):
        page.watch.allow(r"status of 400 .*\[[^\]]*/events\?follow=true\]")


def fetch(server, path: str, headers: dict | None = None, method: str = "GET"):
    """(status, headers as a dict with lower-case names, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def seed_terminal_jobs(db_conn, count: int) -> None:
    """``count`` terminal jobs (COMPLETED, STOPPED, FAILED in turn) in one statement."""
    execute(
        db_conn,
        "INSERT INTO jobs (node_id, status, descriptor)"
        " SELECT 'old-' || (g %% 5), (ARRAY['COMPLETED', 'STOPPED', 'FAILED'])[1 + g %% 3],"
        " jsonb_build_object('n', g) FROM generate_series(1, %s) g",
        count,
    )


def badges(page, selector: str) -> list[str]:
    return page.locator(f"{selector} .badge").all_inner_texts()


# ---- Serving the page ----------------------------------------------------------------------


def test_every_console_answer_carries_csp_nosniff_and_a_cache_header(server):
    for path in ["/ui/", *(f"/ui/{name}" for name in CONSOLE_FILES)]:
        status, headers, body = fetch(server, path)
        name = path.removeprefix("/ui/") or "index.html"
        assert status == 200, path
        assert headers["content-type"] == CONSOLE_FILES[name], path
        assert body == (CONSOLE_DIR / name).read_bytes(), path
        assert set(headers["content-security-policy"].split("; ")) == CSP_PARTS, path
        assert headers["x-content-type-options"] == "nosniff", path
        assert headers["cache-control"] == "no-cache", path
        assert headers["referrer-policy"] == "no-referrer", path
        # Revalidation: an unchanged file is a 304 without a body.
        status, again, body = fetch(server, path, {"If-None-Match": headers["etag"]})
        assert (status, body) == (304, b""), path
        assert set(again["content-security-policy"].split("; ")) == CSP_PARTS
    # Names off the allow-list, and every way of stepping out of the folder: JSON 404s,
    # with the same headers.
    for path in [
        "/ui/nope.js",
        "/ui/app.py",
        "/ui/.gitignore",
        "/ui/..",
        "/ui/%2e%2e/app.py",
        "/ui/..%2fapp.py",
        "/ui/..%2f..%2fetc%2fpasswd",
        "/ui/index.html/x",
        "/ui/INDEX.HTML",
        "/ui//index.html",
    ]:
        status, headers, body = fetch(server, path)
        assert status == 404, path
        assert headers["content-type"] == "application/json", path
        assert json.loads(body)["error_code"] == "NOT_FOUND", path
        assert set(headers["content-security-policy"].split("; ")) == CSP_PARTS, path
        assert headers["x-content-type-options"] == "nosniff", path
    status, headers, _ = fetch(server, "/ui")
    assert status == 308 and headers["location"].endswith("/ui/")
    # HEAD, a query string (ignored, as by the operations routes), a method it does not take.
    status, headers, body = fetch(server, "/ui/app.js", method="HEAD")
    assert (status, body, headers["content-type"]) == (200, b"", CONSOLE_FILES["app.js"])
    assert fetch(server, "/ui/?from=bookmark")[0] == 200
    status, headers, body = fetch(server, "/ui/", method="POST")
    assert (status, json.loads(body)["error_code"]) == (405, "METHOD_NOT_ALLOWED")
    assert set(headers["content-security-policy"].split("; ")) == CSP_PARTS
    # The API and the operations routes keep their behaviour (and no console headers).
    for path in ("/healthz", "/readyz", "/jobs"):
        status, headers, body = fetch(server, path)
        assert status == 200, path
        assert headers["content-type"] == "application/json", path
        assert "content-security-policy" not in headers, path


def test_the_allow_list_is_the_folder_and_the_files_hold_no_inline_code():
    assert set(CONSOLE_FILES) == {p.name for p in CONSOLE_DIR.iterdir()}
    html = (CONSOLE_DIR / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script type="module" src="app.js">']
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"\son[a-z]+\s*=", html), "an inline event handler"
    for name in CONSOLE_FILES:
        if name.endswith(".js"):
            # Its code without the comments (which may name what it never does).
            code = re.sub(r"^\s*//.*$", "", (CONSOLE_DIR / name).read_text(), flags=re.M)
            for sink in (
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
                'setAttribute("style"',
            ):
                assert sink not in code, (name, sink)


def test_the_csp_is_enforced_in_the_browser(fresh, server, page):
    """What the page's own code could be tricked into adding is refused by the browser:
    an inline script, an inline style, an image or a request to another origin (port 9
    of this machine: refused before anything is sent)."""
    visit(page, server)
    expect(page.locator("main h1")).to_have_text("Jobs")
    page.watch.allow(r"Content Security Policy")
    outcome = page.evaluate(
        """async () => {
            const violated = [];
            document.addEventListener("securitypolicyviolation",
                (e) => violated.push(e.effectiveDirective));
            const script = document.createElement("script");
            script.textContent = "window.__inline = true";
            document.head.append(script);
            const styled = document.createElement("p");
            styled.setAttribute("style", "color: rgb(1, 2, 3)");
            document.body.append(styled);
            const img = document.createElement("img");
            img.src = "http://127.0.0.1:9/x.png";
            document.body.append(img);
            let fetched = "sent";
            try { await fetch("http://127.0.0.1:9/jobs"); } catch (e) { fetched = "refused"; }
            await new Promise((r) => setTimeout(r, 200));
            return {
                inline: window.__inline === true,
                styled: getComputedStyle(styled).color === "rgb(1, 2, 3)",
                fetched,
                violated: [...new Set(violated)].sort(),
            };
        }"""
    )
    assert outcome == {
        "inline": False,
        "styled": False,
        "fetched": "refused",
        "violated": ["connect-src", "img-src", "script-src-elem", "style-src-attr"],
    }


# ---- The jobs list ----------------------------------------------------------------------------


def seed_list(server) -> dict[int, tuple[str, str]]:
    """120 jobs on three nodes, a quarter in each of SCHEDULED, RUNNING, FAILED, COMPLETED."""
    call = server.caller()
    jobs = {}
    statuses = ["SCHEDULED", "RUNNING", "FAILED", "COMPLETED"]
    for i in range(120):
        node = f"node-{i % 3}"
        job_id = create_job(call, node)["id"]
        move_to(call, job_id, statuses[i % 4])
        jobs[job_id] = (statuses[i % 4], node)
    return jobs


def shown_ids(page) -> list[int]:
    return [
        int(x)
        for x in page.locator("#jobs-table tbody tr").evaluate_all(
            "rows => rows.map(r => r.dataset.jobId)"
        )
    ]


def test_the_list_pages_newest_first_with_status_and_node_filters(fresh, server, page):
    jobs = seed_list(server)
    newest_first = sorted(jobs, reverse=True)

    visit(page, server, "#/jobs?status=all")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(50)
    assert shown_ids(page) == newest_first[:50]
    # The status is its name as text (and a colour and a symbol), not colour alone.
    assert badges(page, "#jobs-table tbody") == [jobs[j][0] for j in newest_first[:50]]
    page.click("#next-page")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(50)
    assert shown_ids(page) == newest_first[50:100]
    assert f"after={newest_first[49]}" in page.url
    # The keyboard works the pager too.
    page.focus("#next-page")
    page.keyboard.press("Enter")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(20)
    assert shown_ids(page) == newest_first[100:]
    expect(page.locator("#next-page")).to_have_count(0)
    page.click("#first-page")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(50)
    assert shown_ids(page) == newest_first[:50]

    # The default is the active jobs.
    visit(page, server, "#/jobs")
    active = [j for j in newest_first if jobs[j][0] in ("SCHEDULED", "RUNNING")]
    expect(page.locator("#jobs-table tbody tr")).to_have_count(50)
    assert shown_ids(page) == active[:50]

    # Each status, the terminal ones, and a node, through the form.
    for status in ("failed", "completed", "running", "scheduled"):
        page.select_option("#filter-status", status)
        page.click("form.filters button[type=submit]")
        expect(page.locator("#jobs-summary")).to_contain_text(f"30 {status} jobs")
        assert shown_ids(page) == [j for j in newest_first if jobs[j][0] == status.upper()]
    page.select_option("#filter-status", "terminal")
    page.fill("#filter-node", "node-1")
    page.keyboard.press("Enter")
    expect(page.locator("#jobs-summary")).to_contain_text("of node-1")
    wanted = [j for j in newest_first if jobs[j] in (("FAILED", "node-1"), ("COMPLETED", "node-1"))]
    assert shown_ids(page) == wanted
    assert set(badges(page, "#jobs-table tbody")) == {"FAILED", "COMPLETED"}
    assert "status=terminal" in page.url and "node=node-1" in page.url
    # A node's name is a link to its jobs; an ID to its job.
    page.click(f"#jobs-table a[href='#/jobs/{wanted[0]}']")
    expect(page.locator("main h1")).to_contain_text(f"Job {wanted[0]}")
    expect_follow_refusal(page, server)
    # Nothing matching: said in words.
    visit(page, server, "#/jobs?status=stopping")
    expect(page.locator("#jobs-results .empty")).to_have_text("No stopping jobs.")


def test_the_first_page_of_a_large_table_shows_its_newest_jobs(fresh, server, page, db_conn):
    """One API call of 50 jobs, whatever the table's size. How fast the first page
    renders on a 1M-job table was measured, not asserted (BENCHMARKS.md, The console)."""
    try:
        execute(
            db_conn,
            "INSERT INTO jobs (node_id, status, descriptor)"
            " SELECT 'node-' || (g % 50),"
            " CASE WHEN g % 1000 = 7 THEN 'RUNNING' ELSE 'COMPLETED' END,"
            " jsonb_build_object('dataset', 'eth/mainnet', 'start_block', g * 1000,"
            "                    'end_block', g * 1000 + 999)"
            " FROM generate_series(1, 20000) g",
        )
        execute(db_conn, "ANALYZE jobs")
        # 20 of them active (every thousandth): the active page is short.
        for route, first, rows in (("#/jobs?status=all", 20_000, 50), ("#/jobs", 19_007, 20)):
            visit(page, server, route)
            expect(page.locator("#jobs-table tbody tr")).to_have_count(rows)
            assert shown_ids(page)[0] == first
            page.goto("about:blank")
    finally:
        # Later test modules expect none of these rows: the app fixture empties only its own tests.
        execute(db_conn, "TRUNCATE jobs, job_events, job_tables, job_files CASCADE")


# ---- One job ---------------------------------------------------------------------------------


def test_a_job_shows_fields_descriptor_progress_bars_and_events(fresh, server, page):
    call = server.caller()
    descriptor = {"dataset": "eth/mainnet", "start_block": 1000, "end_block": 1999, "note": "a job"}
    job = create_job(call, "node-a", descriptor=descriptor)
    job_id = job["id"]
    move_to(call, job_id, "RUNNING")
    files = {
        "blocks": [file_entry("b1", 1000, 1249, 1024), file_entry("b2", 1250, 1499, 1024)],
        "logs": [file_entry("l1", 1000, 1099, 2048)],
        # Starts past the descriptor's start: covered from where its chain starts.
        "traces": [file_entry("t1", 1500, 1599, 10)],
    }
    for table, entries in files.items():
        assert call("POST", f"/jobs/{job_id}/tables/{table}/files", entries)[0] == 201
    plain = create_job(call, "node-b", descriptor={"dataset": "eth/mainnet"})["id"]
    assert call("POST", f"/jobs/{plain}/tables/blocks/files", [file_entry("p", 0, 99, 5)])[0] == 201

    visit(page, server, f"#/jobs/{job_id}")
    expect_follow_refusal(page, server)
    expect(page.locator("main h1")).to_have_text(f"Job {job_id} RUNNING")
    expect(page.locator("#job-fields")).to_contain_text("node-a")
    api_job = call("GET", f"/jobs/{job_id}")[1]
    assert page.locator("#descriptor").inner_text() == json.dumps(api_job["descriptor"], indent=2)
    bars = {
        table: page.locator(f"#progress li[data-table='{table}'] progress")
        for table in ("blocks", "logs", "traces")
    }
    expect(bars["blocks"]).to_have_attribute("max", "1000")
    expect(bars["blocks"]).to_have_attribute("value", "500")
    expect(bars["logs"]).to_have_attribute("value", "100")
    expect(bars["traces"]).to_have_attribute("value", "100")
    expect(page.locator("#progress li[data-table='blocks'] .facts")).to_have_text(
        "500 of 1,000 blocks (50.0%) · 2 files · 2.00 KiB"
    )
    expect(page.locator("#progress li[data-table='logs'] .facts")).to_contain_text("(10.0%)")
    # The timeline: the job's events, oldest first.
    events = call("GET", f"/jobs/{job_id}/events")[1]["events"]
    items = page.locator("#timeline li")
    expect(items).to_have_count(2)
    assert items.evaluate_all("li => li.map(x => x.dataset.eventId)") == [
        str(e["id"]) for e in events
    ]
    assert badges(page, "#timeline") == ["SCHEDULED", "RUNNING"]
    expect(page.locator("#live")).to_have_attribute(
        "data-state", re.compile("unsupported|live|connecting")
    )

    # No end_block: the count and the size, no bar.
    visit(page, server, f"#/jobs/{plain}")
    expect(page.locator("#progress li[data-table='blocks'] .facts")).to_have_text(
        "blocks 0 to 99 · 1 file · 5 B"
    )
    expect(page.locator("#progress progress")).to_have_count(0)
    expect(page.locator("#progress .hint")).to_contain_text("no end_block")
    # No such job: said in words (after the service's three 404s).
    page.watch.allow(r"status of 404 .*/jobs/987654321")
    visit(page, server, "#/jobs/987654321")
    expect(page.locator("main .banner")).to_contain_text("There is no job 987654321")


def test_stop_retry_and_delete_through_the_buttons(fresh, server, page, db_conn):
    call = server.caller()
    running = create_job(call, "node-a")["id"]
    move_to(call, running, "RUNNING")
    failed = create_job(call, "node-a")["id"]
    move_to(call, failed, "FAILED")
    completed = create_job(call, "node-a")["id"]
    move_to(call, completed, "COMPLETED")
    for node in ("worker-b", "worker-c"):
        assert call("PUT", f"/workers/{node}")[0] == 200
    expect_follow_refusal(page, server)

    def status_of(job_id):
        rows = query(db_conn, "SELECT status, node_id FROM jobs WHERE id = %s", job_id)
        return rows[0] if rows else None

    # A RUNNING job: Stop only. Cancel and Escape change nothing; confirming stops it.
    visit(page, server, f"#/jobs/{running}")
    expect(page.locator("#actions button")).to_have_text(["Stop"])
    dialog = page.locator("#confirm")
    page.click("#stop")
    expect(dialog).to_be_visible()
    expect(page.locator("#confirm-title")).to_have_text(f"Stop job {running}?")
    page.click("#confirm-cancel")
    expect(dialog).to_be_hidden()
    page.click("#stop")
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    assert status_of(running) == ("RUNNING", "node-a")
    page.click("#stop")
    page.click("#confirm-ok")
    expect(page.locator("main h1 .badge")).to_have_text("STOP_REQUESTED")
    assert status_of(running) == ("STOP_REQUESTED", "node-a")
    expect(page.locator("#action-status")).to_have_text(f"Stop requested for job {running}.")
    expect(page.locator("#actions button")).to_have_count(0)
    assert badges(page, "#timeline")[-1] == "STOP_REQUESTED"

    # A FAILED job: Retry and Delete. The retry runs it on the worker chosen.
    visit(page, server, f"#/jobs/{failed}")
    expect(page.locator("#actions button")).to_have_text(["Retry…", "Delete"])
    page.click("#retry")
    options = page.locator("#retry-node option")
    expect(options).to_have_count(3)
    assert options.evaluate_all("o => o.map(x => x.value)") == ["node-a", "worker-c", "worker-b"]
    page.select_option("#retry-node", "worker-b")
    page.click("#confirm-ok")
    expect(page.locator("main h1 .badge")).to_have_text("SCHEDULED")
    assert status_of(failed) == ("SCHEDULED", "worker-b")
    expect(page.locator("#actions button")).to_have_text(["Stop"])
    last = query(
        db_conn,
        "SELECT event_type, node_id FROM job_events WHERE job_id = %s ORDER BY id DESC LIMIT 1",
        failed,
    )
    assert last == [("SCHEDULED", "worker-b")]
    expect(page.locator("#timeline li")).to_have_count(4)

    # A COMPLETED job: Delete only; it goes with its events.
    visit(page, server, f"#/jobs/{completed}")
    expect(page.locator("#actions button")).to_have_text(["Delete"])
    page.click("#delete")
    page.click("#confirm-ok")
    expect(page.locator("main .banner.ok")).to_have_text(f"Job {completed} was deleted.")
    assert page.url.endswith("#/jobs")
    assert status_of(completed) is None
    assert query(db_conn, "SELECT count(*) FROM job_events WHERE job_id = %s", completed) == [(0,)]
    # An active job offers no Delete, a terminal one no Stop.
    visit(page, server, f"#/jobs/{running}")
    expect(page.locator("#actions .hint")).to_contain_text("STOP_REQUESTED")


# ---- Tokens ----------------------------------------------------------------------------------


def test_the_admin_token_is_asked_for_kept_in_the_tab_and_never_shown(
    fresh, tokened_server, page, db_conn
):
    server = tokened_server
    call = admin_call(server)
    job_id = create_job(call, "node-a")["id"]
    move_to(call, job_id, "RUNNING")
    page.watch.allow(r"status of 401")
    follow_headers = []
    page.on(
        "request",
        lambda r: (
            follow_headers.append(r.headers.get("authorization"))
            if "follow=true" in r.url
            else None
        ),
    )

    visit(page, server)
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#login-why")).to_contain_text("401 UNAUTHORIZED")
    expect(page.locator("#main")).to_be_hidden()
    page.fill("#login-token", "not-the-token")
    page.click("#login-form button")
    expect(page.locator("#login-why")).to_contain_text("refused that token")
    assert page.evaluate("sessionStorage.length") == 0
    expect(page.locator("#login-token")).to_have_attribute("type", "password")
    page.fill("#login-token", ADMIN)
    page.keyboard.press("Enter")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(1)
    expect(page.locator("#access")).to_have_text("Admin token")
    assert page.evaluate("Object.values(sessionStorage)") == [ADMIN]
    assert page.evaluate("localStorage.length") == 0
    # Kept for this tab across a reload; never in the URL or the document.
    page.reload()
    expect(page.locator("#jobs-table tbody tr")).to_have_count(1)
    expect_follow_refusal(page, server)
    page.click(f"a[href='#/jobs/{job_id}']")
    page.click("#stop")
    page.click("#confirm-ok")
    expect(page.locator("main h1 .badge")).to_have_text("STOP_REQUESTED")
    assert query(db_conn, "SELECT status FROM jobs WHERE id = %s", job_id) == [("STOP_REQUESTED",)]
    assert ADMIN not in page.url
    assert ADMIN not in page.content()
    assert ADMIN not in page.evaluate("document.documentElement.outerHTML")
    # The follow stream carried the token too (as a header).
    assert follow_headers and set(follow_headers) == {f"Bearer {ADMIN}"}
    # Changing it can be given up; forgetting it asks again.
    page.click("#change-token")
    expect(page.locator("#login")).to_be_visible()
    page.click("#login-cancel")
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("main h1")).to_contain_text(f"Job {job_id}")
    page.click("#forget-token")
    expect(page.locator("#login")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    assert ADMIN not in server.log()


def test_the_worker_token_gives_a_read_only_console(fresh, tokened_server, page, db_conn):
    server = tokened_server
    call = admin_call(server)
    failed = create_job(call, "node-a")["id"]
    move_to(call, failed, "FAILED")
    running = create_job(call, "node-a")["id"]
    move_to(call, running, "RUNNING")
    assert call("PUT", "/workers/node-a")[0] == 200
    # The 401 before the token, and the 403 of the probe that finds it read-only.
    page.watch.allow(r"status of 40[13]")
    visit(page, server)
    page.fill("#login-token", WORKER)
    page.click("#login-form button")
    expect(page.locator("#access")).to_have_text("Worker token: read-only")
    expect(page.locator("#readonly")).to_be_visible()
    expect(page.locator("#readonly")).to_contain_text("403 FORBIDDEN")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(1)
    expect_follow_refusal(page, server)
    for job_id in (failed, running):
        visit(page, server, f"#/jobs/{job_id}")
        expect(page.locator("#timeline li").first).to_be_visible()
        expect(page.locator("#actions")).to_be_hidden()
        expect(page.locator("main button")).to_have_count(0)
    visit(page, server, "#/cleanup")
    expect(page.locator("#cleanup-readonly")).to_contain_text("admin token")
    expect(page.locator("#cleanup-form")).to_have_count(0)
    visit(page, server, "#/workers")
    expect(page.locator("#workers-table tbody tr")).to_have_count(1)
    assert query(db_conn, "SELECT status FROM jobs ORDER BY id") == [("FAILED",), ("RUNNING",)]


# ---- Safe by construction ------------------------------------------------------------------

XSS = "<img src=x onerror=\"window.__pwned=1;document.title='pwned'\">"


@pytest.mark.parametrize("csp", ["enforced", "bypassed"])
def test_markup_from_the_api_is_text_and_runs_nothing(fresh, server, browser, csp):
    """Also with the CSP switched off in the browser: the text itself is safe."""
    call = server.caller()
    descriptor = {
        "name": XSS,
        XSS: "<script>window.__pwned=2</script>",
        "nested": [{"svg": "<svg onload=window.__pwned=3>"}],
        "end_block": "<b>99</b>",
    }
    job_id = create_job(call, "node-x", descriptor=descriptor)["id"]
    move_to(call, job_id, "RUNNING")
    assert (
        call("PUT", f"/jobs/{job_id}/status", {"status": "FAILED", "detail": {"error": XSS}})[0]
        == 200
    )
    context = browser.new_context(bypass_csp=csp == "bypassed")
    try:
        page = context.new_page()
        page.watch = ConsoleWatch(page)
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        visit(page, server, "#/jobs?status=all")
        expect(page.locator("#jobs-table tbody tr")).to_have_count(1)
        visit(page, server, f"#/jobs/{job_id}")
        expect(page.locator("#timeline li")).to_have_count(3)
        # Shown as JSON text: the markup is there, character for character.
        as_json = json.dumps(XSS)
        assert as_json in page.locator("#descriptor").inner_text()
        assert '"<script>window.__pwned=2</script>"' in page.locator("#descriptor").inner_text()
        assert as_json in page.locator("#timeline").inner_text()
        page.wait_for_timeout(300)
        assert page.evaluate("window.__pwned") is None
        assert page.title() == "Jobs console"
        assert page.locator("main img, main script, main svg, main b").count() == 0
        assert not [u for u in requests if u.endswith("/x")]
        page.watch.check()
    finally:
        context.close()


# ---- Workers -------------------------------------------------------------------------------


def test_workers_with_status_heartbeat_age_and_active_jobs(fresh, server, page, _schema):
    call = server.caller()
    for node in ("worker-lost", "worker-alive"):
        assert call("PUT", f"/workers/{node}", {"info": {"version": "1.4.2"}})[0] == 200
    lose_worker(_schema, "worker-lost", seconds=7200)
    active = []
    for status in ("SCHEDULED", "RUNNING", "COMPLETED"):
        job_id = create_job(call, "worker-alive")["id"]
        move_to(call, job_id, status)
        if status != "COMPLETED":
            active.append(job_id)

    visit(page, server, "#/workers")
    rows = page.locator("#workers-table tbody tr")
    expect(rows).to_have_count(2)
    alive = page.locator("tr[data-node='worker-alive']")
    lost = page.locator("tr[data-node='worker-lost']")
    expect(alive.locator(".badge").first).to_have_text("ALIVE")
    expect(lost.locator(".badge").first).to_have_text("LOST")
    expect(alive.locator(".age")).to_have_text(re.compile(r"^\d+ s ago$"))
    expect(lost.locator(".age")).to_have_text(re.compile(r"^2 h \d+ min ago$"))
    expect(alive.locator(".worker-jobs .more")).to_have_text("2 active")
    links = alive.locator(".worker-jobs li a")
    expect(links).to_have_count(2)
    assert links.all_inner_texts() == [str(j) for j in sorted(active, reverse=True)]
    expect(lost.locator(".worker-jobs")).to_have_text("none")
    alive.locator(".worker-jobs .more").click()
    expect(page.locator("#jobs-summary")).to_contain_text("of worker-alive")
    assert shown_ids(page) == sorted(active, reverse=True)


# ---- Clean-up ------------------------------------------------------------------------------


def test_the_clean_up_deletes_thousands_of_jobs_in_rounds_to_the_end(fresh, server, page, db_conn):
    seed_terminal_jobs(db_conn, 3000)
    call = server.caller()
    keep = [create_job(call, "node-a")["id"] for _ in range(3)]
    answers = []
    page.on(
        "response",
        lambda r: (
            answers.append(r.status)
            if r.request.method == "DELETE" and "status=" in r.url
            else None
        ),
    )
    visit(page, server, "#/cleanup")
    page.click("#cleanup-start")
    expect(page.locator("#confirm-title")).to_have_text("Delete 3,000 terminal jobs?")
    page.click("#confirm-ok")
    expect(page.locator("#cleanup-count")).to_contain_text(
        "Done: no terminal jobs remain", timeout=60_000
    )
    bar = page.locator("#cleanup-progress")
    assert bar.evaluate("b => [b.value, b.max]") == [3000, 3000]
    # One batch of 100 per request: 30 answers saying more, then the 204.
    assert answers == [200] * 30 + [204]
    expect(page.locator("#cleanup-count")).to_contain_text("31 requests")
    assert query(
        db_conn, "SELECT count(*) FROM jobs WHERE status IN ('COMPLETED','STOPPED','FAILED')"
    ) == [(0,)]
    assert sorted(r[0] for r in query(db_conn, "SELECT id FROM jobs")) == sorted(keep)


def test_the_clean_up_can_be_cancelled_between_requests(fresh, server, page, db_conn):
    seed_terminal_jobs(db_conn, 1000)
    held = []
    deletes = []

    def hold_the_third(route):
        if route.request.method != "DELETE":
            route.continue_()
            return
        deletes.append(route.request.url)
        if len(deletes) == 3:
            held.append(route)  # answered below, after Cancel
        else:
            route.continue_()

    page.route("**/jobs?status=*", hold_the_third)
    visit(page, server, "#/cleanup")
    page.check("#cleanup-completed")
    page.click("#cleanup-start")
    expect(page.locator("#confirm-title")).to_have_text("Delete 333 completed jobs?")
    page.click("#confirm-ok")
    deadline = time.monotonic() + 10
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert held, deletes
    expect(page.locator("#cleanup-count")).to_contain_text("Deleted so far: 200 of 333")
    page.click("#cleanup-cancel")
    held[0].continue_()
    expect(page.locator("#cleanup-count")).to_contain_text("Cancelled: 300 deleted in 3 requests")
    page.wait_for_timeout(300)
    assert len(deletes) == 3
    assert query(db_conn, "SELECT status, count(*) FROM jobs GROUP BY 1 ORDER BY 1") == [
        ("COMPLETED", 33),
        ("FAILED", 333),
        ("STOPPED", 334),
    ]


# ---- Live: the follow stream ------------------------------------------------------------------


def test_the_timeline_and_progress_follow_a_working_worker_live(fresh, server, page):
    call = server.caller()
    job_id = create_job(call, "node-a", descriptor={"end_block": 999})["id"]
    expect_follow_refusal(page, server)
    visit(page, server, f"#/jobs/{job_id}")
    expect(page.locator("#timeline li")).to_have_count(1)
    expect(page.locator("#live")).to_have_attribute("data-state", "live", timeout=5000)

    def worker():
        time.sleep(0.5)
        call("PUT", f"/jobs/{job_id}/status", {"status": "RUNNING"})
        call("POST", f"/jobs/{job_id}/tables/blocks/files", [file_entry("a", 0, 499, 10)])
        time.sleep(0.5)
        call("POST", f"/jobs/{job_id}/tables/blocks/files", [file_entry("b", 500, 999, 10)])
        call("PUT", f"/jobs/{job_id}/status", {"status": "COMPLETED"})

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    expect(page.locator("#timeline li")).to_have_count(2, timeout=5000)
    expect(page.locator("#timeline li")).to_have_count(3, timeout=5000)
    expect(page.locator("main h1 .badge")).to_have_text("COMPLETED")
    expect(page.locator("#progress li[data-table='blocks'] progress")).to_have_attribute(
        "value", "1000"
    )
    expect(page.locator("#live")).to_have_attribute("data-state", "ended")
    thread.join(5)


def test_the_event_stream_parser_follows_the_standard(fresh, server, page):
    """The parser of the follow stream (follow.js), fed in awkward chunks: a BOM, CRLF
    split between chunks, CR alone, comments, multi-line data, a field without a
    value, ids that persist, retry, and an unfinished event at the end."""
    visit(page, server)
    expect(page.locator("main h1")).to_have_text("Jobs")
    parsed = page.evaluate(
        r"""async () => {
            const { EventStreamParser } = await import("/ui/follow.js");
            const events = [];
            const retries = [];
            const parser = new EventStreamParser((e) => events.push(e), (ms) => retries.push(ms));
            for (const chunk of [
                "\ufeffdata: a\r", "\ndata: b\r\n\r", "\n: keep-alive\n",
                "id: 7\nevent: FAILED\ndata:no-space\ndata:  two spaces\n\n",
                "data: x\rretry: 1500\r\r", "data\n\n", "id: bad\u0000id\ndata: y\n\n",
                "event: lonely\n\n", "data: {\"id\": 9,\n", "data: \"detail\": null}\n\n",
                "data: unfinished",
            ]) parser.push(chunk);
            parser.end();
            return { events, retries };
        }"""
    )
    assert parsed["retries"] == [1500]
    assert parsed["events"] == [
        {"type": "message", "data": "a\nb", "id": ""},
        {"type": "FAILED", "data": "no-space\n two spaces", "id": "7"},
        {"type": "message", "data": "x", "id": "7"},
        {"type": "message", "data": "", "id": "7"},
        {"type": "message", "data": "y", "id": "7"},
        {"type": "message", "data": '{"id": 9,\n"detail": null}', "id": "7"},
    ]


def test_the_job_page_follows_a_stream_resumes_after_a_drop_and_stops_at_the_end(
    fresh, server, page
):
    """The job page against a follow stream played by the test (page.route), from the
    job's real events while a worker really moves it: it asks from the last event it
    shows, adds what arrives and refreshes the job and its progress, reconnects with
    Last-Event-ID after a drop and after a 503 (backing off), and stops after the
    terminal event."""
    call = server.caller()
    job_id = create_job(call, "node-a", descriptor={"end_block": 999})["id"]
    move_to(call, job_id, "RUNNING")
    asked = []

    def sse(events, line_end="\n"):
        out = [f": keep-alive{line_end}{line_end}"]
        for event in events:
            text = json.dumps(event, indent=1)  # several data lines
            data = line_end.join(f"data: {line}" for line in text.split("\n"))
            out.append(f"id: {event['id']}{line_end}event: {event['event_type']}{line_end}")
            out.append(f"{data}{line_end}{line_end}")
        return "".join(out)

    def after(last_id):
        return [e for e in call("GET", f"/jobs/{job_id}/events")[1]["events"] if e["id"] > last_id]

    def stream(route):
        last = route.request.headers.get("last-event-id")
        asked.append(last)
        if len(asked) == 1:
            # The worker registers half the blocks, the operator stops: one event.
            assert call("POST", f"/jobs/{job_id}/tables/b/files", [file_entry("a", 0, 499)])[0]
            assert call("PUT", f"/jobs/{job_id}/stop")[0] == 200
            body = sse(after(int(last)), "\r\n")  # then the stream drops
        elif len(asked) == 2:
            route.fulfill(status=503, content_type="application/json", body="{}")
            return
        else:
            assert call("PUT", f"/jobs/{job_id}/status", {"status": "STOPPING"})[0] == 200
            assert call("PUT", f"/jobs/{job_id}/status", {"status": "STOPPED"})[0] == 200
            body = sse(after(int(last)), "\r")
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    page.route("**/events?follow=true", stream)
    page.watch.allow(r"status of 503 .*follow=true")
    visit(page, server, f"#/jobs/{job_id}")
    expect(page.locator("#timeline li")).to_have_count(5, timeout=15_000)
    events = call("GET", f"/jobs/{job_id}/events")[1]["events"]
    assert asked == [str(events[1]["id"]), str(events[2]["id"]), str(events[2]["id"])]
    assert badges(page, "#timeline") == [e["event_type"] for e in events]
    expect(page.locator("main h1 .badge")).to_have_text("STOPPED")
    expect(page.locator("#progress progress")).to_have_attribute("value", "500")
    expect(page.locator("#live")).to_have_attribute("data-state", "ended")
    page.wait_for_timeout(1500)
    assert len(asked) == 3  # over: no reconnection


# ---- Phone and desktop widths, and the README's pictures -----------------------------------------


def seed_showcase(server, database_url: str) -> int:
    """A handful of realistic jobs and workers (one LOST); returns a RUNNING job with
    progress."""
    call = server.caller()
    assert call("PUT", "/workers/extractor-ap-1", {"info": {"version": "1.3.9"}})[0] == 200
    lose_worker(database_url, "extractor-ap-1", seconds=3 * 3600 + 600)
    for node, version in (
        ("extractor-eu-1", "1.4.2"),
        ("extractor-eu-2", "1.4.2"),
        ("extractor-us-1", "1.4.1"),
    ):
        assert call("PUT", f"/workers/{node}", {"info": {"version": version}})[0] == 200
    plan = [
        ("extractor-eu-1", "COMPLETED", 20_000_000, 20_499_999),
        ("extractor-eu-2", "FAILED", 20_500_000, 20_999_999),
        ("extractor-us-1", "STOPPED", 21_000_000, 21_099_999),
        ("extractor-eu-1", "RUNNING", 21_100_000, 21_499_999),
        ("extractor-eu-2", "STOP_REQUESTED", 19_000_000, 19_499_999),
        ("extractor-us-1", "SCHEDULED", 21_500_000, 21_999_999),
        ("extractor-eu-1", "RUNNING", 18_000_000, 18_999_999),
    ]
    shown = None
    for node, status, start, end in plan:
        descriptor = {
            "dataset": "eth/mainnet",
            "tables": ["blocks", "transactions", "logs"],
            "start_block": start,
            "end_block": end,
            "format": "parquet",
        }
        job_id = create_job(call, node, descriptor=descriptor)["id"]
        move_to(call, job_id, "RUNNING" if status == "STOP_REQUESTED" else status)
        if status == "STOP_REQUESTED":
            call("PUT", f"/jobs/{job_id}/stop")
        if status == "RUNNING" and shown is None:
            shown = job_id
            for table, done, size in (
                ("blocks", 260_000, 9_800_000),
                ("transactions", 180_000, 61_000_000),
                ("logs", 90_000, 24_000_000),
            ):
                files = [
                    file_entry(f"{table}_{s}.parquet", s, s + 9_999, size)
                    for s in range(start, start + done, 10_000)
                ]
                assert call("POST", f"/jobs/{job_id}/tables/{table}/files", files)[0] == 201
    return shown


@pytest.mark.parametrize("width", [375, 1440])
def test_every_page_fits_phone_and_desktop_widths(fresh, server, page, width, _schema):
    job_id = seed_showcase(server, _schema)
    expect_follow_refusal(page, server)
    page.set_viewport_size({"width": width, "height": 800})
    for route, ready in [
        ("#/jobs?status=all", "#jobs-table"),
        (f"#/jobs/{job_id}", "#progress progress"),
        ("#/workers", "#workers-table"),
        ("#/cleanup", "#cleanup-form"),
    ]:
        visit(page, server, route)
        expect(page.locator(ready).first).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= width, route
        # Nor inside: no table needs a sideways scroll (at 375 px rows become cards).
        for box in page.locator(".scroll").all():
            assert box.evaluate("b => b.scrollWidth <= b.clientWidth"), route
        for link in page.locator("nav a[data-section]").all():
            expect(link).to_be_visible()


def test_readme_screenshots(fresh, server, page, _schema):
    """The README's pictures (JOBS_SCREENSHOTS=docs/screenshots, `make screenshots`):
    the list, a job with progress and events, the workers. Without the variable it
    still checks that those pages render this data without a console error."""
    job_id = seed_showcase(server, _schema)
    expect_follow_refusal(page, server)
    visit(page, server, "#/jobs?status=all")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(7)
    screenshot(page, "jobs")
    visit(page, server, f"#/jobs/{job_id}")
    expect(page.locator("#progress progress")).to_have_count(3)
    expect(page.locator("#timeline li")).to_have_count(2)
    screenshot(page, "job", full_page=True)
    visit(page, server, "#/workers")
    expect(page.locator("#workers-table .worker-jobs .more")).to_have_count(3)
    expect(page.locator("tr[data-node='extractor-ap-1'] .worker-jobs")).to_have_text("none")
    screenshot(page, "workers")
