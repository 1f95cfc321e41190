# queueformer: `make demo` runs the main job, `make test` runs every test this machine can run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# The dashboard's browser tests drive Debian's Chromium: installed once here, never downloaded at test time.
CHROMIUM := /usr/bin/chromium
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The tiny offline models: built once per checkout by setup, shared by `make demo` (the default
# models_dir, data_dir/models) and `make test` (the tiny_models fixture). The stamp names a hash of the
# recipe and its data, so they are rebuilt only when the recipe changes.
MODELS       := .queueformer/models
MODELS_HASH  := $(shell cat workers/tiny_models.py queueformer/data/corpus.txt queueformer/data/*.tsv | cksum | cut -d' ' -f1)
MODELS_STAMP := $(MODELS)/.recipe-$(MODELS_HASH)

.DEFAULT_GOAL := help
.PHONY: help setup models demo test lint unit bench bench-full clean

help:
	@echo "make demo   - set up, build tiny models, start a cluster, run the bundled examples, stop"
	@echo "make test   - set up, lint, type-check and run the full test suite"
	@echo "make bench  - CPU benchmark suite (writes bench/results/*.json)"
	@echo "make models - build the tiny offline models into $(MODELS) (setup does it once; again when the recipe changes)"

# torch==2.13.0 goes in first: on machines without a GPU that pin resolves to the local CPU build,
# and the worker extra's torch range is then satisfied without pulling CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[all]" --group dev
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium

$(MODELS_STAMP): $(STAMP)
	$(BIN)/queueformer models build-tiny $(MODELS)
	rm -f $(MODELS)/.recipe-*
	touch $(MODELS_STAMP)

models: $(MODELS_STAMP)

setup: $(STAMP) $(CHROMIUM) $(MODELS_STAMP)

demo: setup
	$(BIN)/queueformer demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -m unit -q

test: lint
	$(BIN)/pytest

bench: setup
	$(BIN)/python -m bench

bench-full: setup
	$(BIN)/python -m bench --full

clean:
	rm -rf $(VENV) .queueformer .mypy_cache .ruff_cache .pytest_cache
