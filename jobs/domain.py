"""The domain: statuses, the status machine, lease moves, and the rules for ids and names.

Said once here; the store (SQL guards), the schemas (request and response
shapes) and the parsers (path and query) all import it.
"""

from __future__ import annotations

import re

STATUSES = (
    "SCHEDULED",
    "RUNNING",
    "STOP_REQUESTED",
    "STOPPING",
    "COMPLETED",
    "STOPPED",
    "FAILED",
)
TERMINAL_STATUSES = ("COMPLETED", "STOPPED", "FAILED")
ACTIVE_STATUSES = tuple(s for s in STATUSES if s not in TERMINAL_STATUSES)

# Legal moves a worker may report (docs/API.md, The status machine), to-status -> from-statuses.
# STOP_REQUESTED is the operators' move (PUT /jobs/{id}/stop), guarded the same way.
TRANSITIONS: dict[str, frozenset[str]] = {
    "RUNNING": frozenset({"SCHEDULED"}),
    "COMPLETED": frozenset({"RUNNING"}),
    "FAILED": frozenset({"SCHEDULED", "RUNNING", "STOP_REQUESTED", "STOPPING"}),
    "STOPPING": frozenset({"STOP_REQUESTED"}),
    "STOPPED": frozenset({"STOPPING"}),
    "SCHEDULED": frozenset({"FAILED"}),
    "STOP_REQUESTED": frozenset({"SCHEDULED", "RUNNING"}),
}
REPORTABLE_STATUSES = tuple(s for s in STATUSES if s in TRANSITIONS and s != "STOP_REQUESTED")
# Reporting the status a job already has is a no-op, except in these statuses
# when the report names another node_id: the job moves to that node (docs/API.md,
# "Moving a job to another worker").
REASSIGNABLE_STATUSES = frozenset({"SCHEDULED"})

# The moves a lease expiry makes when a registered worker is LOST, to-status ->
# from-statuses (docs/API.md, "Leases"). Not worker-reportable moves: a worker
# may not report STOP_REQUESTED -> STOPPED itself. SCHEDULED jobs stay.
LEASE_EXPIRY: dict[str, frozenset[str]] = {
    "FAILED": frozenset({"RUNNING"}),
    "STOPPED": frozenset({"STOP_REQUESTED", "STOPPING"}),
}
LEASED_STATUSES = tuple(s for s in STATUSES if any(s in f for f in LEASE_EXPIRY.values()))
WORKER_STATUSES = ("ALIVE", "LOST")

# Attempts and automatic retries (docs/API.md, "Attempts and retries"). A job's
# attempt starts at 1 and grows by one on every FAILED -> SCHEDULED (an
# operator's or the retry sweep's). A FAILED job below max_attempts waits
# retry_delay_s(...) and is then scheduled again, unless its report said
# "retryable": false.
MAX_ATTEMPTS_LIMIT = 100
# What PUT /jobs/{id}/stop appends when it cancels a pending retry (the job
# stays FAILED): an event that is not a status.
RETRY_CANCELLED = "RETRY_CANCELLED"
EVENT_TYPES = (*STATUSES, RETRY_CANCELLED)
# An attempt a worker names (in a body or ?attempt=): a positive bigint, so a
# comparison with the job's never overflows.
MAX_ATTEMPT_VALUE = 2**63 - 1


def retry_delay_s(attempt: int, backoff_s: float, backoff_max_s: float) -> float:
    """How long a job that failed on ``attempt`` waits for its retry: doubling, capped.

    store/jobs.py RETRY_DELAY_SQL computes the same in the statements that fail jobs.
    """
    return min(backoff_max_s, backoff_s * 2.0 ** (attempt - 1))


# Filter tokens of GET /jobs?status= and DELETE /jobs?status= (case-insensitive).
LIST_STATUS_TOKENS: dict[str, tuple[str, ...]] = {
    **{s.lower(): (s,) for s in STATUSES},
    "error": ("FAILED",),
    "active": ACTIVE_STATUSES,
    "terminal": TERMINAL_STATUSES,
    "all": STATUSES,
}
DELETE_STATUS_TOKENS: dict[str, tuple[str, ...]] = {
    "terminal": TERMINAL_STATUSES,
    "completed": ("COMPLETED",),
    "stopped": ("STOPPED",),
    "error": ("FAILED",),
    "failed": ("FAILED",),
}

MAX_JOB_ID = 2**63 - 1
MAX_BLOCK = 2**63 - 1
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
# A page of GET /jobs holds at most this much job JSON (at least one job, so
# paging always progresses; each job is at most ~1.5 MiB, the 1 MiB body
# limit on its descriptor as PostgreSQL spells it back): 1000 jobs of 1 MiB
# descriptors made a ~1 GB answer, held whole by the worker and by libpq.
MAX_PAGE_BYTES = 4 * 1024 * 1024
DEFAULT_WORKER_PAGE_SIZE = 100
# The `detail` of a status report, as compact JSON (UTF-8): what a worker says
# about a move (an error, a reason) fits in far less, and a job's history is
# read whole; at 1 MiB each, FAILED -> SCHEDULED cycles grew one to 150 MB.
MAX_DETAIL_BYTES = 16 * 1024
# A descriptor (POST /jobs, admin) is bounded by the 1 MiB body; this bounds it
# as PostgreSQL writes it back too, where 1e300 takes 301 digits instead of 5.
MAX_DESCRIPTOR_BYTES = 1024 * 1024
# What PostgreSQL's numeric (jsonb numbers) holds: decimals are kept exact,
# so a number beyond these is refused rather than rounded or failing in SQL.
MAX_NUMERIC_FRACTION_DIGITS = 16383
MAX_NUMERIC_INTEGER_DIGITS = 131072
MAX_BATCH = 1000
# Waiting (docs/API.md, Waiting without polling): a long-polled heartbeat or
# events request waits at most this many seconds (?wait=0..MAX_WAIT_S).
MAX_WAIT_S = 60
# A page of GET /jobs/{id}/events: at most this many events (the default too,
# so that a client unaware of paging still gets any real job's whole history),
# and it ends early, after at least one event, once its events' JSON reaches
# EVENTS_PAGE_BYTES: a job with 150 MB of details is read a page at a time.
MAX_EVENTS_PAGE = 1000
EVENTS_PAGE_BYTES = 1024 * 1024
# Events a worker's waiting heartbeat is woken by: a job scheduled for it
# (created, moved to it, retried) or a stop requested on one of its jobs.
HEARTBEAT_WAKE_EVENTS = frozenset({"SCHEDULED", "STOP_REQUESTED"})
MAX_NODE_ID_LENGTH = 128
NODE_ID_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]*$"
TABLE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
HASH_PATTERN = r"^0x[0-9a-fA-F]{64}$"
TIMESTAMP_PATTERN = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$"

# One spelling per id: no sign, no leading zeros, at most 19 digits.
_JOB_ID = re.compile(r"[1-9][0-9]{0,18}")
JOB_ID_RULE = f"an integer in 1..{MAX_JOB_ID}, written without leading zeros"
_TABLE = re.compile(TABLE_PATTERN)
_NODE_ID = re.compile(NODE_ID_PATTERN)
NODE_ID_RULE = f"1..{MAX_NODE_ID_LENGTH} characters matching {NODE_ID_PATTERN}"
_ATTEMPT = re.compile(r"[1-9][0-9]{0,18}")
ATTEMPT_RULE = f"an integer in 1..{MAX_ATTEMPT_VALUE}, written without leading zeros"


def parse_job_id(text: str) -> int | None:
    """A job ID as the API spells it (see JOB_ID_RULE), else None."""
    if not _JOB_ID.fullmatch(text):
        return None
    value = int(text)
    return value if 1 <= value <= MAX_JOB_ID else None


def parse_attempt(text: str) -> int | None:
    """An attempt as a query value spells it (see ATTEMPT_RULE), else None."""
    if not _ATTEMPT.fullmatch(text):
        return None
    value = int(text)
    return value if value <= MAX_ATTEMPT_VALUE else None


def is_table_name(text: str) -> bool:
    return _TABLE.fullmatch(text) is not None


def is_node_id(text: str) -> bool:
    return len(text) <= MAX_NODE_ID_LENGTH and _NODE_ID.fullmatch(text) is not None


def parse_status_tokens(text: str, tokens: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """Comma-separated, case-insensitive tokens as a union of statuses.

    ValueError, with a message naming the accepted tokens, when any is unknown
    or empty (the API answers it as a 400, ``flask prune`` as a usage error).
    """
    wanted: set[str] = set()
    for token in text.split(","):
        statuses = tokens.get(token.strip().lower())
        if statuses is None:
            raise ValueError(f"status must be comma-separated tokens among: {', '.join(tokens)}")
        wanted.update(statuses)
    return tuple(s for s in STATUSES if s in wanted)
