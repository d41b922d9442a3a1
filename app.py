"""The Jobs service: see, stop, clean up and follow extraction jobs.

``create_app`` configures and wires; the service lives in the package ``jobs``:

- ``jobs/api/``: the blueprint and its routes, a module per resource; each
  route is declared once (registry.py: access, input, answers, error codes),
  and openapi.py builds the OpenAPI document from those declarations.
- ``jobs/store/``: every SQL statement, one function per statement, taking the
  caller's cursor and returning a named outcome (session.py: the connection's
  own statements, for pool.py, replicas.py and init-db).
- ``jobs/domain.py``: statuses, the status machine, lease moves, id rules.
- ``jobs/schemas.py``: every request and response shape (marshmallow).
- ``jobs/chores/``: housekeeping after responses (lease expiry, retention of
  jobs and of lost workers, automatic retries).
- ``jobs/db.py`` and ``jobs/pool.py``: connections; ``jobs/pruning.py``: bulk
  deletes in batches and ``flask prune``; ``jobs/settings.py``: every setting;
  ``jobs/errors.py``, ``jobs/auth.py``, ``jobs/parse.py``, ``jobs/responses.py``,
  ``jobs/observability.py``.

docs/API.md is the reference.
"""

from __future__ import annotations

import logging

from flask import Flask, request

from jobs import auth, chores, db, errors, observability, pruning, settings
from jobs.api import api, endpoint
from jobs.chores.leases import lease_chore
from jobs.chores.retention import retention_chore
from jobs.chores.retries import retry_chore
from jobs.chores.workers import retention_setting as worker_retention_setting
from jobs.chores.workers import worker_retention_chore

log = logging.getLogger("jobs")


def create_app(test_config=None):
    # No static folder: every file the service serves is a declared route.
    app = Flask(__name__, static_folder=None)
    # A malformed or out-of-range value stops the start-up with a message naming
    # each such variable and its range (settings.SettingsError).
    app.config.from_mapping(settings.from_environment())
    if test_config is not None:
        app.config.update(test_config)
    # A test's JOB_RETENTION may be text, as the environment's is.
    app.config["JOB_RETENTION"] = pruning.retention_setting(app.config["JOB_RETENTION"])
    app.config["WORKER_RETENTION"] = worker_retention_setting(app.config["WORKER_RETENTION"])

    observability.configure_logging(app.config["LOG_LEVEL"])
    # Werkzeug would answer /jobs//progress with an HTML 308 to /jobs/progress,
    # past every error handler; unmerged, it is an unknown route (JSON 404).
    app.url_map.merge_slashes = False
    app.register_blueprint(api)
    observability.init_app(app)
    app.before_request(lambda: auth.refusal(endpoint.access_of(request.endpoint)))
    db.init_app(app)
    chores.init_app(
        app, lease_chore(), retention_chore(), retry_chore(), worker_retention_chore()
    )
    pruning.init_app(app)
    errors.init_app(app, endpoint.error_code_of)

    if not app.config["ADMIN_TOKEN"]:
        log.warning("ADMIN_TOKEN is not set: the API is open to anyone who can reach it")
        if app.config["WORKER_TOKEN"]:
            log.warning("WORKER_TOKEN is ignored while ADMIN_TOKEN is not set")
    return app
