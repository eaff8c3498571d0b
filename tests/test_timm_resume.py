"""A timm model through fit's run options: bf16 mixed precision on CPU with channels_last, checkpoints mid-epoch,
and resumes from one, with an EMA of the weights. Resumed with the same layout it ends with the uninterrupted
run's weights, EMA and losses; resumed under another layout (batch x grad-accum, workers) it trains each
remaining sample once with the same LR schedule for every one of the model's groups.

A run killed right after its step-4 checkpoint is made by copying the uninterrupted run's directory without
what came after that checkpoint (as test_elastic's cut_at leaves a killed run)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from support import ONE_THREAD, max_ema_difference, run_cli
from test_elastic import recorded

from train import keylog

ARGS = ("--arch", "timm/resnet10t", "--pretrained", "none", "--image-size", "32", "--batch-size", "8", "--workers",
        "0", "--wandb", "disabled", "--log-every", "1", "--lr", "0.002", "--epochs", "1", "--checkpoint-every", "2",
        "--keep-checkpoints", "100", "--precision", "bf16", "--channels-last", "--ema-decay", "0.9", "--tta", "flip",
        "--no-plots")
CUT = 4  # the checkpoint resumed from, mid-epoch


def _fit(train_shards: Path, run: Path, keys: Path, *extra: str) -> str:
    result = run_cli("train", "fit", "--shards", str(train_shards), *ARGS, "--run-dir", str(run), *extra,
                     env={**ONE_THREAD, keylog.ENV: str(keys)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _killed_after_checkpoint(run: Path, copy: Path, step: int) -> Path:
    shutil.copytree(run, copy)
    for later in (copy / "checkpoints").iterdir():
        if later.name == "best" or int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    shutil.rmtree(copy / "report")
    (copy / "results.json").unlink()
    return copy


def _steps(run: Path) -> list[tuple[int, float, dict[str, float]]]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"], r["lr"]) for r in records if r["kind"] == "step"]


def _weights(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


@pytest.mark.e2e
def test_a_timm_run_in_bf16_resumes_exactly_and_under_another_layout(train_shards: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    _fit(train_shards, full, tmp_path / "keys-full")
    config = yaml.safe_load((full / "config.yaml").read_text())
    assert (config["precision"], config["channels_last"], config["arch"]) == ("bf16", True, "timm/resnet10t")
    steps = _steps(full)
    last = steps[-1][0]
    assert [s for s, _, _ in steps] == list(range(1, last + 1)) and last > CUT
    assert len(steps[0][2]) > 2  # the model's own groups, each with its LR

    same = _killed_after_checkpoint(full, tmp_path / "same", CUT)
    assert f"from step-{CUT:08d}" in _fit(train_shards, same, tmp_path / "keys-same", "--resume", "auto")
    assert _steps(same) == steps  # losses and every group's LR, step by step
    a, b = _weights(full, last), _weights(same, last)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # BatchNorm statistics included
    checkpoints = [run / "checkpoints" / f"step-{last:08d}" for run in (full, same)]
    assert max_ema_difference(*checkpoints) == 0  # the EMA of the weights too
    assert json.loads((same / "results.json").read_text()) == json.loads((full / "results.json").read_text())

    other = _killed_after_checkpoint(full, tmp_path / "other", CUT)
    _fit(train_shards, other, tmp_path / "keys-other", "--resume", "auto", "--batch-size", "4", "--grad-accum",
         "2", "--workers", "2")
    assert [(s, lrs) for s, _, lrs in _steps(other)] == [(s, lrs) for s, _, lrs in steps]
    before = recorded(tmp_path / "keys-full", CUT)
    after = [r for r in recorded(tmp_path / "keys-other") if r["step"] > CUT]
    seen = Counter(k for r in before + after for k in r["keys"])
    epoch = Counter(k for r in recorded(tmp_path / "keys-full") for k in r["keys"])
    assert max(seen.values()) == 1 and sum(seen.values()) == sum(epoch.values()) == last * 8
    assert min(r["step"] for r in after) == CUT + 1 and len(after) == 2 * (last - CUT)  # 2 batches of 4 a step
