"""Every error is JSON: {"error_code": "SCREAMING_SNAKE", "error_message": "human text"}.

Routes raise ApiError with one of the codes their registry entry declares.
Database failures answer the route's declared *_ERROR code with a generic
message; what PostgreSQL said goes to the log only. Overload, no pooled
connection free within DB_POOL_TIMEOUT_S, is not a database failure: 503
SERVICE_BUSY with Retry-After, a warning, and jobs_overload_total. Nothing here ever puts a
stack trace, SQL text or a token in a response.
"""

from __future__ import annotations

import contextlib
import logging

import psycopg2
from flask import request
from werkzeug.exceptions import HTTPException

from jobs import observability
from jobs.pool import PoolExhausted
from jobs.responses import json_response

log = logging.getLogger("jobs")


class ApiError(Exception):
    """An answer from the route's declared set of errors."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers


class DatabaseFailure(Exception):
    """A database error that answers ``code`` rather than the route's usual one."""

    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


def error_body(code: str, message: str) -> dict:
    """The one error shape, also written by gunicorn's own refusals (gunicorn.conf.py)."""
    return {"error_code": code, "error_message": message}


def error_response(status: int, code: str, message: str, headers=None):
    return json_response(error_body(code, message), status, headers)


@contextlib.contextmanager
def database_errors_answer(code: str):
    """Database errors inside the block answer 500 ``code`` (a route with two forms)."""
    try:
        yield
    except psycopg2.Error as exc:
        raise DatabaseFailure(code) from exc


# Werkzeug's errors that reach the app, spelled as our codes.
HTTP_ERROR_CODES = {
    400: "BAD_REQUEST",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    414: "URI_TOO_LONG",
}


# What a 503 SERVICE_BUSY tells the client to wait before trying again
# (docs/API.md, Overload: then back off, doubling, with jitter).
RETRY_AFTER_S = 1


def handle_service_busy(exc: PoolExhausted):
    route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    observability.count_overload(route)
    log.warning(
        "service busy",
        extra={"fields": {"error": type(exc).__name__, "route": route, "waited_s": exc.waited_s}},
    )
    return error_response(
        503,
        "SERVICE_BUSY",
        f"the service is busy (no database connection free within {exc.waited_s:g} s); "
        "retry after the Retry-After header's seconds",
        {"Retry-After": str(RETRY_AFTER_S)},
    )


def handle_api_error(exc: ApiError):
    return error_response(exc.status, exc.code, exc.message, exc.headers)


def handle_http_error(exc: HTTPException):
    code = HTTP_ERROR_CODES.get(exc.code, (exc.name or "HTTP_ERROR").upper().replace(" ", "_"))
    message = exc.description or exc.name
    if exc.code == 413:
        message = "request body is larger than 1 MiB"
    headers = {k: v for k, v in exc.get_headers() if k.lower() == "allow"}
    return error_response(exc.code or 500, code, message, headers)


def init_app(app, error_code_of) -> None:
    """Register the handlers; ``error_code_of(endpoint)`` is a route's declared *_ERROR."""

    def handle_database_error(exc: psycopg2.Error):
        _log_database_error(exc)
        return error_response(
            500, error_code_of(request.endpoint), "database error; the request was not completed"
        )

    def handle_database_failure(exc: DatabaseFailure):
        _log_database_error(exc.__cause__)
        return error_response(500, exc.code, "database error; the request was not completed")

    def handle_unexpected_error(exc: Exception):
        log.exception("unhandled error")
        return error_response(
            500, error_code_of(request.endpoint), "internal error; the request was not completed"
        )

    app.register_error_handler(ApiError, handle_api_error)
    app.register_error_handler(PoolExhausted, handle_service_busy)
    app.register_error_handler(HTTPException, handle_http_error)
    app.register_error_handler(DatabaseFailure, handle_database_failure)
    app.register_error_handler(psycopg2.Error, handle_database_error)
    app.register_error_handler(Exception, handle_unexpected_error)


def _log_database_error(exc) -> None:
    text = str(exc).strip() if exc is not None else ""
    log.error(
        "database error",
        extra={
            "fields": {
                "error": type(exc).__name__,
                "pgcode": getattr(exc, "pgcode", None),
                "detail": text.splitlines()[0] if text else "",
            }
        },
    )
