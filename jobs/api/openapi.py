"""The OpenAPI 3 document, built (apispec) from the route registry and the
marshmallow schemas that validate and serialise every route."""

from __future__ import annotations

import inspect
import re
from http import HTTPStatus

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import validate
from marshmallow.decorators import VALIDATES_SCHEMA

from jobs.api.registry import EndpointRegistry, Route
from jobs.domain import MAX_BATCH, MAX_JOB_ID
from jobs.schemas import ErrorSchema, FileSchema, JobId, Param, no_nul

_documents: dict[int, dict] = {}


def document(registry: EndpointRegistry) -> dict:
    """The document of ``registry``'s routes, built once per registry."""
    built = _documents.get(id(registry))
    if built is None:
        built = _documents[id(registry)] = _build(registry)
    return built


def _build(registry: EndpointRegistry) -> dict:
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="Jobs service",
        version="1.0.0",
        openapi_version="3.0.3",
        plugins=[plugin],
        info={"description": "See, stop, clean up and follow extraction jobs. See docs/API.md."},
    )
    plugin.converter.field_mapping[JobId] = ("integer", None)
    plugin.converter.add_attribute_function(_job_id_range)
    plugin.converter.add_attribute_function(_param_doc)
    plugin.converter.add_attribute_function(_nul_free)
    _describe_rules(plugin.converter)
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


def _param_doc(self, field, ret=None, **kwargs) -> dict:
    # A path or query value: what its rule (parse.py) accepts.
    return dict(field.openapi) if isinstance(field, Param) else {}


def _nul_free(self, field, ret=None, **kwargs) -> dict:
    # Strings cannot hold U+0000 (schemas.no_nul); fields with a pattern of
    # their own exclude it already.
    validators = getattr(field, "validators", ())
    if no_nul in validators and not any(isinstance(v, validate.Regexp) for v in validators):
        return {"pattern": "^[^\\u0000]*$"}
    return {}


def rules_of(schema) -> list[str]:
    """The rules a schema checks across its fields: its @validates_schema methods' docstrings.

    Read from the code that enforces them, so that the document follows it.
    """
    cls = schema if isinstance(schema, type) else type(schema)
    rules = []
    for name, *_ in cls._hooks.get(VALIDATES_SCHEMA, ()):
        doc = inspect.getdoc(getattr(cls, name))
        if doc:
            rules.append(" ".join(doc.split()))
    return rules


def _describe_rules(converter) -> None:
    """Each object schema's description carries its cross-field rules (rules_of)."""
    to_jsonschema = converter.schema2jsonschema

    def with_rules(schema):
        out = to_jsonschema(schema)
        rules = rules_of(schema)
        if rules:
            described = [out["description"]] if out.get("description") else []
            out["description"] = " ".join([*described, *rules])
        return out

    converter.schema2jsonschema = with_rules


def _reason(code: int) -> str:
    return HTTPStatus(code).phrase


def _operation(route: Route) -> dict:
    op: dict = {"summary": route.summary, "operationId": route.view}
    parameters = []
    if route.path is not None:
        parameters.append({"in": "path", "schema": route.path})
    if route.query is not None:
        parameters.append({"in": "query", "schema": route.query})
    if parameters:
        op["parameters"] = parameters
    if route.body is not None:
        schema = _body_schema(route.body)
        if not route.body_required:
            # An optional body may also be null, which says nothing (docs/API.md, Conventions).
            schema = {"oneOf": [schema, {"nullable": True, "enum": [None]}]}
        op["requestBody"] = {
            "required": route.body_required,
            "content": {"application/json": {"schema": schema}},
        }
    if route.access != "open":
        op["security"] = [{"bearer": []}]
    responses = {code: _response(code, schema) for code, schema in route.responses.items()}
    for code, error_codes in route.error_codes().items():
        responses[code] = _error_response(code, error_codes)
    op["responses"] = {str(code): responses[code] for code in sorted(responses)}
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
                    "maxItems": MAX_BATCH,
                    "description": " ".join(rules_of(schema)),
                },
            ]
        }
    return schema


def _response(code: int, schema) -> dict:
    response = {"description": _reason(code)}
    if isinstance(schema, dict):  # a content map already: {"text/plain": {"schema": ...}}
        response["content"] = schema
    elif schema is not None:
        response["content"] = {"application/json": {"schema": schema}}
    return response


def _error_response(code: int, error_codes: tuple[str, ...]) -> dict:
    """The Error shape, with the error codes this route answers at this status."""
    response = {
        "description": f"{_reason(code)}: {', '.join(error_codes)}",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["error_code", "error_message"],
                    "properties": {
                        "error_code": {"type": "string", "enum": list(error_codes)},
                        "error_message": {"type": "string"},
                    },
                    "additionalProperties": False,
                }
            }
        },
    }
    if "SERVICE_BUSY" in error_codes:
        response["headers"] = {
            "Retry-After": {
                "description": "seconds to wait before trying again (then back off)",
                "schema": {"type": "integer", "minimum": 1},
            }
        }
    return response
