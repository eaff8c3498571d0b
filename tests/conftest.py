"""Shared fixtures: a small synth CUB (directory and .tgz), built shard sets, a fitted run, loopback servers
over directories; the markers that say what kind of slow a test is. Plain helpers (CLI runs, environments,
ports, the server itself) are in support.py.

The session fixtures are built once per test run even when pytest-xdist runs the suite in several worker
processes (`make test`): `shared` builds each one in a folder every worker sees, under a file lock, and the
workers that ask while it is being built wait for it instead of building their own."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import run_cli, serve, synth_shards

from pipeline.build import build
from pipeline.plan import BuildOptions
from pipeline.synth import synth

SMALL = {"classes": 6, "per_class": 10, "seed": 0}
SMALL_OPTIONS = BuildOptions(resize_short=96, shard_samples=7)
# Each of these marks a kind of slow test; `slow` (what `make test-fast` leaves out) is added to all of them.
SLOW_KINDS = ("multiprocess", "cluster", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks the slow kinds slow, and puts the modules that hold slow tests first (each module's tests keep
    their order): `make test` hands whole modules to its workers in this order, so the long ones start early
    instead of trailing alone at the end."""
    slow_modules = set()
    for item in items:
        if any(item.get_closest_marker(kind) for kind in SLOW_KINDS):
            item.add_marker(pytest.mark.slow)
            slow_modules.add(item.module)
    items.sort(key=lambda item: item.module not in slow_modules)


def shared(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """The folder `name` that `make(folder)` fills, made once per test run for every xdist worker: the first
    caller makes it under an exclusive lock, later callers (other workers) wait for the lock and reuse it. A
    folder left half-made by a failed `make` is made again."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's basetemp is a folder in the run's own
        base = base.parent
    folder, done = base / "shared" / name, base / "shared" / f"{name}.done"
    folder.parent.mkdir(exist_ok=True)
    with open(base / "shared" / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


def synth_set(tmp_path_factory: pytest.TempPathFactory, synth_args: dict, options: BuildOptions) -> Path:
    """A synth CUB (`synth_args`) built into a shard set (`options`), made once per test run for every worker
    and every module asking with the same arguments (`shared`). Returns the shard set; the synth source is
    its sibling CUB_200_2011/."""
    key = hashlib.sha256(repr((sorted(synth_args.items()), options)).encode()).hexdigest()[:16]
    return shared(tmp_path_factory, f"synth-{key}", lambda root: synth_shards(root, synth_args, options)) / "shards"


@pytest.fixture(scope="session")
def cub_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synth CUB: returns the directory holding CUB_200_2011/ and CUB_200_2011.tgz."""
    return shared(tmp_path_factory, "synth", lambda out: synth(out, tgz=True, progress=False, **SMALL))


@pytest.fixture
def cub_copy(cub_source: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the synth CUB_200_2011 directory (for tests that damage it)."""
    return Path(shutil.copytree(cub_source / "CUB_200_2011", tmp_path / "CUB_200_2011"))


@pytest.fixture(scope="session")
def shard_set(cub_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete shard set built from the small synth source (read-only for tests)."""
    def make(folder: Path) -> None:
        build(cub_source / "CUB_200_2011", folder / "small", SMALL_OPTIONS, workers=1, progress=False)

    return shared(tmp_path_factory, "shards", make) / "small"


@pytest.fixture
def http_root() -> Iterator[callable]:
    """Start loopback HTTP servers over directories; returns a function dir -> base URL. Stopped after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda directory: stack.enter_context(serve(directory)).url


TRAIN_SYNTH = {"classes": 6, "per_class": 24, "seed": 1}
# Tiny, fast, and still learnable: resnet18 from scratch at 40 px on the 6-class synth set.
FIT_ARGS = ("--arch", "resnet18", "--pretrained", "none", "--image-size", "40", "--batch-size", "8",
            "--workers", "0", "--lr", "0.003", "--lr-scheme", "flat", "--epochs", "5", "--wandb", "disabled",
            "--log-every", "1", "--crop-scale", "0.6", "1.0", "--ema-decay", "0", "--tta", "none", "--no-plots")
# (fit's default EMA, flip TTA and report PNGs are off here, for speed: the EMA, TTA and resume tests turn the
# first two on, fitted_run and the report tests the plots.)


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-class synth shard set with uneven shards (8 samples each, the last ones shorter)."""
    return synth_set(tmp_path_factory, TRAIN_SYNTH, BuildOptions(resize_short=48, shard_samples=8))


# fitted_run's eval settings, not the defaults (a larger eval crop than --image-size 40, flip TTA), so that
# evaluate, predict and export are seen to follow what the run recorded.
EVAL_ARGS = ("--eval-image-size", "48", "--tta", "flip")
# What results.json, metrics.json and W&B record of them: the short side resized to round(48 / 0.875) first.
FITTED_EVAL = {"image_size": 48, "resize_short": 55, "crop_pct": 0.875, "interpolation": "bilinear", "tta": "flip",
               "weights": "raw"}


@pytest.fixture(scope="session")
def fitted_run(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete `fit` (offline W&B, EVAL_ARGS), shared by the tests that read what a run leaves behind."""
    def make(folder: Path) -> None:
        result = run_cli("train", "fit", "--shards", str(train_shards), *FIT_ARGS, *EVAL_ARGS, "--plots",
                         "--wandb", "offline",
                         "--run-dir", str(folder / "fitted"), env={"WANDB_SILENT": "true"})
        assert result.returncode == 0, result.stderr[-3000:]

    return shared(tmp_path_factory, "runs", make) / "fitted"
