"""The route registry: every route declared once, and the declaration does the work.

``@endpoint(rule, methods, ...)`` registers a view on the blueprint and keeps
what the rest of the service needs to know about it: who may call it
(auth.py), its path parameters, query and body (marshmallow schemas, parsed
here before the view runs and handed to it), the error codes it answers and
its *_ERROR code for database failures (errors.py), whether a replica may
answer it (db.read_on_replica), and what openapi.py turns into the OpenAPI
document. A view receives its parsed path parameters and
query values as keyword arguments, and its loaded body as ``body``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from jobs import db, parse
from jobs.errors import ApiError


@dataclass(frozen=True)
class Route:
    rule: str
    methods: tuple[str, ...]
    view: str
    access: str
    summary: str
    error_code: str
    path: type | None = None
    query: type | None = None
    query_error: str = parse.QUERY_ERROR
    body: type | None = None
    body_required: bool = True
    # A query parameter that names another form of the request than a body
    # (DELETE /jobs?status= vs a body of job_ids): both at once is a 400.
    body_excludes: str | None = None
    # An operator's read that a replica may answer (DATABASE_REPLICA_URL): its
    # view's cursors then come from a replica fresh enough, or from the primary
    # (db.read_on_replica). Never a write, nor what a worker acts on. A
    # function of the parsed arguments says it request by request.
    replica: bool | Callable[[dict], bool] = False
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
            # Every such route takes a pooled database connection: none free
            # within DB_POOL_TIMEOUT_S is an overload (errors.py), not an error.
            add(503, "SERVICE_BUSY")
        if self.body is not None or self.access != "open":
            # Every such route reads what body the request has (to refuse one it
            # does not take), with a size limit and a deadline.
            add(400, parse.INVALID_PAYLOAD)
            add(408, "REQUEST_TIMEOUT")
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

        def register(view):
            route = Route(
                rule, methods, view.__name__, access, summary, **declared, responses=dict(responses)
            )
            self.routes.append(route)
            self._by_endpoint[f"{self.blueprint.name}.{view.__name__}"] = route
            path_schema = route.path() if route.path else None
            query_schema = route.query() if route.query else None
            body_schema = route.body() if route.body else None

            @functools.wraps(view)
            def parsed(**path):
                # Cheap refusals first (an unknown parameter, a body where none
                # is taken), then the values in the order of the URL, then the body.
                if route.access != "open":
                    parse.check_query(route.query_names, route.query_error)
                    if body_schema is None:
                        parse.check_no_body()
                args = path_schema.load(path) if path_schema else {}
                if query_schema is not None:
                    args.update(query_schema.load(parse.query_values()))
                if body_schema is not None:
                    given = route.body_required or parse.has_body()
                    if given and args.get(route.body_excludes) is not None:
                        raise ApiError(
                            400,
                            route.query_error,
                            f"give either ?{route.body_excludes}= or a body with "
                            f"{', '.join(body_schema.fields)}, not both",
                        )
                    args["body"] = parse.load_body(body_schema) if given else None
                if route.replica is True or (callable(route.replica) and route.replica(args)):
                    return db.read_on_replica(lambda: view(**args))
                return view(**args)

            # OPTIONS is not one of our methods: a JSON 405, not Flask's empty HTML 200.
            parsed.provide_automatic_options = False
            self.blueprint.add_url_rule(rule, view_func=parsed, methods=list(methods))
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
