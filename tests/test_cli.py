"""A quick command line: `python -m train` checks its options and the shard set, and prints `--help`, without
importing torch (seconds of start-up): its choices come from plain name lists (train.names), each equal to
the registry that defines it. bench/cli.py measures the time against `import torch`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import run_python

from train import names

# Runs `python -m train ARGS` and reports, however it ends, which heavy modules were imported.
PROBE = """
import json, runpy, sys
sys.argv = ["python -m train", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("train", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "torchvision", "timm", "albumentations", "cv2", "matplotlib") if m in sys.modules)
print(json.dumps({"heavy": heavy}), file=sys.stderr)
sys.exit(code)
"""


def _probe(*args: str) -> tuple[int, list[str], str]:
    result = run_python("-c", PROBE, *args)
    *text, last = result.stderr.strip().splitlines()
    return result.returncode, json.loads(last)["heavy"], "\n".join(text) + result.stdout


def test_name_lists_equal_their_registries() -> None:
    from train import archs, augment, evaltime, optim

    assert tuple(augment.TRAIN_PRESETS) == names.AUGMENT_PRESETS
    assert tuple(optim.OPTIMIZERS) == names.OPTIMIZERS
    assert (optim.AUTO, *optim.SCHEMES) == names.LR_SCHEMES
    assert tuple(evaltime.TTA_VIEWS) == names.TTA_MODES
    assert tuple(source.syntax for source in archs.SOURCES) == names.ARCH_SYNTAX


@pytest.mark.parametrize("args", [("fit", "--help"), ("lr-find", "--help"), ("--help",)], ids=" ".join)
def test_help_imports_no_torch(args: tuple[str, ...]) -> None:
    status, heavy, output = _probe(*args)
    assert status == 0 and "usage: python -m train" in output, output[-2000:]
    assert heavy == []


def test_bad_options_and_a_bad_shard_set_are_reported_before_torch(tmp_path: Path, train_shards: Path) -> None:
    run = ("--run-dir", str(tmp_path / "run"))
    for args, fragment in ((("fit", "--shards", str(tmp_path / "nowhere"), *run), "no shard set at"),
                           (("fit", "--shards", str(train_shards), "--optimizer", "adagrad", *run), "adagrad"),
                           (("lr-find", "--shards", str(train_shards), "--lr", "-1", "--out", str(tmp_path)),
                            "--lr must be > 0"),
                           (("fit", "--shards", str(train_shards), "--epochs", "0", *run), "--epochs")):
        status, heavy, output = _probe(*args)
        assert status != 0 and fragment in output and "Traceback" not in output, output[-2000:]
        assert heavy == [], args
    # the model's own checks come once options and shards are good, and import torch
    status, heavy, output = _probe("fit", "--shards", str(train_shards), "--arch", "resnet5", *run)
    assert status == 2 and "resnet5" in output and "torch" in heavy, output[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_fit_with_our_resnet_imports_no_other_model_zoo(tmp_path: Path, train_shards: Path) -> None:
    """torchvision (~1.3 s: it pulls in torch._dynamo), timm and matplotlib are imported on first use: a fit of
    our ResNet that stops at its first check after the trainer is loaded has imported none of them."""
    status, heavy, output = _probe("fit", "--shards", str(train_shards), "--arch", "resnet18", "--pretrained", "none",
                                   "--batch-size", "100000", "--run-dir", str(tmp_path / "run"))
    assert status == 1 and "fewer than one global batch" in output, output[-2000:]
    assert heavy == ["albumentations", "cv2", "torch"]
