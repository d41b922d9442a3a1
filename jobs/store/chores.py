"""Claims on housekeeping runs (jobs/chores): each chore at most once per interval."""

from __future__ import annotations

# The row is created on first use; an existing one is taken only when its
# last run is at least the interval ago (the WHERE of ON CONFLICT is
# evaluated under the row's lock, so two replicas cannot both take it).
CLAIM = """
INSERT INTO service_chores AS c (name, ran_at) VALUES (%(name)s, clock_timestamp())
ON CONFLICT (name) DO UPDATE SET ran_at = EXCLUDED.ran_at
WHERE c.ran_at <= EXCLUDED.ran_at - make_interval(secs => %(interval_s)s)
RETURNING true
"""


def claim(cur, name: str, interval_s: float) -> bool:
    """True when this caller takes the chore's run (commit it on its own)."""
    cur.execute(CLAIM, {"name": name, "interval_s": interval_s})
    return cur.fetchone() is not None
