# The two commands a fresh machine needs: `make demo` and `make test`.
# Each creates .venv (if missing), installs mpitrain into it (editable, with dev extras), then runs.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.mpitrain-installed

.PHONY: demo test test-fast lint format install bench clean slurm

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mpitrain train -n 5 --strategy master-worker --epochs 8 --out runs/demo --overwrite

# One pytest for all: running the unit tests in a second process beside the system tests
# made the whole slower on 2 cores (1,892 s against about 1,750 s: docs/development.md).
test: $(STAMP) lint slurm
	$(BIN)/python -m pytest -q --durations=15

# The unit tests alone (no mpiexec, no real data): under a minute here.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# The Slurm the tests start (tests/slurm.py), installed with apt where root may: skips say why elsewhere.
slurm:
	@bash tests/install-slurm.sh

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
