"""Refusals: requests the service must refuse, and the proof that they changed nothing.

Every refusal is checked against the rows of every table a request can write,
read before and after (``db_rows``): what the API shows is read from those rows
and nothing else. Jobs exist at the IDs a lenient parser would turn a bad ID into
(``+1``, `` 1``, Arabic-Indic ``1``, ``1_0``...), so acting on a misparsed ID
shows up.

- Requests: ``send`` (a body as bytes, as JSON, or none), ``refused`` (one
  request refused with its error, naming its field, every row unchanged),
  ``unchanged`` (no row changes inside a block), ``db_rows``.
- Test ids: ``short`` (a readable id for a long parameter).
- Setup, unchecked: ``create_id`` (a new job, its ID), ``move`` (a job along
  steps), ``PATH_TO`` (the steps to each status).
- Values: ``BAD_IDS`` (job IDs that are no job IDs, in a path or a query).
- Jobs built once (support.databases.built_once), for the fixtures of the modules
  that use them: ``built_world`` (jobs 1..12 in every status), ``built_targets``
  (a job in each status a body could act on).
"""

from __future__ import annotations

import contextlib
import json

from psycopg2 import sql

from support.databases import built_once
from support.service import assert_error, file_entry, register_files

# The service's own bookkeeping, which a chore may move on any request: the rest are
# every table a request writes, found in the catalogue so that a new one is not missed.
BOOKKEEPING = ["service_chores", "schema_upgrades"]


def short(value) -> str:
    """A readable test id for a parameter (some are 1000 characters long)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- Values ---------------------------------------------------------------------------

# Job IDs that are no job IDs: in a path (every route that takes one) or as a cursor.
BAD_IDS = [
    "abc",
    "0",
    "00",
    "-0",
    "-1",
    "+1",
    "1.5",
    "1.0",
    "1e1",
    "0x1A",
    "0x1",
    "1_0",
    "1a",
    "a1",
    "99999999999999999999",
    "9223372036854775808",
    "18446744073709551616",
    "1" * 1000,
    " 1",
    "1 ",
    "1\n",
    "\t1",
    "1\x00",
    "\u0661",  # ARABIC-INDIC DIGIT ONE
    "\u0661\u0660",  # ARABIC-INDIC 10
    "\uff11",  # FULLWIDTH DIGIT ONE
    "¹",  # SUPERSCRIPT ONE: str.isdigit() but not int()-able
    "\U0001d7cf",  # MATHEMATICAL BOLD DIGIT ONE
    "null",
    "true",
    "%",
    "1,2",
    # One spelling per id: leading zeros are refused at any length.
    "01",
    "007",
    "0" * 18 + "1",
    "0" * 19 + "1",
]


# ---- Setup, unchecked ----------------------------------------------------------------


def create_id(client, node_id="worker-01", **extra) -> int:
    """A new job (setup: only its 201 is checked): its ID."""
    response = client.post("/jobs", json={"node_id": node_id, "descriptor": {"t": 1}, **extra})
    assert response.status_code == 201, response.data
    return response.get_json()["id"]


def move(client, job_id, *steps):
    """A job along ``steps`` (a status reported, or "stop"), each answered 200."""
    for step in steps:
        if step == "stop":
            response = client.put(f"/jobs/{job_id}/stop")
        else:
            response = client.put(f"/jobs/{job_id}/status", json={"status": step})
        assert response.status_code == 200, response.data


PATH_TO = {
    "SCHEDULED": (),
    "RUNNING": ("RUNNING",),
    "STOP_REQUESTED": ("stop",),
    "STOPPING": ("stop", "STOPPING"),
    "COMPLETED": ("RUNNING", "COMPLETED"),
    "STOPPED": ("stop", "STOPPING", "STOPPED"),
    "FAILED": ("FAILED",),
}


# ---- Jobs built once -----------------------------------------------------------------


def built_world(client) -> dict[int, str]:
    """Jobs 1..12 in every status, with files, events and an idempotency key: {id: status}
    (built through the API once, then copied back: support.databases.built_once)."""
    return built_once(
        client.application.config["DATABASE_URL"], "world", lambda: build_world(client)
    )


def build_world(client) -> dict[int, str]:
    statuses = [
        "SCHEDULED",
        "RUNNING",
        "STOP_REQUESTED",
        "STOPPING",
        "COMPLETED",
        "STOPPED",
        "FAILED",
        "SCHEDULED",
        "RUNNING",
        "FAILED",
        "COMPLETED",
        "SCHEDULED",
    ]
    jobs = {}
    for n, status in enumerate(statuses, start=1):
        job_id = create_id(client, node_id=f"worker-{n:02}", idempotency_key=f"key-{n}")
        assert job_id == n
        register_files(
            client, job_id, "blocks", file_entry("f0", 0, 9, 100, block_hash="0x" + "a" * 64)
        )
        move(client, job_id, *PATH_TO[status])
        jobs[job_id] = status
    return jobs


def built_targets(client) -> dict[str, int]:
    """Jobs in the statuses a body could act on: {status: id} (built once, as the world)."""
    return built_once(
        client.application.config["DATABASE_URL"], "targets", lambda: build_targets(client)
    )


def build_targets(client) -> dict[str, int]:
    ids = {}
    for status in ("SCHEDULED", "RUNNING", "STOP_REQUESTED", "FAILED", "COMPLETED"):
        job_id = create_id(client, idempotency_key=f"key-{status}")
        register_files(client, job_id, "blocks", file_entry("f0", 0, 9, 100))
        move(client, job_id, *PATH_TO[status])
        ids[status] = job_id
    return ids


# ---- Refused, and nothing changed --------------------------------------------------


def send(client, method: str, url: str, body):
    """``body``: bytes are sent as they are, anything else as JSON; None sends nothing."""
    if body is None:
        return client.open(url, method=method)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.open(url, method=method, data=data, content_type="application/json")


def db_rows(db_conn) -> dict:
    """Every row of every table a request can write ({table: rows as text}), read in one
    statement.

    What the API shows (the list, events, progress) is read from these rows and
    nothing else, so it is not read again around each refusal (BENCHMARKS.md, "The
    test suite")."""
    tables = _written_tables(db_conn)
    with db_conn.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT {}").format(
                sql.SQL(", ").join(
                    sql.SQL("ARRAY(SELECT t::text FROM {} AS t ORDER BY 1)").format(
                        sql.Identifier(table)
                    )
                    for table in tables
                )
            )
        )
        return dict(zip(tables, cur.fetchone(), strict=True))


_tables: dict[str, list[str]] = {}


def _written_tables(db_conn) -> list[str]:
    if db_conn.dsn not in _tables:
        with db_conn.cursor() as cur:
            cur.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                " AND tablename <> ALL(%s) ORDER BY 1",
                (BOOKKEEPING,),
            )
            tables = [table for (table,) in cur.fetchall()]
        assert {"jobs", "job_events", "job_files", "workers"} <= set(tables), tables
        _tables[db_conn.dsn] = tables
    return _tables[db_conn.dsn]


@contextlib.contextmanager
def unchanged(db_conn):
    """No row changes inside the block."""
    before = db_rows(db_conn)
    yield
    assert db_rows(db_conn) == before, "a refused request changed something"


def refused(client, db_conn, method, url, body, field, code="INVALID_PAYLOAD_FORMAT", status=400):
    """One request refused with its error, naming ``field``, with every row unchanged."""
    before = db_rows(db_conn)
    message = assert_error(send(client, method, url, body), status, code)
    if field is not None:
        assert field in message, (field, message)
    assert db_rows(db_conn) == before, ("a refused request changed something", method, url)
    return message
