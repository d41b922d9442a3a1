"""JSON answers, including those built around JSON that PostgreSQL already rendered.

The hot reads get a job's JSON from the database as text (jobs.job_json) and
send it as it is; wrapping such fragments in an object is done here, once.
"""

from __future__ import annotations

import orjson
from flask import current_app


def json_response(body, status: int = 200, headers=None):
    """``body`` is JSON already (bytes or str) or a value orjson can serialise."""
    if not isinstance(body, bytes | str):
        body = orjson.dumps(body)
    return current_app.response_class(body, status, headers, content_type="application/json")


def json_with_fragments(fields: dict, status: int = 200, headers=None, **fragments: str | bytes):
    """An object of ``fields`` (serialised here) and ``fragments`` (JSON text, spliced as is).

    json_with_fragments({"job_id": 7}, events='[...]') -> {"job_id":7,"events":[...]}
    """
    parts = [orjson.dumps(fields)[:-1]] if fields else [b"{"]
    for name, fragment in fragments.items():
        if len(parts) > 1 or fields:
            parts.append(b",")
        raw = fragment.encode() if isinstance(fragment, str) else fragment
        parts.append(b'"%s":%s' % (name.encode(), raw))
    parts.append(b"}")
    return json_response(b"".join(parts), status, headers)


def no_content():
    return current_app.response_class(status=204)
