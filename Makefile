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

# The DAG and exact commands of every target, the way CI can afford it: `snakemake -n -p` of the
# default target for config.yaml as is (target cpu), for target=npu, and for the rehearsal
# (target=npu rehearsal=cpu, LLAMAPIPE_PADDLENLP_SRC unset), in a light venv (.venv-dry: Snakemake
# and what parsing the workflow imports, envs/dry-run-requirements.txt; no Paddle) and in a fresh
# copy of the checkout's files (tracked and untracked, not ignored ones): no results/, data/,
# .cache/ or .snakemake/ there, so every job is listed even where results exist here, and a rule
# that needs a file only this machine has fails. Fails if any of the three fails.
# DRY_RUN_CONFIGFILE=my.yaml: the three with that config over config.yaml (--configfile).
DRY_VENV := .venv-dry
DRY_RUN_CONFIGFILE ?=
DRY_RUN_CONFIGS := "" "target=npu" "target=npu rehearsal=cpu"

# Recreated from nothing when a requirement changes: a package left over from an older list
# would hide a parse-time import the list lacks. Its own .gitignore keeps it out of git.
$(DRY_VENV)/.installed: envs/dry-run-requirements.txt envs/constraints.txt pyproject.toml
	rm -rf $(DRY_VENV)
	$(PYTHON) -m venv $(DRY_VENV)
	echo '*' > $(DRY_VENV)/.gitignore
	$(DRY_VENV)/bin/pip install --quiet -r envs/dry-run-requirements.txt -c envs/constraints.txt
	$(DRY_VENV)/bin/pip install --quiet --no-deps -e .
	$(DRY_VENV)/bin/pip check
	touch $@

dry-run: $(DRY_VENV)/.installed
	@git ls-files >/dev/null || { echo "make dry-run: copies the files git knows: run it in a git checkout" >&2; exit 1; }
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && mkdir "$$tmp/project" && \
	git ls-files -z --cached --others --exclude-standard > "$$tmp/files" && \
	tar --null --ignore-failed-read -T "$$tmp/files" -cf "$$tmp/tree.tar" 2>/dev/null && \
	tar -xf "$$tmp/tree.tar" -C "$$tmp/project" && \
	echo "=== make dry-run: in a copy of this checkout's files (its path shown as $(CURDIR))" && \
	failed= && \
	for cfg in $(DRY_RUN_CONFIGS); do \
	  echo "=== make dry-run: snakemake -n -p $${cfg:+--config }$${cfg:-(config.yaml as is: target cpu)}"; \
	  (cd "$$tmp/project" && env -u LLAMAPIPE_PADDLENLP_SRC $(abspath $(DRY_VENV))/bin/snakemake -n -p \
	    $(if $(DRY_RUN_CONFIGFILE),--configfile $(abspath $(DRY_RUN_CONFIGFILE))) $${cfg:+--config $$cfg}) \
	    > "$$tmp/out" 2>&1; rc=$$?; \
	  sed "s|$$tmp/project|$(CURDIR)|g" "$$tmp/out"; \
	  [ $$rc -eq 0 ] || failed="$$failed [$${cfg:-config.yaml}]"; \
	done; \
	if [ -n "$$failed" ]; then echo "=== make dry-run FAILED:$$failed" >&2; exit 1; fi; \
	echo "=== make dry-run: all three planned"

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
