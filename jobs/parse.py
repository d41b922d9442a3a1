"""A request's path, query and body turned into validated values, or a 400.

Everything here runs before the database is touched, so invalid input gets
the same answer while the database is down.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import decimal
import json
import re

import orjson
from flask import current_app, request
from marshmallow import ValidationError
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge

from jobs.domain import (
    ATTEMPT_RULE,
    DELETE_STATUS_TOKENS,
    JOB_ID_RULE,
    LIST_STATUS_TOKENS,
    MAX_EVENTS_PAGE,
    MAX_PAGE_SIZE,
    MAX_WAIT_S,
    NODE_ID_RULE,
    TABLE_PATTERN,
    TIMESTAMP_PATTERN,
    is_node_id,
    is_table_name,
    parse_attempt,
    parse_job_id,
    parse_status_tokens,
)
from jobs.errors import ApiError
from jobs.store.workers import WorkerPosition

INVALID_PAYLOAD = "INVALID_PAYLOAD_FORMAT"
QUERY_ERROR = "INVALID_QUERY_PARAMETERS"
LONG_NUMBER = re.compile(rb"\d{20}")
WAIT_SECONDS = re.compile(r"0|[1-9][0-9]?")
MAX_JSON_DEPTH = 100
WORKER_CURSOR_TIMESTAMP = re.compile(TIMESTAMP_PATTERN, re.ASCII)


def job_id_from_path(text: str) -> int:
    return _job_id(text, "INVALID_JOB_ID", "job id")


def event_id_from_path(text: str) -> int:
    """An event ID follows the job ID rule (and answers the same code, as the reference does)."""
    return _job_id(text, "INVALID_JOB_ID", "event id")


def cursor_from_query(text: str) -> int:
    """``last_job_id``: the page holds only jobs with a smaller id."""
    return _job_id(text, QUERY_ERROR, "last_job_id")


def after_from_query(text: str) -> int:
    """``after``: only events with a larger id (an event id, by the job ID rule)."""
    return _job_id(text, QUERY_ERROR, "after")


def last_event_id_from_header(text: str) -> int:
    """The Last-Event-ID header of a follow stream's reconnection: the same rule as ``after``."""
    return _job_id(text.strip(), QUERY_ERROR, "Last-Event-ID")


def _job_id(text: str, code: str, name: str) -> int:
    job_id = parse_job_id(text)
    if job_id is None:
        raise ApiError(400, code, f"{name} must be {JOB_ID_RULE}")
    return job_id


def worker_id_from_path(text: str) -> str:
    return _node_id(text, "INVALID_WORKER_ID", "worker id")


def node_id_from_query(text: str) -> str:
    return _node_id(text, QUERY_ERROR, "node_id")


def attempt_from_query(text: str) -> int:
    """``?attempt=`` of a file registration: the attempt the worker runs."""
    attempt = parse_attempt(text)
    if attempt is None:
        raise ApiError(400, QUERY_ERROR, f"attempt must be {ATTEMPT_RULE}")
    return attempt


def _node_id(text: str, code: str, name: str) -> str:
    if not is_node_id(text):
        raise ApiError(400, code, f"{name} must be {NODE_ID_RULE}")
    return text


def table_from_path(text: str) -> str:
    if not is_table_name(text):
        raise ApiError(400, INVALID_PAYLOAD, f"table must match {TABLE_PATTERN}")
    return text


def limit_from_query(text: str) -> int:
    return _limit(text, MAX_PAGE_SIZE)


def events_limit_from_query(text: str) -> int:
    """GET /jobs/{id}/events?limit=: the same rule and codes as GET /jobs's, to its own maximum."""
    return _limit(text, MAX_EVENTS_PAGE)


def _limit(text: str, maximum: int) -> int:
    stripped = text.strip()
    digits = stripped.lstrip("+-")
    if not digits.isdigit() or not digits.isascii() or len(stripped) - len(digits) > 1:
        raise ApiError(400, QUERY_ERROR, "limit must be an integer")
    # No int() before the length check: a 5000-digit limit would raise (a 500).
    if stripped.startswith("-") or not digits.strip("0"):
        raise ApiError(400, "LIMIT_INVALID", "limit must be at least 1")
    if len(digits) > 6 or int(digits) > maximum:
        raise ApiError(400, "LIMIT_TOO_LARGE", f"limit must be at most {maximum}")
    return int(digits)


def wait_from_query(text: str) -> int:
    """``wait``: whole seconds, 0..MAX_WAIT_S, spelt as an integer is (no sign, no leading zero)."""
    if not WAIT_SECONDS.fullmatch(text) or int(text) > MAX_WAIT_S:
        raise ApiError(
            400, QUERY_ERROR, f"wait must be a whole number of seconds in 0..{MAX_WAIT_S}"
        )
    return int(text)


def follow_from_query(text: str) -> bool:
    """``follow``: true or false, as JSON spells them."""
    if text not in ("true", "false"):
        raise ApiError(400, QUERY_ERROR, "follow must be true or false")
    return text == "true"


def check_follow_alone(query: dict[str, str], excluded: tuple[str, ...]) -> None:
    """A follow stream has no pages and no timeout: a parameter it would ignore is refused."""
    if query.get("follow") != "true":
        return
    for name in excluded:
        if name in query:
            raise ApiError(400, QUERY_ERROR, f"{name} cannot be combined with follow=true")


def worker_cursor_from_query(text: str) -> WorkerPosition:
    """GET /workers?cursor=: a next_cursor this service gave (worker_cursor), as it was."""
    try:
        decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        registered_at, node_id = decoded.split(" ", 1)
        # The format alone would let 2026-13-45 through to PostgreSQL (a 500).
        datetime.datetime.strptime(registered_at, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        registered_at = node_id = ""
    if not (WORKER_CURSOR_TIMESTAMP.fullmatch(registered_at) and is_node_id(node_id)):
        raise ApiError(
            400, QUERY_ERROR, "cursor must be a next_cursor of GET /workers, passed as it is"
        )
    return WorkerPosition(registered_at, node_id)


def worker_cursor(position: WorkerPosition) -> str:
    """The opaque next_cursor of GET /workers: where its page ended."""
    text = f"{position.registered_at} {position.node_id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def list_statuses_from_query(text: str) -> tuple[str, ...]:
    """GET /jobs?status=: a union of status tokens (active jobs when absent)."""
    return _statuses(text, LIST_STATUS_TOKENS, QUERY_ERROR)


def delete_statuses_from_query(text: str) -> tuple[str, ...]:
    """DELETE /jobs?status=: terminal statuses only."""
    return _statuses(text, DELETE_STATUS_TOKENS, "INVALID_QUERY_PARAM")


def _statuses(text: str, tokens: dict, code: str) -> tuple[str, ...]:
    try:
        return parse_status_tokens(text, tokens)
    except ValueError as exc:
        raise ApiError(400, code, str(exc)) from None


def query_values() -> dict[str, str]:
    """The query's parameters (check_query has refused repeated ones)."""
    return request.args.to_dict()


def check_query(allowed: frozenset[str], code: str) -> None:
    """Refuse query parameters a route does not take, and any given twice.

    A misspelt or repeated parameter silently ignored (or decided by its first
    value) answers something the caller did not ask for.
    """
    if not request.environ.get("QUERY_STRING"):
        return  # most requests: nothing to parse
    args = request.args
    for name in args:
        if name not in allowed:
            takes = ", ".join(sorted(allowed)) or "none"
            raise ApiError(
                400, code, f"unknown query parameter {name!r} (this route takes: {takes})"
            )
        if len(args.getlist(name)) > 1:
            raise ApiError(400, code, f"query parameter {name!r} is given more than once")


def request_body() -> bytes:
    """The raw body, refused when too large, truncated, malformed or too slow on the wire."""
    declared = request.content_length
    try:
        with body_deadline():
            raw = request.get_data(cache=True)
    except BodyTooSlow:
        raise ApiError(
            408,
            "REQUEST_TIMEOUT",
            f"request body not received within {current_app.config['BODY_READ_TIMEOUT_S']:g} s",
            # The rest of the body may still be on its way: not a connection to keep.
            {"Connection": "close"},
        ) from None
    except ClientDisconnected:
        # Werkzeug's word for a body cut short (chunked or not): never acted on
        # as if it were complete, or empty.
        cut = "is shorter than its Content-Length" if declared is not None else "was cut short"
        raise ApiError(400, INVALID_PAYLOAD, f"request body {cut}") from None
    except HTTPException:
        raise
    except Exception:
        # The server's reader failed (a malformed chunk, a connection cut mid-body).
        raise ApiError(400, INVALID_PAYLOAD, "request body could not be read") from None
    if declared is not None and len(raw) != declared:
        raise ApiError(400, INVALID_PAYLOAD, "request body is shorter than its Content-Length")
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    # A chunked body (no Content-Length): Werkzeug stops reading at the limit and
    # hands over what it read; one more byte on the wire means it was too large.
    if declared is None and limit is not None and len(raw) >= limit:
        try:
            more = request.environ["wsgi.input"].read(1)
        except Exception:
            more = b"?"
        if more:
            raise RequestEntityTooLarge()
    return raw


class BodyTooSlow(Exception):
    """The body did not arrive within BODY_READ_TIMEOUT_S (settings.py)."""


def body_deadline():
    """A deadline on reading the body where gevent runs the server (a no-op elsewhere:
    the test client's body is in memory)."""
    try:
        from gevent import Timeout, monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return contextlib.nullcontext()
    if not monkey.is_module_patched("socket"):
        return contextlib.nullcontext()
    return Timeout(current_app.config["BODY_READ_TIMEOUT_S"], BodyTooSlow)


def check_no_body() -> None:
    """A route that takes no body refuses one that says something (empty, {} and null pass)."""
    if not body_announced():
        return  # a request without Content-Length or chunked encoding has no body
    if has_body():
        raise ApiError(400, INVALID_PAYLOAD, "this route takes no request body")


def body_announced() -> bool:
    environ = request.environ
    return environ.get("CONTENT_LENGTH", "") not in ("", "0") or bool(
        environ.get("HTTP_TRANSFER_ENCODING")
    )


def has_body() -> bool:
    """Whether the request says anything in its body: empty, {} and null say nothing."""
    return request_body().strip() not in (b"", b"{}", b"null")


def load_body(schema):
    """Parse the request body as JSON (whatever its Content-Type) into ``schema``."""
    raw = request_body()
    if not raw.strip():
        raise ApiError(400, INVALID_PAYLOAD, "request body is empty; JSON expected")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, INVALID_PAYLOAD, f"request body is not valid JSON: {exc}") from None
    # Checked before anything walks the document recursively (the stdlib
    # parser below, the schemas' checks), which a deeper one would exhaust.
    depth, fractions = json_shape(data)
    if depth > MAX_JSON_DEPTH:
        raise ApiError(
            400, INVALID_PAYLOAD, f"request body is nested deeper than {MAX_JSON_DEPTH} levels"
        )
    if fractions or LONG_NUMBER.search(raw):
        # orjson reads a fraction as a double (0.30000000000000000000000000000001
        # became 0.3) and an integer beyond 64 bits as a double too, silently
        # losing digits of a descriptor; the stdlib keeps both exact (Decimal,
        # int), as PostgreSQL's numeric does. orjson has already refused what
        # is not strict JSON (NaN, lone surrogates) and numbers beyond a double.
        data = None  # not held while the body is parsed again (up to ~30x its size)
        data = json.loads(raw, parse_float=decimal.Decimal)
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise ApiError(400, INVALID_PAYLOAD, describe_validation_error(exc.messages)) from None


def json_shape(value) -> tuple[int, bool]:
    """How deeply arrays and objects nest in a parsed JSON document, and whether it
    holds a fraction (a float), without recursion."""
    deepest, fractions, pending = 0, False, [(value, 0)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict):
            value = value.values()
        elif isinstance(value, list):
            pass
        else:
            fractions = fractions or type(value) is float
            continue
        deepest = max(deepest, depth + 1)
        pending.extend((item, depth + 1) for item in value)
    return deepest, fractions


def describe_validation_error(messages, prefix: str = "") -> str:
    """Flatten marshmallow's nested messages into 'field: problem; other: problem'."""
    if isinstance(messages, dict):
        parts = []
        for key, value in messages.items():
            if key == "_schema":
                name = prefix or "body"
            elif isinstance(key, int):
                name = f"{prefix}[{key}]"
            else:
                name = f"{prefix}.{key}" if prefix else str(key)
            parts.append(describe_validation_error(value, name))
        return "; ".join(parts)
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return f"{prefix or 'body'}: {' '.join(messages)}"
    if isinstance(messages, list):
        return "; ".join(describe_validation_error(m, prefix) for m in messages)
    return f"{prefix or 'body'}: {messages}"
