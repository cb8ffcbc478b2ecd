# ipcd's developer commands. Every target sets up what it needs: `make run` and
# `make test` work on a fresh machine (Debian, Python 3.11) with no virtualenv yet.

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DEV_CFG := etc/ipcd/dev.toml
STAMP   := $(VENV)/.installed

# The test suite starts thousands of short ipcctl processes: let Python cache bytecode
# even where the environment asks it not to, or each start recompiles ipcd from source.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: help venv run test lint typecheck pytest format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

venv: $(STAMP)  ## create .venv and install ipcd with its development tools

# sysv_ipc is built from source: the PyPI wheel lacks semtimedop(), which bounded
# semaphore waits need (ipcd falls back to SIGALRM without it, but builds it properly here).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-binary sysv_ipc -e '.[dev]'
	@touch $@

run: $(STAMP)  ## run the daemon in the foreground on the development config (Ctrl-C stops it)
	@mkdir -p .run
	@echo "ipcd: development daemon on $(DEV_CFG); in a second terminal try:"
	@echo "    $(BIN)/ipcctl -c $(DEV_CFG) submit echo hello --wait"
	@echo "    $(BIN)/ipcctl -c $(DEV_CFG) status"
	@echo "    tail -f .run/ipcd.log | jq ."
	$(BIN)/ipcd -c $(DEV_CFG) run

test: lint typecheck pytest  ## lint, type checks and the whole test suite

lint: $(STAMP)  ## ruff check and ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)  ## mypy --strict
	$(BIN)/mypy

pytest: $(STAMP)  ## the test suite
	$(BIN)/pytest

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:  ## remove the virtualenv and development run files
	rm -rf $(VENV) .run .mypy_cache .ruff_cache
