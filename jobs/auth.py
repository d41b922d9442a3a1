"""Who may call what: bearer tokens mapped to roles, and the check every request passes.

ADMIN_TOKEN unset: the service is open (create_app warns at start-up).
ADMIN_TOKEN set: every non-open route needs a Bearer token; WORKER_TOKEN, when
also set, opens only the routes declared "read" or "worker".
"""

from __future__ import annotations

import hmac

from flask import current_app, request

from jobs.errors import error_response

# A route's declared access -> the roles that may use it (None: no token).
ROLE_GRANTS = {
    "open": {None, "worker", "admin"},
    "read": {"worker", "admin"},
    "worker": {"worker", "admin"},
    "admin": {"admin"},
}


def caller_role(authorization: str, admin_token: str, worker_token: str | None) -> str | None:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    presented = token.strip().encode()
    # Both comparisons always run, so timing tells nothing about which matched.
    is_admin = hmac.compare_digest(presented, admin_token.encode())
    is_worker = bool(worker_token) and hmac.compare_digest(presented, worker_token.encode())
    if is_admin:
        return "admin"
    return "worker" if is_worker else None


def refusal(access: str | None):
    """None when the request may use a route of ``access``, else the 401/403 answer."""
    admin_token = current_app.config["ADMIN_TOKEN"]
    if access is None or access == "open" or not admin_token:
        return None
    role = caller_role(
        request.headers.get("Authorization", ""), admin_token, current_app.config["WORKER_TOKEN"]
    )
    if role is None:
        return error_response(
            401, "UNAUTHORIZED", "a valid Bearer token is required", {"WWW-Authenticate": "Bearer"}
        )
    if role not in ROLE_GRANTS[access]:
        return error_response(403, "FORBIDDEN", "this token may not use this route")
    return None
