# `make run` serves the API on :8080, `make test` runs the suite, `make lint` runs ruff,
# `make bench` runs the benchmarks (BENCHMARKS.md), `make screenshots` redraws the
# README's pictures of the console from its browser tests.
# Each creates .venv and installs requirements-dev.txt first (again only when it changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv run test lint bench screenshots clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# PostgreSQL: DATABASE_URL if set, else an embedded server with its data in .pgdata/.
run: venv
	$(BIN)/python -m dev.postgres serve --datadir .pgdata -- $(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

# PgBouncer and Chromium (Debian's packages) are installed when missing and root: the
# tests run the service through PgBouncer, and the console's tests drive headless
# Chromium through Playwright (from requirements-dev.txt; never its own browser
# download). Where they cannot be, those tests skip, or fail when CI=true.
# The tests run in PYTEST_XDIST's processes (pytest-xdist): many of them wait on
# PostgreSQL, gunicorn or a clock more than they use a core, so 3 beat 2 on a
# 2-core machine; 4 use more CPU than 3 for no shorter run (BENCHMARKS.md, "The
# test suite"). A module whose tests share a
# server of its own is marked xdist_group (--dist loadgroup keeps it on one
# process). PYTEST_XDIST= runs them in this one process.
# PYTHONDONTWRITEBYTECODE is cleared for the run: pytest caches the modules whose
# asserts it rewrites (the tests, schemathesis, hypothesis) only where bytecode may be
# written, and without that cache each of the processes spent 11 s of CPU
# rewriting them again (BENCHMARKS.md, "The test suite").
PYTEST_XDIST ?= -n 3 --dist loadgroup
test: venv
	@test -x /usr/sbin/pgbouncer || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		apt-get install -y -qq pgbouncer >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq pgbouncer >/dev/null) || \
		echo "make test: could not install pgbouncer: its tests will say so"
	@test -x /usr/bin/chromium || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		apt-get install -y -qq chromium >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
		echo "make test: could not install chromium: the console's tests will say so"
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

# A throwaway PostgreSQL, 1M-job tables seeded with SQL, the service and its
# floors under gunicorn, driven by wrk, the service again through PgBouncer
# (wrk and pgbouncer are installed from Debian's packages when missing), then
# the growth to 5M jobs. BENCH_ARGS passes options to bench.run
# (e.g. --duration 5 --no-growth).
bench: venv
	@command -v wrk >/dev/null || { command -v apt-get >/dev/null && \
		(apt-get install -y -qq wrk >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq wrk >/dev/null)); } || \
		{ echo "make bench needs wrk (Debian: apt-get install wrk)"; exit 1; }
	@command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || \
		{ command -v apt-get >/dev/null && \
		(apt-get install -y -qq pgbouncer >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq pgbouncer >/dev/null)); } || \
		{ echo "make bench needs pgbouncer (Debian: apt-get install pgbouncer)"; exit 1; }
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The README's screenshots of the console (docs/screenshots/*.png, 1280x800), taken by
# its browser tests against seeded data.
screenshots: venv
	JOBS_SCREENSHOTS=docs/screenshots $(BIN)/python -m pytest -q tests/test_console.py -k screenshots

# Keeps .pgdata/ (the database of `make run`): remove it by hand to start afresh.
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
