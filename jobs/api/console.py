"""The operator's console at /ui/ (docs/API.md, Console): static files, sent as they are.

HTML, CSS and plain JavaScript modules from jobs/console/. The page is open
like /healthz: it holds no data, and every API call it makes carries the
operator's token. Only the files named in CONSOLE_FILES are served: a name is
a key of that dict or a JSON 404, never a path on disk.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from flask import current_app, request
from marshmallow import Schema

from jobs.api import api, endpoint
from jobs.errors import ApiError
from jobs.schemas import Param

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
CONSOLE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "dom.js": "text/javascript; charset=utf-8",
    "follow.js": "text/javascript; charset=utf-8",
    "views.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Its own scripts, styles and API only: no inline script or style, no eval, no
# other origin, never framed. Sent on every /ui answer, errors included.
CONSOLE_HEADERS = {
    "Content-Security-Policy": "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "img-src 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "form-action 'self'",
        ]
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load against the ETag: a deploy shows at once, and
    # an unchanged file costs a 304 without a body.
    "Cache-Control": "no-cache",
}


def console_file_name(name: str) -> str:
    if name not in CONSOLE_FILES:
        raise ApiError(404, "NOT_FOUND", "the console has no file of that name")
    return name


class ConsoleFilePath(Schema):
    name = Param(
        console_file_name, {"type": "string", "enum": sorted(CONSOLE_FILES)}, required=True
    )


def _console_content(names) -> dict:
    media = sorted({CONSOLE_FILES[n].split(";")[0] for n in names})
    return {m: {"schema": {"type": "string"}} for m in media}


def console_file(name: str):
    body = (CONSOLE_DIR / name).read_bytes()
    response = current_app.response_class(body, 200, content_type=CONSOLE_FILES[name])
    response.set_etag(hashlib.sha256(body).hexdigest()[:32])
    return response.make_conditional(request)


@endpoint(
    "/ui/",
    "GET",
    access="open",
    summary="The operator's console (a page in the browser; docs/API.md, Console)",
    responses={200: _console_content(["index.html"]), 304: None},
)
def console_index():
    return console_file("index.html")


@endpoint(
    "/ui/<name>",
    "GET",
    access="open",
    summary="One of the console's static files",
    path=ConsoleFilePath,
    responses={200: _console_content(CONSOLE_FILES), 304: None},
    errors={404: "NOT_FOUND"},
)
def console_asset(name):
    return console_file(name)


@api.after_app_request
def console_headers(response):
    path = request.path
    if path == "/ui" or path.startswith("/ui/"):
        response.headers.update(CONSOLE_HEADERS)
    return response
