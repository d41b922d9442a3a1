"""The statements of waiting without polling (waiting.py): listening, and polling instead.

schema.sql's triggers announce every committed event and every deleted job on
CHANNEL; a process LISTENs on one connection of its own. Where it cannot
(through PgBouncer in transaction mode), it polls with NEW_EVENTS instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from jobs.store.sql import fetch_one

CHANNEL = "jobs_events"


def listen(cur) -> None:
    cur.execute(f"LISTEN {CHANNEL}")


def ping(cur) -> None:
    cur.execute("SELECT 1")
    cur.fetchone()


def latest_event_id(cur) -> int:
    """The largest event id of any job (0 when there is none): where polling starts."""
    return fetch_one(cur, "SELECT coalesce(max(id), 0) FROM job_events")[0]


# One poll for every waiter of the process: the events after ``after`` (a range
# of the primary key), which of the jobs waited on are gone, and the largest
# event id (below ``after`` only if ids went back: a TRUNCATE, a restore). The
# events come as one JSON text, rows of [id, job_id, event_type, node_id].
NEW_EVENTS = """
SELECT coalesce(json_agg(json_build_array(e.id, e.job_id, e.event_type, e.node_id)
                         ORDER BY e.id), '[]')::text,
       ARRAY(SELECT watched.id FROM unnest(%(watched)s::bigint[]) AS watched(id)
             WHERE NOT EXISTS (SELECT FROM jobs WHERE jobs.id = watched.id)),
       (SELECT coalesce(max(id), 0) FROM job_events)
FROM (SELECT id, job_id, event_type, node_id FROM job_events
      WHERE id > %(after)s ORDER BY id LIMIT %(batch)s) e
"""


@dataclass(frozen=True)
class Polled:
    events: list[tuple[int, int, str, str | None]]  # (id, job_id, event_type, node_id), by id
    gone: list[int]  # jobs of ``watched`` that no longer exist
    latest: int  # the largest event id there is


def new_events(cur, after: int, watched: list[int], batch: int) -> Polled:
    events_json, gone, latest = fetch_one(
        cur, NEW_EVENTS, {"after": after, "watched": watched, "batch": batch}
    )
    return Polled([tuple(row) for row in orjson.loads(events_json)], list(gone), latest)
