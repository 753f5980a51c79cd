# Two entry points: `make up` (whole stack on this machine) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch; any other pin makes pip fetch gigabytes of CUDA wheels.
TORCH_PIN := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: up test soak lint typecheck install clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test]" "$(TORCH_PIN)"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check app workers tests bench
	$(BIN)/ruff format --check app workers tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) lint typecheck
	$(BIN)/pytest -q

# The race test of the core's promises, longer and with random seeds (about 15 min).
soak: $(STAMP)
	RACE_EXAMPLES=200 RACE_STEPS=50 RACE_RANDOM=1 $(BIN)/pytest -q -s --timeout=3600 tests/integration/test_race.py

up: $(STAMP)
	FLASK_APP=app $(BIN)/flask sagellm up

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
