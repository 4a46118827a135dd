# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test test-fast lint system bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# redis-server is the only system package the demo and tests need (Debian: redis-server).
system:
	@command -v redis-server >/dev/null || { apt-get update -q && apt-get install -y -q redis-server; }

demo: system $(BIN)/.installed
	$(BIN)/mailer demo

# Everything, in one run: the in-process unit tests first, then the end-to-end runs with real
# worker processes.
test: system $(BIN)/.installed
	$(BIN)/pytest tests/unit tests/e2e

# The developer's loop: in-process tests only (tests/unit), about a minute at most.
test-fast: system $(BIN)/.installed
	$(BIN)/pytest tests/unit -q -n 2

# Style, formatting, the import layering (pyproject.toml [tool.importlinter]) and types.
lint: $(BIN)/.installed
	$(BIN)/ruff check mailer workers devkit events tests bench
	$(BIN)/ruff format --check mailer workers devkit events tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy

# Postfix's smtp-sink/smtp-source are the speed-of-SMTP reference for the benchmarks.
bench: system $(BIN)/.installed
	@command -v smtp-sink >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix; }
	$(BIN)/python bench/run.py
