"""The discriminative LRs that `fit` really trains with: at every logged step, each group's LR is its
scheme's multiplier (written out by hand here) times the fc group's, for a fixed --lr and for --lr auto."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FIT_ARGS
from support import ONE_THREAD, run_cli

NOTEBOOK = {"stem": 1 / 10, "layer1": 1 / 8, "layer2": 1 / 6, "layer3": 1 / 4, "layer4": 1 / 2, "fc": 1.0}
GEOMETRIC_07 = {"stem": 0.7**5, "layer1": 0.7**4, "layer2": 0.7**3, "layer3": 0.7**2, "layer4": 0.7, "fc": 1.0}


def _fit_step_lrs(shards: Path, run_dir: Path, *extra: str) -> list[dict[str, float]]:
    result = run_cli("train", "fit", "--shards", str(shards), *FIT_ARGS, "--epochs", "1", "--run-dir", str(run_dir),
                     *extra, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["lr"] for r in map(json.loads, lines) if r["kind"] == "step"]


def _assert_ratios(steps: list[dict[str, float]], multipliers: dict[str, float]) -> None:
    assert steps and all(set(lrs) == set(multipliers) for lrs in steps)
    for lrs in steps:
        assert {g: lrs[g] / lrs["fc"] for g in lrs} == pytest.approx(multipliers, rel=1e-9), lrs
    fc = [lrs["fc"] for lrs in steps]
    assert max(fc) > 2 * fc[0]  # one cycle: the LR rose from max/div_factor (not a flat LR)


def test_notebook_scheme_with_a_fixed_lr(train_shards: Path, tmp_path: Path) -> None:
    steps = _fit_step_lrs(train_shards, tmp_path / "run", "--lr-scheme", "notebook", "--lr", "0.004")
    _assert_ratios(steps, NOTEBOOK)
    assert steps[0]["fc"] == pytest.approx(0.004 / 25)  # one-cycle starts at peak / div_factor


def test_geometric_scheme_keeps_its_ratios_under_lr_auto(train_shards: Path, tmp_path: Path) -> None:
    """--lr auto scales every group to the suggestion times its multiplier (not every group to it)."""
    run_dir = tmp_path / "run"
    steps = _fit_step_lrs(train_shards, run_dir, "--lr-scheme", "geometric", "--lr-decay", "0.7", "--lr", "auto",
                          "--lr-find-start", "1e-5", "--lr-find-steps", "20")
    _assert_ratios(steps, GEOMETRIC_07)
    chosen = json.loads((run_dir / "lr_find" / "lr_find.json").read_text())["suggested_lr"]
    assert steps[0]["fc"] == pytest.approx(chosen / 25)


def test_auto_scheme_is_flat_from_scratch_and_the_notebook_when_fine_tuning(tmp_path: Path) -> None:
    import torch
    from accelerate import Accelerator

    from train.config import Config
    from train.engine import build_model_and_optimizer
    from train.model import build_model
    from train.optim import group_lrs

    weights = tmp_path / "resnet18.pth"
    torch.save(build_model("resnet18", 1000, "none", 32).state_dict(), weights)
    manifest = {"classes": [f"class {i}" for i in range(3)]}
    for pretrained, expected in (("none", dict.fromkeys(NOTEBOOK, 1.0)), (str(weights), NOTEBOOK)):
        config = Config(arch="resnet18", pretrained=pretrained, image_size=32, lr=0.01, channels_last=False)
        assert config.lr_scheme == "auto"  # the default
        _, optimizer = build_model_and_optimizer(Accelerator(cpu=True), config, manifest)
        lrs = group_lrs(optimizer)
        assert {group: lr / lrs["fc"] for group, lr in lrs.items()} == pytest.approx(expected, rel=1e-12)
