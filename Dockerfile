# Jobs service image: `gunicorn -c gunicorn.conf.py wsgi:app` as a non-root
# user (docs/API.md, Running the service). The same image runs the one-shot schema step:
#   docker run --rm -e DATABASE_URL=... <image> flask --app app init-db
FROM python:3.11-slim

# PYTHONUNBUFFERED: the app logs one JSON line per request to stdout/stderr;
# buffered, those lines would reach `docker logs` late or be lost on a kill.
# PYTHONDONTWRITEBYTECODE: the code is read-only to the runtime user, so the
# bytecode is compiled once at build time below rather than attempted per run.
# pip runs as root only here, at build time, into an image of its own: its
# root and version-check warnings are noise.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PORT=8080

# A fixed numeric UID/GID so orchestrators (Kubernetes runAsNonRoot) can verify
# the user is not root without resolving a name, and so volume ownership is
# predictable across rebuilds. No home directory: nothing here writes to $HOME
# (gunicorn's control socket, the one thing that would, is disabled).
# (Not --system: system accounts must sit below UID 1000, 10001 deliberately
# does not, clear of any UID a base-image package might claim.)
RUN groupadd --gid 10001 app \
 && useradd --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin app

WORKDIR /app

# Dependencies before code: this layer is rebuilt only when requirements.txt
# changes, not on every code edit. All pins ship manylinux wheels
# (psycopg2-binary bundles libpq), so no compiler or -dev packages are needed.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

# Only what the server and `flask --app app init-db` need: the modules app.py
# imports, the WSGI entry point, the gunicorn config and schema.sql (read by
# init-db). Tests, bench, .venv and .pgdata stay out; .dockerignore keeps them
# out of the build context too. A new top-level module must be added here —
# forgetting it fails loudly at start-up (ImportError), and test_gunicorn
# checks the list against what wsgi.py imports.
# Files stay root-owned: the runtime user can read the code but not change it.
COPY app.py auth.py chain.py chores.py db.py errors.py history.py leases.py observability.py \
     openapi.py parse.py pool.py registry.py responses.py schemas.py settings.py \
     wsgi.py gunicorn.conf.py schema.sql ./
COPY store/ ./store/
# The operator's console (/ui/): static files, served from here by app.py.
COPY jobs/console/ ./jobs/console/
RUN python -m compileall -q /app

# The only place the runtime writes is PROMETHEUS_MULTIPROC_DIR, which
# gunicorn.conf.py defaults to a fresh private directory under the temp dir
# (/tmp, world-writable with the sticky bit), removed on exit. With a
# read-only root filesystem, mount a tmpfs on /tmp, or point
# PROMETHEUS_MULTIPROC_DIR at a directory UID 10001 owns and only it may write.
USER 10001:10001

EXPOSE 8080

# Liveness only: /healthz never touches the database, so a database outage
# does not get healthy containers restarted. The slim image has no curl;
# Python's urllib is already there. urlopen raises (exit 1) on a refused
# connection, a timeout or any non-2xx status. $PORT is read at check time, so
# the check follows a PORT override given at `docker run`.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=3)"]

# Exec form: gunicorn is PID 1 and receives SIGTERM directly, so `docker stop`
# drains in-flight requests (graceful_timeout) instead of killing them.
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
