"""The processes under test: the throwaway PostgreSQL and the apps under gunicorn.

Every app runs under dev/gunicorn.py's ``Server``, the launcher the tests use
too. The floors (constant_app.py, naive_app.py) get the service's own worker
settings, read from gunicorn.conf.py: its worker class (gevent), keep-alive,
and the same worker count, so that the ratios compare request handling alone.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import psycopg2

from dev.gunicorn import Server, free_port

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# The server is throwaway; these make it behave like a provisioned one
# (not 128 MB of cache, no checkpoint storms while seeding) and let the
# harness capture the SQL that the apps run (see plans.Plans).
SERVER_SETTINGS = {
    "shared_buffers": "1GB",
    "max_wal_size": "8GB",
    "shared_preload_libraries": "auto_explain",
    "auto_explain.log_min_duration": "-1",
    "auto_explain.log_format": "json",
    # Only while a capture sets log_min_duration to 0: off, they cost nothing.
    "auto_explain.log_analyze": "on",
    "auto_explain.log_buffers": "on",
    "logging_collector": "on",
    "log_line_prefix": "%m [%p] ",
    "log_rotation_age": "0",
    "log_rotation_size": "0",
}


def floor_launch(module: str, workers: int) -> dict:
    """dev.gunicorn.Server's options for a floor app (bench/<module>.py) with the
    service's worker settings; Bench.serve starts it."""
    production = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    port = free_port()
    return {
        "app": f"{module}:app",
        "config": None,
        "port": port,
        "workers": workers,
        "args": [
            "--workers",
            str(workers),
            "--worker-class",
            production["worker_class"],
            "--keep-alive",
            str(production["keepalive"]),
            "--worker-connections",
            str(production["worker_connections"]),
            "--bind",
            f"127.0.0.1:{port}",
        ],
        "cwd": BENCH,
        # naive_app imports jobs.pool (its deadline variant).
        "env": {"PYTHONPATH": str(ROOT)},
    }


def service_launch(workers: int) -> dict:
    """dev.gunicorn.Server's options for the service as production runs it
    (gunicorn.conf.py, wsgi:app, on a free port): its defaults."""
    return {"workers": workers}


def start_server(
    name: str,
    launch: dict,
    database_url: str,
    workdir: Path,
    extra_env: dict[str, str] | None = None,
) -> Server:
    """Start an app under gunicorn (``launch``: dev.gunicorn.Server's options), its log
    and metrics in ``workdir``/``name``; ready once /jobs/1 answers: a path every app
    answers, with a database round trip where there is a database, so the first
    measured request opens nothing."""
    env = {**launch.get("env", {}), **(extra_env or {})}
    return Server(
        database_url,
        **{**launch, "env": env},
        name=name,
        workdir=workdir / name,
        ready_path="/jobs/1",
    ).start()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


# --------------------------------------------------------------------------
# PostgreSQL


def start_postgres(workdir: Path):
    from dev import postgres as devdb

    pg = devdb.LocalPostgres(str(workdir / "pgdata"), durable=False)
    pg.start()
    conn = connect(pg.url)
    with conn.cursor() as cur:
        cur.execute("LOAD 'auto_explain'")  # so ALTER SYSTEM knows its settings
        for name, value in SERVER_SETTINGS.items():
            cur.execute(f"ALTER SYSTEM SET {name} = %s", (value,))
    conn.close()
    pg.stop()  # shared_buffers, the preload and the log collector need a restart
    pg.start()
    return pg


def connect(url: str):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    return conn
