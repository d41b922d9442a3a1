"""The HTTP API: one blueprint, every route declared once through ``endpoint``.

A module per resource: jobs.py (jobs, their moves, events and deletes),
files.py (files and progress), workers.py (workers and heartbeats), ops.py
(health, readiness, metrics, the OpenAPI document). Each view reads as: the
declaration parses its input (registry.py), the view calls the store, and
maps the store's outcome to an answer.
"""

from flask import Blueprint

from jobs.api.registry import EndpointRegistry

api = Blueprint("api", __name__)
endpoint = EndpointRegistry(api)

# The route modules declare their routes on import (flaskr's pattern: the
# blueprint first, then the modules that use it).
from jobs.api import console, files, jobs, ops, workers  # noqa: E402, F401
