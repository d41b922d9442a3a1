# `make run` serves the API on :8080, `make test` runs the suite, `make lint` runs ruff.
# Each creates .venv and installs requirements-dev.txt first (again only when it changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv run test lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# PostgreSQL: DATABASE_URL if set, else an embedded server with its data in .pgdata/.
run: venv
	$(BIN)/python devdb.py serve --datadir .pgdata -- $(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

# Keeps .pgdata/ (the database of `make run`): remove it by hand to start afresh.
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
