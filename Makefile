# `make repro` and `make test` are the README's Quickstart: each creates .venv when missing and
# installs requirements.txt into it (again only when requirements.txt changes).
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: install repro test bench clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

repro: install
	dvc repro

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf data/raw data/raw.json data/prepared models reports/*.json reports/*.csv mlflow.db mlruns .checkpoints
