# `make repro` and `make test` are the README's Quickstart: each creates .venv when missing and
# installs requirements.txt into it (again only when requirements.txt changes).
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: install install-dev repro promote retrain sweep server demo test screenshots bench bench-scale gpu-check clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

# What the tests and tools need too (requirements-dev.txt)
$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

install-dev: $(VENV)/.installed-dev

# The pipeline, then the deliberate step that moves @champion (pipeline/promote.py).
repro: install
	dvc repro
	$(PY) -m pipeline.promote

promote: install
	$(PY) -m pipeline.promote

# CI's retrain job (.github/workflows/retrain.yml) runs exactly this: RETRAIN_BASE picks the diff base,
# RETRAIN_ARGS=--promote (on main only) moves @champion too.
retrain: install
	$(PY) -m pipeline.retrain $(RETRAIN_ARGS)

# A queued sweep of DVC experiments, 2 at a time, grouped in MLflow by the tag sweep=<name>:
#   make sweep SWEEP="-S train.lr=0.001,0.003,0.01"
SWEEP ?= -S train.lr=0.001,0.003,0.01
SWEEP_NAME ?= sweep-$(shell date +%Y%m%d-%H%M%S)
sweep: install
	dvc exp run --queue $(SWEEP)
	PIPELINE_SWEEP=$(SWEEP_NAME) dvc queue start -j 2
	dvc queue status

# A tracking server with basic auth (settings from the environment: see pipeline/server.py).
server: install
	$(PY) -m pipeline.server

# A web page on a model (default models:/<name>@champion; DEMO_ARGS="--model models/model.pt --port 7860")
demo: install
	$(PY) -m pipeline.demo $(DEMO_ARGS)

bench: install-dev
	$(PY) -m tools.bench

# fetch_data + prepare on a generated zip of 120,000 JPEGs (and 12,000): time and memory
bench-scale: install-dev
	$(PY) -m tools.bench --scale 120000

# Two processes: most tests wait on a stage's subprocess, which leaves a core idle. A module's tests stay
# together (its fixtures are built once); the longest modules go first (tests/conftest.py), in that
# order. `make test TEST_ARGS=` runs them in one process.
TEST_ARGS ?= -n 2 --dist loadscope --no-loadscope-reorder
test: install-dev
	$(PY) -m pytest -q $(TEST_ARGS) tests

# PNGs of the MLflow UI and `dvc plots show` after `make repro`, in reports/screenshots/ (needs Chromium)
screenshots: install-dev
	$(PY) -m tools.screenshots

# On a machine with a CUDA GPU: every CUDA path, in a few minutes -> reports/gpu_check.json (skips without one)
gpu-check: install-dev
	$(PY) -m tools.gpu_check

clean:
	rm -rf data/raw data/raw.json data/prepared models reports/*.json reports/*.csv mlflow.db mlflow.db.lock mlruns .checkpoints
