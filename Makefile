# Two commands on a fresh machine: `make run` (the pipeline on the embedded CPU default) and
# `make test`. Both create .venv and install the pinned stack first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2
# Container tests keep their engine's images (and the debootstrap rootfs, the wheels) here, so
# only the first run builds them (~4 min); delete the directory to rebuild from nothing.
LLAMAPIPE_DOCKER_CACHE ?= $(HOME)/.cache/llamapipe-docker
export LLAMAPIPE_DOCKER_CACHE

.PHONY: setup system-deps run test test-fast dry-run lint bench bench-setup mutate clean

setup: $(VENV)/.installed

# The container tests start their own Docker engine (Debian's docker.io) and build their base
# image with debootstrap; the SLURM tests start their own munged, mariadbd, slurmdbd, slurmctld
# and slurmd (tests/slurm_cluster.py: private sockets, ports and config, none of the packages'
# services). Installed here when missing (needs root, as on CI).
SLURM_TOOLS := munged mariadbd slurmdbd slurmctld slurmd sbatch sacct
system-deps:
	@command -v dockerd >/dev/null && command -v debootstrap >/dev/null && command -v chromium >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    docker.io debootstrap pciutils chromium >/dev/null; }
	@(for t in $(SLURM_TOOLS); do command -v $$t >/dev/null || exit 1; done) || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    slurmctld slurmd slurm-client slurmdbd munge mariadb-server >/dev/null; }

$(VENV)/.installed: envs/requirements.txt envs/constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r envs/requirements.txt -c envs/constraints.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

run: setup
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --report results/report.html

dry-run: setup
	$(BIN)/snakemake -n -p results/predictions.json

test: setup system-deps bench-setup
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest -m "not e2e"

lint: setup
	$(BIN)/ruff check src tests tools
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile workflow

# Benchmark-only packages (the PyTorch peer of bench/sft_throughput.py): torch's CPU build and a
# transformers that fits the venv's tokenizers. The quick benchmarks in the tests need them.
bench-setup: $(VENV)/.bench-installed

$(VENV)/.bench-installed: envs/bench-requirements.txt envs/constraints.txt $(VENV)/.installed
	$(BIN)/pip install --quiet -r envs/bench-requirements.txt -c envs/constraints.txt
	$(BIN)/pip check
	touch $@

# Every benchmark (>= 5 runs each, ~25 min on 2 cores): a markdown table on stdout, the table and
# each benchmark's JSON in results/bench/. `make bench BENCH_ARGS=--quick`: the 2-minute version.
bench: setup bench-setup
	$(BIN)/python bench/run_all.py --out-dir results/bench --markdown-out results/bench/table.md $(BENCH_ARGS)

# Mutation testing (cosmic-ray, pinned) of the NPU command builders and config resolution, in a
# copy of the tracked files (cosmic-ray edits sources in place); report in results/mutation/.
MUTATION_DIR := results/mutation
mutate: setup
	$(BIN)/pip install --quiet -r envs/mutation-requirements.txt -c envs/constraints.txt -c envs/mutation-constraints.txt
	rm -rf $(MUTATION_DIR) && mkdir -p $(MUTATION_DIR)/tree
	git ls-files -z | xargs -0 tar -cf - | tar -xf - -C $(MUTATION_DIR)/tree
	cd $(MUTATION_DIR)/tree && PATH=$(CURDIR)/$(BIN):$$PATH PYTHONPATH=$$PWD/src \
	  $(CURDIR)/$(BIN)/cosmic-ray init tools/mutation.toml ../session.sqlite && \
	  PATH=$(CURDIR)/$(BIN):$$PATH PYTHONPATH=$$PWD/src $(CURDIR)/$(BIN)/cosmic-ray exec tools/mutation.toml ../session.sqlite
	$(BIN)/cr-report $(MUTATION_DIR)/session.sqlite --show-pending > $(MUTATION_DIR)/report.txt
	tail -n 5 $(MUTATION_DIR)/report.txt

clean:
	rm -rf results .snakemake
