"""Routes declared once: the blueprint, their access level, their error code,
and the OpenAPI 3 document generated (apispec) from the marshmallow schemas
that validate and serialise them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from schemas import MAX_JOB_ID, ErrorSchema, FileSchema, JobId

HTTP_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    413: "Payload Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass
class Route:
    rule: str
    methods: tuple[str, ...]
    view: str
    access: str
    error_code: str
    summary: str
    params: list = field(default_factory=list)
    query: type | None = None
    body: type | None = None
    responses: dict = field(default_factory=dict)


class EndpointRegistry:
    """``@endpoint(rule, methods, ...)`` registers a view on the blueprint and documents it."""

    def __init__(self, blueprint):
        self.blueprint = blueprint
        self.routes: list[Route] = []
        self._by_endpoint: dict[str, Route] = {}
        self._document = None

    def __call__(
        self,
        rule,
        methods,
        *,
        access,
        summary,
        responses,
        error_code="INTERNAL_ERROR",
        params=(),
        query=None,
        body=None,
    ):
        methods = (methods,) if isinstance(methods, str) else tuple(methods)

        def register(view):
            route = Route(
                rule,
                methods,
                view.__name__,
                access,
                error_code,
                summary,
                list(params),
                query,
                body,
                dict(responses),
            )
            self.routes.append(route)
            self._by_endpoint[f"{self.blueprint.name}.{view.__name__}"] = route
            self.blueprint.add_url_rule(rule, view_func=view, methods=list(methods))
            return view

        return register

    def access_of(self, endpoint: str | None) -> str | None:
        route = self._by_endpoint.get(endpoint)
        return route.access if route else None

    def error_code_of(self, endpoint: str | None) -> str:
        route = self._by_endpoint.get(endpoint)
        return route.error_code if route else "INTERNAL_ERROR"


def document(registry: EndpointRegistry) -> dict:
    if registry._document is None:
        registry._document = _build(registry)
    return registry._document


def _build(registry: EndpointRegistry) -> dict:
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="Jobs service",
        version="1.0.0",
        openapi_version="3.0.3",
        plugins=[plugin],
        info={"description": "See, stop, clean up and follow extraction jobs."},
    )
    plugin.converter.field_mapping[JobId] = ("integer", None)
    plugin.converter.add_attribute_function(_job_id_range)
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.schema("Error", schema=ErrorSchema)
    spec.components.schema("File", schema=FileSchema)

    paths: dict[str, dict] = {}
    for route in registry.routes:
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", route.rule)
        for method in route.methods:
            operation = _operation(route)
            if method != route.methods[0]:
                # operationIds are unique in a document: an alias method gets its own.
                operation["operationId"] = f"{route.view}_{method.lower()}"
            paths.setdefault(path, {})[method.lower()] = operation
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()


def _job_id_range(self, field, ret=None, **kwargs) -> dict:
    # A job ID outside 1..2^63-1 is refused (400): say so, as the path parameters do.
    return {"minimum": 1, "maximum": MAX_JOB_ID} if isinstance(field, JobId) else {}


def _operation(route: Route) -> dict:
    op: dict = {"summary": route.summary, "operationId": route.view}
    parameters = list(route.params)
    if route.query is not None:
        parameters.append({"in": "query", "schema": route.query})
    if parameters:
        op["parameters"] = parameters
    if route.body is not None:
        op["requestBody"] = {
            "required": route.rule != "/jobs" or "POST" in route.methods,
            "content": {"application/json": {"schema": _body_schema(route.body)}},
        }
    responses = dict(route.responses)
    if route.access != "open":
        responses.setdefault(401, ErrorSchema)
        if route.access == "admin":
            responses.setdefault(403, ErrorSchema)
        op["security"] = [{"bearer": []}]
    if route.body is not None:
        responses.setdefault(413, ErrorSchema)
        responses.setdefault(400, ErrorSchema)
    if route.access != "open" or route.error_code != "INTERNAL_ERROR":
        responses.setdefault(500, ErrorSchema)
    op["responses"] = {
        str(code): _response(code, schema) for code, schema in sorted(responses.items())
    }
    return op


def _body_schema(schema):
    # A batch of files arrives as one object or as an array: document both.
    if schema.__name__ == "FileBatchSchema":
        return {
            "oneOf": [
                {"$ref": "#/components/schemas/File"},
                {
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/File"},
                    "minItems": 1,
                    "maxItems": 1000,
                },
            ]
        }
    return schema


def _response(code: int, schema) -> dict:
    response = {"description": HTTP_REASONS.get(code, str(code))}
    if isinstance(schema, dict):  # a content map already: {"text/plain": {"schema": ...}}
        response["content"] = schema
    elif schema is not None:
        response["content"] = {"application/json": {"schema": schema}}
    return response
