"""The route registry: every route declared once, consulted by every request.

``@endpoint(rule, methods, ...)`` registers a view on the blueprint and keeps
what the rest of the service needs to know about it: who may call it
(auth.py), the query parameters and body it takes (checked before the view
runs), the error codes it answers and its *_ERROR code for database failures
(errors.py), and what openapi.py turns into the OpenAPI document.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import parse

# Codes every route of a kind may answer, so each declaration lists only its own.
QUERY_ERROR = "INVALID_QUERY_PARAMETERS"


@dataclass(frozen=True)
class Route:
    rule: str
    methods: tuple[str, ...]
    view: str
    access: str
    summary: str
    error_code: str
    params: tuple = ()
    query: type | None = None
    query_error: str = QUERY_ERROR
    body: type | None = None
    body_required: bool = True
    responses: dict = field(default_factory=dict)
    errors: dict[int, tuple[str, ...]] = field(default_factory=dict)

    @property
    def query_names(self) -> frozenset[str]:
        return frozenset(self.query._declared_fields) if self.query else frozenset()

    def error_codes(self) -> dict[int, tuple[str, ...]]:
        """Every error code this route can answer, by HTTP status (the declared ones first)."""
        codes = {status: list(declared) for status, declared in self.errors.items()}

        def add(status: int, code: str) -> None:
            listed = codes.setdefault(status, [])
            if code not in listed:
                listed.append(code)

        if self.access != "open":
            add(400, self.query_error)
            add(401, "UNAUTHORIZED")
            if self.access == "admin":  # the worker token is refused here
                add(403, "FORBIDDEN")
            add(500, self.error_code)
        if self.body is not None or self.access != "open":
            add(400, parse.INVALID_PAYLOAD)
            add(413, "PAYLOAD_TOO_LARGE")
        return {status: tuple(listed) for status, listed in sorted(codes.items())}


class EndpointRegistry:
    def __init__(self, blueprint):
        self.blueprint = blueprint
        self.routes: list[Route] = []
        self._by_endpoint: dict[str, Route] = {}

    def __call__(self, rule, methods, *, access, summary, responses, **declared):
        methods = (methods,) if isinstance(methods, str) else tuple(methods)
        declared["errors"] = {
            status: (codes,) if isinstance(codes, str) else tuple(codes)
            for status, codes in declared.get("errors", {}).items()
        }
        declared.setdefault("error_code", "INTERNAL_ERROR")
        declared["params"] = tuple(declared.get("params", ()))

        def register(view):
            route = Route(
                rule, methods, view.__name__, access, summary, **declared, responses=dict(responses)
            )
            self.routes.append(route)
            self._by_endpoint[f"{self.blueprint.name}.{view.__name__}"] = route

            @functools.wraps(view)
            def checked(**path):
                if route.access != "open":
                    parse.check_query(route.query_names, route.query_error)
                    if route.body is None:
                        parse.check_no_body()
                return view(**path)

            # OPTIONS is not one of our methods: a JSON 405, not Flask's empty HTML 200.
            checked.provide_automatic_options = False
            self.blueprint.add_url_rule(rule, view_func=checked, methods=list(methods))
            return view

        return register

    def route_of(self, endpoint: str | None) -> Route | None:
        return self._by_endpoint.get(endpoint)

    def access_of(self, endpoint: str | None) -> str | None:
        route = self._by_endpoint.get(endpoint)
        return route.access if route else None

    def error_code_of(self, endpoint: str | None) -> str:
        route = self._by_endpoint.get(endpoint)
        return route.error_code if route else "INTERNAL_ERROR"
