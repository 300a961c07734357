# Two commands on a fresh machine: `make run` (the pipeline on the embedded CPU default) and
# `make test`. Both create .venv and install the pinned stack first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: setup run test test-fast dry-run lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: envs/requirements.txt envs/constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r envs/requirements.txt -c envs/constraints.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

run: setup
	$(BIN)/snakemake --cores $(CORES) results/predictions.json results/metrics.json

dry-run: setup
	$(BIN)/snakemake -n -p results/predictions.json

test: setup
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest -m "not e2e"

lint: setup
	$(BIN)/ruff check src tests tools
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile workflow

clean:
	rm -rf results .snakemake
