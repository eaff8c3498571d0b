"""Shared fixtures: a small synth CUB (directory and .tgz), built shard sets, a fitted run, loopback servers
over directories. Plain helpers (CLI runs, environments, ports, the server itself) are in support.py."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import run_cli, serve, synth_shards

from pipeline.build import build
from pipeline.plan import BuildOptions
from pipeline.synth import synth

SMALL = {"classes": 6, "per_class": 10, "seed": 0}
SMALL_OPTIONS = BuildOptions(resize_short=96, shard_samples=7)


@pytest.fixture(scope="session")
def cub_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synth CUB: returns the directory holding CUB_200_2011/ and CUB_200_2011.tgz."""
    out = tmp_path_factory.mktemp("synth")
    synth(out, tgz=True, progress=False, **SMALL)
    return out


@pytest.fixture
def cub_copy(cub_source: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the synth CUB_200_2011 directory (for tests that damage it)."""
    return Path(shutil.copytree(cub_source / "CUB_200_2011", tmp_path / "CUB_200_2011"))


@pytest.fixture(scope="session")
def shard_set(cub_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete shard set built from the small synth source (read-only for tests)."""
    out = tmp_path_factory.mktemp("shards") / "small"
    build(cub_source / "CUB_200_2011", out, SMALL_OPTIONS, workers=1, progress=False)
    return out


@pytest.fixture
def http_root() -> Iterator[callable]:
    """Start loopback HTTP servers over directories; returns a function dir -> base URL. Stopped after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda directory: stack.enter_context(serve(directory)).url


TRAIN_SYNTH = {"classes": 6, "per_class": 24, "seed": 1}
# Tiny, fast, and still learnable: resnet18 from scratch at 40 px on the 6-class synth set.
FIT_ARGS = ("--arch", "resnet18", "--pretrained", "none", "--image-size", "40", "--batch-size", "8",
            "--workers", "0", "--lr", "0.003", "--lr-scheme", "flat", "--epochs", "5", "--wandb", "disabled",
            "--log-every", "1", "--crop-scale", "0.6", "1.0", "--ema-decay", "0", "--tta", "none")
# (fit's default EMA and flip TTA are off here, for speed: the EMA, TTA and resume tests turn them on.)


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-class synth shard set with uneven shards (8 samples each, the last ones shorter)."""
    return synth_shards(tmp_path_factory.mktemp("train-synth"), TRAIN_SYNTH,
                        BuildOptions(resize_short=48, shard_samples=8))


# fitted_run's eval settings, not the defaults (a larger eval crop than --image-size 40, flip TTA), so that
# evaluate, predict and export are seen to follow what the run recorded.
EVAL_ARGS = ("--eval-image-size", "48", "--tta", "flip")
# What results.json, metrics.json and W&B record of them: the short side resized to round(48 / 0.875) first.
FITTED_EVAL = {"image_size": 48, "resize_short": 55, "crop_pct": 0.875, "interpolation": "bilinear", "tta": "flip",
               "weights": "raw"}


@pytest.fixture(scope="session")
def fitted_run(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete `fit` (offline W&B, EVAL_ARGS), shared by the tests that read what a run leaves behind."""
    run_dir = tmp_path_factory.mktemp("runs") / "fitted"
    result = run_cli("train", "fit", "--shards", str(train_shards), *FIT_ARGS, *EVAL_ARGS, "--wandb", "offline",
                     "--run-dir", str(run_dir), env={"WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir
