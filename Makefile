# The two commands of the README: `make test` and `make reproduce`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip's constraints pin torch to the tested CPU build; users elsewhere install without them.
PIP_INSTALL := $(BIN)/python -m pip install --quiet -c constraints.txt

.PHONY: install test lint reproduce bench stress-distributed clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[dev,ray]'
	# the build step: the native glue and the float32 CPU kernels, compiled once here
	$(BIN)/bnlab compile
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check src tests $(wildcard benchmarks examples)
	$(BIN)/mypy

test: install
	$(BIN)/python -m pytest -n 2 -q

reproduce: install
	$(BIN)/bnlab reproduce --out runs/reproduce

bench: install
	$(BIN)/python benchmarks/bench_layers.py

# the two-process training test 50 times in a row beside two CPU-bound processes (about an hour)
stress-distributed: install
	$(BIN)/python scripts/stress_distributed.py --runs 50 --busy 2

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
