"""Every setting of the service and of its gunicorn: an environment variable, its
default, the values it allows, and why.

create_app reads the service's settings once (``from_environment``); tests pass
overrides as ``create_app(test_config)``. gunicorn.conf.py reads every setting,
gunicorn's and the service's, once in the master (``for_gunicorn``), so a bad
value stops the start-up before any worker is forked. docs/API.md, "Settings",
lists them for operators (tests/test_bounds_ops.py holds the table to ``SETTINGS``).

A value is malformed or out of range: the start-up stops with a message naming
each such variable and what it allows (SettingsError). Unset or empty: the
default. Numbers are ASCII digits (str.isdigit and float() also take "٣", "1e12",
"1_000" or "inf"; none is allowed here), optionally with a decimal point where
seconds are counted. The ranges keep every value inside what its consumers
take: PostgreSQL's statement_timeout and make_interval, libpq's connect_timeout
and tcp_user_timeout (C ints), gevent's timers. Values past them broke the
service before: STATEMENT_TIMEOUT_MS=2147483648 answered 500 on every route,
WORKER_LOST_AFTER_S=1e12 on /workers, BULK_DELETE_BUDGET_MS=4294967296 on the
bulk delete, DB_CONNECT_TIMEOUT_S=99999999999 on every route.

Not here: PROMETHEUS_MULTIPROC_DIR, a path that gunicorn.conf.py checks itself
(ours alone, never a symlink), and PG_BIN_DIR, read by the development tools only.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from jobs.domain import MAX_ATTEMPTS_LIMIT


class SettingsError(ValueError):
    """Settings that cannot be used; the message names each variable and what it allows."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    # What the setting allows, in words: docs/API.md's table and every refusal say it.
    rule: str
    # The environment's text (stripped, not empty) -> the value; ValueError says why not.
    parse: Callable[[str], Any]
    # Whether an already parsed value (a test's override) is allowed.
    allows: Callable[[Any], bool]
    gunicorn: bool = False
    # A secret is never repeated in a message (a token, a URL with a password).
    secret: bool = False

    def read(self, environ: Mapping[str, str]) -> Any:
        text = (environ.get(self.name) or "").strip()
        if not text:
            return self.default
        try:
            return self.parse(text)
        except ValueError as exc:
            if self.secret:
                raise ValueError(
                    f"{self.name}: not allowed (the value is not shown): expected {self.rule}"
                ) from None
            raise ValueError(f"{self.name}: {exc}") from None


# ---- Kinds of values ------------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]+")  # [0-9] is ASCII only; \d and str.isdigit are not
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _whole(low: int, high: int, unit: str = "") -> tuple[str, Callable, Callable]:
    rule = f"a whole number{f' of {unit}' if unit else ''} from {low} to {high}"

    def parse(text: str) -> int:
        if not _DIGITS.fullmatch(text):
            raise ValueError(f"{_shown(text)} is not a whole number: expected {rule}")
        # No int() of thousands of digits (Python refuses past 4300): out of range anyway.
        value = int(text) if len(text) <= 18 else high + 1
        if not low <= value <= high:
            raise ValueError(f"{_shown(text)} is out of range: expected {rule}")
        return value

    def allows(value) -> bool:
        return type(value) is int and low <= value <= high

    return rule, parse, allows


def _seconds(low: float, high: float) -> tuple[str, Callable, Callable]:
    rule = f"a number of seconds from {low:g} to {high:g} (digits, a decimal point allowed)"

    def parse(text: str) -> float:
        if not _DECIMAL.fullmatch(text) or len(text) > 30:
            raise ValueError(f"{_shown(text)} is not a number of seconds: expected {rule}")
        value = float(text)
        if not low <= value <= high:
            raise ValueError(f"{_shown(text)} is out of range: expected {rule}")
        return value

    def allows(value) -> bool:
        return type(value) in (int, float) and low <= value <= high

    return rule, parse, allows


def _choice(choices: tuple[str, ...], upper: bool) -> tuple[str, Callable, Callable]:
    rule = f"one of {', '.join(choices)} (any case)"

    def parse(text: str) -> str:
        value = text.upper() if upper else text.lower()
        if value not in choices:
            raise ValueError(f"{_shown(text)} is not allowed: expected {rule}")
        return value

    return rule, parse, lambda value: value in choices


_TOKEN = re.compile(r"[!-~]{1,4096}")


def _token() -> tuple[str, Callable, Callable]:
    # A request's headers arrive as Latin-1 and the presented token is stripped:
    # a token with spaces at its ends or beyond ASCII could never match.
    rule = "1 to 4096 visible ASCII characters (no spaces); unset or empty: none"

    def parse(text: str) -> str:
        if not _TOKEN.fullmatch(text):
            raise ValueError(rule)
        return text

    return rule, parse, lambda value: value is None or bool(_TOKEN.fullmatch(str(value)))


def _database_url() -> tuple[str, Callable, Callable]:
    rule = "a libpq connection URL (postgresql://user@host:5432/dbname) or key=value string"

    def parse(text: str) -> str:
        # libpq's own parser (PQconninfoParse); psycopg2 is imported only here,
        # not by every reader of this module (gunicorn's master).
        import psycopg2.extensions

        try:
            psycopg2.extensions.parse_dsn(text)
        except psycopg2.Error:
            raise ValueError(rule) from None
        return text

    def allows(value) -> bool:
        try:
            return isinstance(value, str) and bool(value.strip()) and bool(parse(value))
        except ValueError:
            return False

    return rule, parse, allows


# JOB_RETENTION and `flask prune --older-than` (pruning.py).
_DURATION = re.compile(r"([0-9]{1,9})([dhms])")
DURATION_UNITS_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}
# 100 years: anything longer keeps everything, and now() minus it must stay a timestamp.
MAX_DURATION = timedelta(days=36500)
DURATION_RULE = "a whole number and one unit, d, h, m or s (30d, 12h, 90m, 45s), at least 1s"


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``45s``: exactly that form; ValueError otherwise."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration: expected {DURATION_RULE}")
    value = timedelta(seconds=int(match[1]) * DURATION_UNITS_S[match[2]])
    if not timedelta(seconds=1) <= value <= MAX_DURATION:
        raise ValueError(f"{text!r} is out of range: expected 1s to {MAX_DURATION.days}d")
    return value


def _duration() -> tuple[str, Callable, Callable]:
    rule = (
        f"a duration from 1s to {MAX_DURATION.days}d (a whole number and d, h, m or s); unset: off"
    )

    def allows(value) -> bool:
        return value is None or (
            isinstance(value, timedelta) and timedelta(seconds=1) <= value <= MAX_DURATION
        )

    return rule, parse_duration, allows


def _addresses() -> tuple[str, Callable, Callable]:
    rule = "IP addresses or networks, comma-separated (10.0.0.5,10.1.0.0/16,::1), or *; unset: none"

    def parse(text: str) -> str:
        items = [item.strip() for item in text.split(",")]
        for item in items:
            if item == "*":
                continue
            try:
                # strict: 10.1.0.1/16 (host bits set) is a mistake, as gunicorn says too.
                ipaddress.ip_network(item)
            except ValueError:
                raise ValueError(
                    f"{_shown(item)} is not an IP address or network: expected {rule}"
                ) from None
        return ",".join(items)

    def allows(value) -> bool:
        try:
            return value == "" or parse(value) == value
        except (ValueError, AttributeError):
            return False

    return rule, parse, allows


def _optional(kind: tuple[str, Callable, Callable]) -> tuple[str, Callable, Callable]:
    rule, parse, allows = kind
    return f"{rule}; unset: none", parse, lambda value: value is None or allows(value)


# A libpq URL's own commas separate the hosts of one server's URL
# (postgresql://db1,db2/jobs), so between URLs only white space counts, or a
# comma that a scheme follows.
_URL_SEPARATOR = re.compile(r"\s+|,\s*(?=postgres(?:ql)?://)")
_URL_SCHEME = re.compile(r"postgres(?:ql)?://")
MAX_REPLICA_URLS = 8


def _replica_urls() -> tuple[str, Callable, Callable]:
    rule = (
        f"1 to {MAX_REPLICA_URLS} libpq URLs (postgresql://user@host:5432/dbname), separated by"
        " spaces or commas; unset: none"
    )

    def parse(text: str) -> tuple[str, ...]:
        import psycopg2.extensions  # as in _database_url

        urls = tuple(url for url in _URL_SEPARATOR.split(text) if url)
        if not 1 <= len(urls) <= MAX_REPLICA_URLS:
            raise ValueError(rule)
        for url in urls:
            if not _URL_SCHEME.match(url):
                raise ValueError(rule)
            try:
                psycopg2.extensions.parse_dsn(url)
            except psycopg2.Error:
                raise ValueError(rule) from None
        return urls

    def allows(value) -> bool:
        try:
            return value is None or (
                isinstance(value, tuple) and parse(" ".join(value)) == value
            )
        except (ValueError, TypeError):
            return False

    return rule, parse, allows


def _worker_retention() -> tuple[str, Callable, Callable]:
    rule = f"a duration from 1s to {MAX_DURATION.days}d (a whole number and d, h, m or s), or off"

    def parse(text: str):
        return None if text.lower() == "off" else parse_duration(text)

    def allows(value) -> bool:
        if isinstance(value, str):  # the default, or a test's override, before app.py reads it
            try:
                value = parse(value.strip())
            except ValueError:
                return False
        return value is None or (
            isinstance(value, timedelta) and timedelta(seconds=1) <= value <= MAX_DURATION
        )

    return rule, parse, allows


def _setting(name, default, kind, **flags) -> Setting:
    rule, parse, allows = kind
    return Setting(name, default, rule, parse, allows, **flags)


# ---- The settings ---------------------------------------------------------------------------

SETTINGS: tuple[Setting, ...] = (
    _setting("DATABASE_URL", "postgresql:///jobs", _database_url(), secret=True),
    # Standbys for the operators' reads (replicas.py): a tuple of libpq URLs,
    # each a pool of DB_POOL_SIZE per process. At most 8: each is a pool and
    # a check per process.
    _setting("DATABASE_REPLICA_URL", None, _replica_urls(), secret=True),
    # A replica not known to hold every commit made this many seconds ago is
    # skipped (the read goes to the primary). At most an hour: past that a
    # replica shows the operators another service; at least 0.1 s, within
    # what a check every REPLICA_CHECK_S can tell.
    _setting("REPLICA_MAX_LAG_S", 5.0, _seconds(0.1, 3600)),
    # How often each process checks each replica's replay position while reads
    # come in: two short queries. Keep it well below REPLICA_MAX_LAG_S (a
    # replica's known age grows between checks).
    _setting("REPLICA_CHECK_S", 1.0, _seconds(0.05, 60)),
    _setting("ADMIN_TOKEN", None, _token(), secret=True),
    _setting("WORKER_TOKEN", None, _token(), secret=True),
    # A registered worker without a heartbeat for this long is LOST and its
    # leases expire (chores/leases.py). At most a day: the lease sweep runs
    # every min(5 s, half of it), and past a day a dead worker holds its jobs
    # for longer than anyone waits.
    _setting("WORKER_LOST_AFTER_S", 30.0, _seconds(1, 86400)),
    # Delete terminal jobs whose last change is older than this (30d, 12h,
    # 90m, 45s), continuously, as a chore (chores/retention.py). Unset: off.
    _setting("JOB_RETENTION", None, _duration()),
    # Forget workers LOST this long that have no active jobs (chores/workers.py).
    _setting("WORKER_RETENTION", "7d", _worker_retention()),
    # Attempts a job gets unless POST /jobs says otherwise: 1 is no automatic
    # retry (docs/API.md, "Attempts and retries").
    _setting("JOB_MAX_ATTEMPTS", 1, _whole(1, MAX_ATTEMPTS_LIMIT, "attempts")),
    # A failed job's retry waits RETRY_BACKOFF_S x 2^(attempt - 1) seconds, at
    # most RETRY_BACKOFF_MAX_S: 10 s, 20 s, 40 s ... an hour. At most a day
    # either way, so that a retry is never put off for good by a typo.
    _setting("RETRY_BACKOFF_S", 10.0, _seconds(0.001, 86400)),
    _setting("RETRY_BACKOFF_MAX_S", 3600.0, _seconds(0.001, 86400)),
    # How often the retry sweep looks for due retries (chores/retries.py): a
    # due retry is made within this (given traffic), so at most 5 s, and the
    # 10 s the API promises hold.
    _setting("RETRY_SWEEP_INTERVAL_S", 5.0, _seconds(0.01, 5)),
    # Every query of a request. Up to 5 minutes: a request's query should take
    # milliseconds, and statement_timeout (and tcp_user_timeout, this plus 5 s)
    # are C ints of milliseconds; at least 100 ms, or ordinary queries fail.
    _setting("STATEMENT_TIMEOUT_MS", 5000, _whole(100, 300_000, "milliseconds")),
    # The time one DELETE /jobs request spends deleting. A per-request
    # budget rather than one statement's timeout: a delete by status runs batches of
    # BULK_DELETE_BATCH jobs, each its own short transaction, and starts
    # none after the budget, answering 200 {"deleted", "more": true}; a
    # statement timeout instead cut one huge statement, deleting nothing and
    # answering 500 (BENCHMARKS.md, "Deleting history"). Half of it limits each batch
    # statement (pruning.batch_timeout_ms), so the worst case, a batch
    # stuck on a lock from the budget's last moment, ends within twice
    # the budget: 20 s with 10 s, 10 minutes with the most, 5 minutes. At
    # least 1 ms: every request runs one batch, so even that makes progress.
    _setting("BULK_DELETE_BUDGET_MS", 10000, _whole(1, 300_000, "milliseconds")),
    # The most jobs one batch deletes (pruning.BatchSizer shrinks batches
    # whose jobs carry many files). Larger caps gained nothing beyond the
    # shared box's noise and hold their locks longer (BENCHMARKS.md,
    # "Deleting history").
    # The same range as `flask prune --batch-size`.
    _setting("BULK_DELETE_BATCH", 1000, _whole(1, 100_000, "jobs")),
    # A body of at most 1 MiB arrives in well under this from any real
    # client; one sent a byte at a time would otherwise hold its
    # connection (and, by the thousand, a worker's WORKER_CONNECTIONS) for
    # as long as it likes: 408 and the connection closed. The request
    # line and headers have gunicorn's own deadline (KEEPALIVE_S).
    _setting("BODY_READ_TIMEOUT_S", 10.0, _seconds(0.1, 300)),
    # libpq's connect_timeout (1 counts as 2); a minute is already far past
    # any reachable database.
    _setting("DB_CONNECT_TIMEOUT_S", 3, _whole(1, 60, "seconds")),
    # Connections one worker process may hold: an instance holds up to
    # WEB_CONCURRENCY times this (PostgreSQL's max_connections is 100 by default).
    _setting("DB_POOL_SIZE", 4, _whole(1, 100, "connections")),
    # How long a request waits for a free connection of its process's pool
    # before it is answered 503 SERVICE_BUSY: a full pool means more requests
    # than the database is given connections for, and a client told to come
    # back soon does better than one kept waiting (docs/API.md, Overload).
    _setting("DB_POOL_TIMEOUT_S", 2.0, _seconds(0.1, 30)),
    # Waiting without polling (waiting.py): where each process LISTENs. Unset:
    # on DATABASE_URL itself when that reaches PostgreSQL directly; through a
    # pooler (PgBouncer in transaction mode cannot keep a LISTEN) waiting
    # falls back to polling every WAIT_POLL_INTERVAL_MS. Set it to a URL that
    # reaches PostgreSQL directly to keep wake-ups instant there.
    _setting("DATABASE_LISTEN_URL", None, _optional(_database_url()), secret=True),
    # Polling mode only: one query per process per tick, for all its waiters.
    _setting("WAIT_POLL_INTERVAL_MS", 250, _whole(10, 1000, "milliseconds")),
    # Requests one process holds waiting at once (long polls and follow
    # streams); more get 503 SERVICE_BUSY. Each holds one of gunicorn's
    # WORKER_CONNECTIONS (default 1000): 100 stay free for every other request.
    _setting("WAITERS_PER_PROCESS", 900, _whole(0, 10_000, "requests")),
    # A follow stream sends a comment at least this often while nothing
    # happens (proxies close silent connections), and ends after FOLLOW_MAX_S
    # (the client resumes with Last-Event-ID).
    _setting("FOLLOW_KEEPALIVE_S", 15.0, _seconds(0.1, 15)),
    _setting("FOLLOW_MAX_S", 600.0, _seconds(1, 86400)),
    _setting("LOG_LEVEL", "INFO", _choice(("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), True)),
    # ---- gunicorn's (gunicorn.conf.py says how each is used) ----
    _setting("PORT", 8080, _whole(1, 65535), gunicorn=True),
    # Worker processes; each serves many connections at once (gevent).
    _setting("WEB_CONCURRENCY", 2, _whole(1, 64, "processes"), gunicorn=True),
    _setting("WORKER_CONNECTIONS", 1000, _whole(1, 10_000, "connections"), gunicorn=True),
    # 0 would turn gunicorn's deadline on a request head off. Up to 15 minutes:
    # above every load balancer's idle timeout (an ALB's 60 s, a GCP balancer's 600 s).
    _setting("KEEPALIVE_S", 5, _whole(1, 900, "seconds"), gunicorn=True),
    _setting("GRACEFUL_TIMEOUT", 30, _whole(1, 600, "seconds"), gunicorn=True),
    # The peers whose SCRIPT_NAME and X-Forwarded-* headers gunicorn believes.
    # None by default: anyone could otherwise send them (gunicorn's own
    # default trusts 127.0.0.1, i.e. every local process and sidecar).
    _setting("FORWARDED_ALLOW_IPS", "", _addresses(), gunicorn=True),
    _setting(
        "GUNICORN_LOG_LEVEL",
        "info",
        _choice(("debug", "info", "warning", "error", "critical"), False),
        gunicorn=True,
    ),
)

BY_NAME = {setting.name: setting for setting in SETTINGS}

# Fixed, not settings: what readiness waits for, and the largest request body.
FIXED = {"READY_TIMEOUT_S": 1.0, "MAX_CONTENT_LENGTH": 1024 * 1024}


def from_environment(environ: Mapping[str, str] | None = None) -> dict:
    """The service's settings (not gunicorn's), or SettingsError naming every bad one."""
    return {**_read([s for s in SETTINGS if not s.gunicorn], environ), **FIXED}


def for_gunicorn(environ: Mapping[str, str] | None = None) -> dict:
    """Every setting, gunicorn's and the service's: read by gunicorn.conf.py in the master,
    so a bad value stops the start-up before a worker is forked."""
    return {**_read(SETTINGS, environ), **FIXED}


def _read(settings, environ) -> dict:
    environ = os.environ if environ is None else environ
    values, problems = {}, []
    for setting in settings:
        try:
            values[setting.name] = setting.read(environ)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise SettingsError(problems)
    return values


def problems(config: Mapping[str, Any]) -> list[str]:
    """The service's settings in ``config`` that are not allowed (an app's running
    configuration, test overrides included): names and rules, never values."""
    return [
        f"{s.name}: expected {s.rule}"
        for s in SETTINGS
        if not s.gunicorn and not s.allows(config.get(s.name))
    ]
