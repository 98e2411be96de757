# The two commands a fresh machine needs: `make demo` and `make test`.
# Each creates .venv (if missing), installs mpitrain into it (editable, with dev extras), then runs.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.mpitrain-installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mpitrain train -n 5 --strategy master-worker --epochs 8 --out runs/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/mpitrain bench -n 1 && $(BIN)/mpitrain bench -n 2

clean:
	rm -rf runs .pytest_cache
