"""docs/API.md, the repository's own reference, against what the service serves.

Every operation of /openapi.json has its heading in the reference, every error
code the document declares is spelt there, and nothing in the repository
points at a specification outside it: the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from app import create_app

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = (ROOT / "docs" / "API.md").read_text()


@pytest.fixture(scope="module")
def document():
    return create_app({"TESTING": True}).test_client().get("/openapi.json").get_json()


def operations(document):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def test_every_operation_has_its_heading(document):
    headings = set(re.findall(r"^### (\S+ /\S*)$", REFERENCE, re.MULTILINE))
    missing = {f"{m} {p}" for m, p, _ in operations(document)} - headings
    assert not missing, sorted(missing)


def test_every_error_code_is_documented(document):
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", REFERENCE))
    declared = {
        code
        for _, _, operation in operations(document)
        for response in operation["responses"].values()
        for code in response.get("content", {})
        .get("application/json", {})
        .get("schema", {})
        .get("properties", {})
        .get("error_code", {})
        .get("enum", [])
    }
    assert declared, "the document declares no error codes"
    assert not declared - documented, sorted(declared - documented)


def test_each_route_section_names_its_own_error_codes(document):
    for method, path, operation in operations(document):
        section = route_section(f"{method} {path}")
        for status, response in operation["responses"].items():
            schema = response.get("content", {}).get("application/json", {}).get("schema", {})
            for code in schema.get("properties", {}).get("error_code", {}).get("enum", []):
                generic = code in GENERIC_CODES
                assert generic or f"`{code}`" in section, (method, path, status, code)


# Answered by every route of a kind, and documented once under Conventions.
GENERIC_CODES = {
    "UNAUTHORIZED",
    "FORBIDDEN",
    "PAYLOAD_TOO_LARGE",
    "REQUEST_TIMEOUT",
    "SERVICE_BUSY",
    "INVALID_PAYLOAD_FORMAT",
    "INVALID_QUERY_PARAMETERS",
    "INVALID_QUERY_PARAM",
}


def route_section(heading: str) -> str:
    match = re.search(
        rf"^### {re.escape(heading)}$(.*?)(?=^##? |^### |\Z)", REFERENCE, re.MULTILINE | re.DOTALL
    )
    assert match, heading
    alias = re.search(r"alias of \[`([A-Z]+ /\S+)`\]", match.group(1))
    return route_section(alias.group(1)) if alias else match.group(1)


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(
        ["git", "grep", "-n", "-I", "-E", r"\.\./shared|CONTRACT\.md", "--", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if tracked.returncode not in (0, 1):
        pytest.skip("not a git checkout")
    # The pattern, spelt with backslashes, does not match this file.
    lines = tracked.stdout.splitlines()
    assert not lines, lines
