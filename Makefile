# The README's commands. Every target that needs Python sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine's pinned build; the package itself accepts torch >= 2.4.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
RECIPES ?= recipes/mini
RUN_ARGS ?=
# make reproduce-he2019 [COCO=/path/to/coco] [VOC=/path/holding/VOC2007+VOC2012] [DRY_RUN=1]
# Runs whose dataset or ImageNet checkpoint this machine lacks are left out, one line each
# (--skip-unavailable); with no COCO at all nothing is left and it stops in one line.
HE2019 ?= recipes/he2019
COCO_ARG := $(if $(COCO),--coco $(COCO),) $(if $(VOC),--voc $(VOC),)

SPEED_ARGS ?= --iters 20 --warmup 5

.PHONY: setup mini test test-fast figures data pretrain clean-mini help reproduce-he2019 speed parity

help:
	@echo "make mini     generate data, pre-train, train and evaluate every mini run, write figures"
	@echo "make test     run the test suite (CPU only; about 15 min)"
	@echo "make test-fast  the tests that train nothing and start no training process (about 30 s): the change-test loop"
	@echo "make figures  redraw every figure and table under results/ (and results/index.html) from the committed run files"
	@echo "make setup    create .venv and install the suite (done by the targets above)"
	@echo "make parity   the parity pair (10 seeds per engine and arm, 1,440 iterations) through both engines, side by side (needs detectron2 in .venv; about 4.5 h on 2 CPU cores)"
	@echo "make speed    benchmark: s/iter, images/s, peak memory of the paper's R50-FPN GN model (SPEED_ARGS=...)"
	@echo "make reproduce-he2019 [COCO=PATH] [VOC=PATH] [DRY_RUN=1]   the paper's study on the local GPUs (DRY_RUN: print the plan)"

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PKGS)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

data: setup
	$(BIN)/bench data

pretrain: data
	$(BIN)/bench pretrain $(RECIPES)

# The same pair trained by the torchvision and the detectron2 engine (README: bench parity)
parity: data
	$(BIN)/bench pretrain recipes/parity
	$(BIN)/bench parity recipes/parity $(RUN_ARGS)
	$(BIN)/bench figures --collect --study parity

mini: pretrain
	$(BIN)/bench run $(RECIPES) $(RUN_ARGS)
	$(BIN)/bench figures --collect --study mini

# Every figure and table under results/ from the run files committed there (no run dir needed)
figures: setup
	$(BIN)/bench figures

test: setup slurm-deps
	$(BIN)/python -m pytest -q

# The change-test loop: everything that does not train, launch processes or start Slurm
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# A real single-node Slurm (with munge and slurmdbd on a private MariaDB) for the tests that
# submit jobs (tests/slurm_cluster.py starts it on loopback). Installed from Debian's packages
# when running as root with apt-get; otherwise those tests skip.
SLURM_BINS := slurmctld slurmd sbatch sacct munged mungekey slurmdbd mariadb-install-db mariadb
SLURM_PKGS := slurmctld slurmd slurm-client slurmdbd munge mariadb-server mariadb-client
SLURM_APT := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SLURM_PKGS)

.PHONY: slurm-deps
slurm-deps:
	@PATH="$$PATH:/usr/local/sbin:/usr/sbin:/sbin"; missing=""; \
	for b in $(SLURM_BINS); do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	command -v mariadbd >/dev/null 2>&1 || command -v mysqld >/dev/null 2>&1 || missing="$$missing mariadbd"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "slurm-deps: missing$$missing; installing $(SLURM_PKGS)"; \
	  if ! apt-cache show slurmctld mariadb-server >/dev/null 2>&1; then apt-get update -qq; fi; \
	  $(SLURM_APT) || { apt-get update -qq && $(SLURM_APT); }; \
	else \
	  echo "slurm-deps: missing$$missing: the Slurm tests will skip (install Debian's $(SLURM_PKGS) as root)"; \
	fi

# The paper's study on this machine's GPUs. Without COCO it stops in seconds naming the path
# it looked at; DRY_RUN=1 prints the plan (runs, iterations, GPU-hours) instead.
reproduce-he2019: setup
ifeq ($(DRY_RUN),1)
	$(BIN)/bench plan $(HE2019) $(COCO_ARG)
else
	$(BIN)/bench run $(HE2019) $(COCO_ARG) --skip-unavailable $(RUN_ARGS)
endif

# Benchmark: train steps of the paper's R50-FPN GN Mask R-CNN at 800 px on this machine's
# device, at 2 images per GPU (the paper's 8 x 2) and 16 on one device. Prints s/iter,
# images/s and peak memory; `bench speed ... --record` adds rows to results/throughput.csv.
# On a CPU use e.g. SPEED_ARGS="--iters 3 --warmup 1": one step of 16 images takes minutes.
speed: setup
	$(BIN)/bench speed recipes/he2019/r50_gn.yaml --only=-scratch-2x- --force $(SPEED_ARGS)
	$(BIN)/bench speed recipes/he2019/r50_gn.yaml --only=-scratch-2x- --force --set gpus=1 $(SPEED_ARGS)

clean-mini:
	rm -rf runs/mini
