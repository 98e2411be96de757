# The two commands a fresh machine needs: `make demo` and `make test`.
# Each creates .venv (if missing), installs mpitrain into it (editable, with dev extras), then runs.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.mpitrain-installed

.PHONY: demo test test-fast lint format install bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mpitrain train -n 5 --strategy master-worker --epochs 8 --out runs/demo --overwrite

# The unit tests run beside the system tests: those leave the 2 cores of CI a third idle
# while their ranks start and wait (1.3 cores busy on average over the whole suite).
UNIT_TMP ?= $(or $(TMPDIR),/tmp)/mpitrain-unit-tests
test: $(STAMP) lint
	@$(BIN)/python -m pytest -q -p no:cacheprovider --basetemp=$(UNIT_TMP) tests/unit > $(UNIT_TMP).log 2>&1 & unit=$$!; \
	$(BIN)/python -m pytest -q --durations=15 tests/system; system=$$?; \
	wait $$unit; status=$$?; echo "unit tests (run beside them):"; cat $(UNIT_TMP).log; \
	test $$system -eq 0 && test $$status -eq 0

# The unit tests alone (no mpiexec, no real data): under a minute here.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# Ruff (lint and format check) and the type checker, on every file the project owns.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

bench: $(STAMP)
	$(BIN)/mpitrain bench -n 1 && $(BIN)/mpitrain bench -n 2

clean:
	rm -rf runs .pytest_cache
