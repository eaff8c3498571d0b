# `make test` and `make demo` create .venv when missing and install only when pyproject.toml changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned: an unpinned torch would make pip fetch several GB (see DESIGN 5).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_SILENT := true
export PYTHONUNBUFFERED := 1

DEMO_DIR ?= data/demo
DEMO_SHARDS ?= shards/demo
DEMO_RUN ?= runs/demo

.PHONY: install test lint demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m pipeline synth --out $(DEMO_DIR) --classes 20 --per-class 40 --seed 0
	$(PY) -m pipeline build --source $(DEMO_DIR)/CUB_200_2011 --out $(DEMO_SHARDS) --resize-short 128 --shard-samples 32
	$(PY) -m pipeline inspect $(DEMO_SHARDS)

bench: install
	$(PY) bench/shards.py

clean:
	rm -rf $(DEMO_DIR) $(DEMO_SHARDS) $(DEMO_RUN)
