# Two commands on a fresh machine: `make run` (the pipeline on the embedded CPU default) and
# `make test`. Both create .venv and install the pinned stack first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: setup system-deps run test test-fast dry-run lint bench clean

setup: $(VENV)/.installed

# The container tests start their own Docker engine (Debian's docker.io) and build their base
# image with debootstrap; installed here when missing (needs root, as on CI).
system-deps:
	@command -v dockerd >/dev/null && command -v debootstrap >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    docker.io debootstrap pciutils >/dev/null; }

$(VENV)/.installed: envs/requirements.txt envs/constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r envs/requirements.txt -c envs/constraints.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

run: setup
	$(BIN)/snakemake --cores $(CORES) results/predictions.json results/metrics.json

dry-run: setup
	$(BIN)/snakemake -n -p results/predictions.json

test: setup system-deps
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest -m "not e2e"

lint: setup
	$(BIN)/ruff check src tests tools
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile workflow

clean:
	rm -rf results .snakemake
