# `make test` and `make demo` create .venv when missing and install exactly the versions in requirements.lock
# (what the tests last passed with; re-installed when the lock or pyproject.toml changes).
# `make upgrade` re-resolves the lock to the newest versions pyproject.toml allows, then runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
PIP_PIN ?= pip==26.3
# The lock is for CPython 3.11 on x86_64 Linux; `uv pip compile` resolves it from the package index alone.
LOCK_ARGS := pyproject.toml --extra dev --python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet

export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_SILENT := true
export PYTHONUNBUFFERED := 1

DEMO_DATA ?= data/demo
DEMO_SHARDS ?= shards/demo
DEMO_RUN ?= runs/demo

.PHONY: install lock upgrade test test-fast test-slow lint demo bench clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_PIN)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# After editing pyproject.toml's dependencies: re-resolve, keeping every pin that still fits.
lock: install
	$(PY) -m uv pip compile $(LOCK_ARGS) -o $(LOCK)
	$(MAKE) install

# Move every package to the newest version pyproject.toml allows, install that, and run the tests.
upgrade: install
	$(PY) -m uv pip compile $(LOCK_ARGS) --upgrade -o $(LOCK)
	$(MAKE) test

lint: install
	$(PY) -m ruff check .

# The suite in TEST_WORKERS processes (pytest-xdist), each module in one of them (--dist loadfile: a module's
# fixtures are built once), in collection order (tests/conftest.py puts the modules with slow tests first).
# The 25 slowest tests are listed at the end. Three workers on two cores: the third keeps the cores busy while
# a test waits on a scheduler, a signal or a timeout (7 min 35 s against 7 min 49 s with two).
# With PYTHONDONTWRITEBYTECODE set (some container images set it), each of the suite's ~400 Python processes
# would compile the checkout's modules again, and each worker rewrite every test module's asserts again.
TEST_WORKERS ?= 3
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
	--durations=25

test: install lint
	$(PYTEST) tests

# Everything but the tests marked slow (multiprocess, cluster, e2e); then only those.
test-fast: install
	$(PYTEST) -m "not slow" tests

test-slow: install
	$(PYTEST) -m slow tests

# synth -> shards -> fit (resnet18 from scratch, CPU-friendly) -> test top-1/top-5.
demo: install
	$(PY) -m pipeline synth --out $(DEMO_DATA) --classes 20 --per-class 40 --seed 0
	$(PY) -m pipeline build --source $(DEMO_DATA)/CUB_200_2011 --out $(DEMO_SHARDS) --resize-short 80 --shard-samples 32
	$(PY) -m pipeline inspect $(DEMO_SHARDS)
	rm -rf $(DEMO_RUN)
	$(PY) -m train fit --config configs/demo.yaml --shards $(DEMO_SHARDS) --run-dir $(DEMO_RUN)
	@$(PY) -c "import json; r = json.load(open('$(DEMO_RUN)/results.json'))['test']; \
	print(f\"demo test top-1 {r['top1']:.3f}, top-5 {r['top5']:.3f} on {r['num_samples']} images (chance 0.05); run in $(DEMO_RUN)/\")"

bench: install
	$(PY) bench/shards.py
	$(PY) bench/loader.py
	$(PY) bench/train_step.py --arch resnet50 --image-size 224 --batch-size 32 --steps 5
	$(PY) bench/micro.py
	$(PY) bench/cli.py

clean:
	rm -rf $(DEMO_DATA) $(DEMO_SHARDS) $(DEMO_RUN)
