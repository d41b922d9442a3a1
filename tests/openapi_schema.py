"""OpenAPI 3.0 schema objects as JSON Schema, to validate bodies and values against
the service's document (test_openapi.py: real answers; test_bounded.py: refused input)."""

from __future__ import annotations

# Schema keywords of OpenAPI 3.0 that JSON Schema does not know (or that only annotate).
OAS_ONLY = {"nullable", "example", "discriminator", "xml", "externalDocs", "deprecated"}


def to_json_schema(node, components: dict):
    """An OpenAPI 3.0 schema object as a self-contained JSON Schema (draft 4)."""
    if isinstance(node, list):
        return [to_json_schema(item, components) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].removeprefix("#/components/schemas/")
        return to_json_schema(components[name], components)
    out = {}
    for key, value in node.items():
        if key in OAS_ONLY:
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub, components) for name, sub in value.items()}
        else:
            out[key] = to_json_schema(value, components)
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out
