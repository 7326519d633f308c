# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint test-sqlite test-postgres test-faults venv bench bench-telemetry clean

venv: $(STAMP)

# Reinstall only when the project's dependencies change.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# make run PORT=8001 to serve on another port.
PORT ?= 8000
run: venv
	$(BIN)/python -m service migrate
	$(BIN)/python -m service serve --host 127.0.0.1 --port $(PORT)

lint: venv
	$(BIN)/ruff check service tests alembic bench
	$(BIN)/mypy --strict service

test: lint test-sqlite test-postgres

test-sqlite: venv
	@echo "==> pytest on SQLite"
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  DATABASE_URL="sqlite:///$$tmp/test.db" $(BIN)/pytest

# A throwaway primary, its streaming hot standby and PgBouncer in front (the read-replica and
# PgBouncer tests need them; tests/standby.py).
# On an existing server: make test-postgres TEST_POSTGRES_URL=postgresql+psycopg2://u:p@host/db
test-postgres: venv
	@echo "==> pytest on PostgreSQL"
	@if [ -n "$$TEST_POSTGRES_URL" ]; then \
	  DATABASE_URL="$$TEST_POSTGRES_URL" $(BIN)/pytest; \
	else \
	  PATH="$(abspath $(BIN)):$$PATH" scripts/with-postgres.sh --replica --pgbouncer pytest; status=$$?; \
	  if [ $$status = 77 ]; then \
	    echo ""; \
	    echo "!!!!! PostgreSQL pass SKIPPED: no PostgreSQL server installed. Install it with"; \
	    echo "!!!!!   sudo apt-get install -y postgresql   (or set TEST_POSTGRES_URL=...)"; \
	    echo ""; \
	    if [ "$$REQUIRE_POSTGRES" = 1 ]; then echo "REQUIRE_POSTGRES=1: failing."; exit 1; fi; \
	  else exit $$status; fi; \
	fi

# The load test (20,000 requests, 64 clients; a few minutes per database): SQLite, then a
# throwaway PostgreSQL. CI runs it after `make test`.
test-faults: venv
	@echo "==> slow fault tests on SQLite"
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  DATABASE_URL="sqlite:///$$tmp/test.db" $(BIN)/pytest -m slow
	@echo "==> slow fault tests on PostgreSQL"
	@if [ -n "$$TEST_POSTGRES_URL" ]; then DATABASE_URL="$$TEST_POSTGRES_URL" $(BIN)/pytest -m slow; \
	else PATH="$(abspath $(BIN)):$$PATH" scripts/with-postgres.sh pytest -m slow; fi

# make bench (a few minutes) | make bench FULL=1 (adds 1M rows): writes bench/RESULTS.md, then
# the scale section (workers, a read replica) bench/SCALE.md
bench: venv
	@$(BIN)/python -c "import matplotlib, orjson, fastapi_async_sqlalchemy" 2>/dev/null \
	  || $(BIN)/python -m pip install -q -e '.[dev,bench]'
	@for tool in wrk; do command -v $$tool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q $$tool; \
	  else echo "bench needs $$tool: sudo apt-get install -y $$tool"; exit 1; fi; }; done
	# A dozen servers, each with its own pool, share the database: room for all of them.
	PATH="$(abspath $(BIN)):$$PATH" PG_MAX_CONNECTIONS=500 scripts/with-postgres.sh --replica \
	  sh -c 'python -m bench.run $(if $(FULL),--full) $(if $(FULL),&& python -m bench.scale)'

# Only the cost of request ids + access line + metrics (issue #15), printed: ~1 minute.
bench-telemetry: venv
	PATH="$(abspath $(BIN)):$$PATH" scripts/with-postgres.sh python -m bench.run --only-telemetry

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
