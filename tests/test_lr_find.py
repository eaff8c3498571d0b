"""lr-find: the range test itself, on the real model and stream (weights untouched), the CLI, fit --lr auto,
and losses that are NaN from the start."""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import FIT_ARGS
from support import (
    ONE_THREAD,
    ROOT,
    assert_one_line_error,
    assert_png,
    run_cli,
    run_main,
    run_script,
    same_state,
)
from torch import nn

from pipeline.errors import UserError
from train import config as cfgmod
from train import lr_finder, rundir

FAST_SWEEP = ("--start-lr", "1e-5", "--end-lr", "10", "--steps", "20")


def _tiny_problem() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """A small MLP, Adam with two groups (LR ratio 1:10), and a train step on a fixed batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    optimizer = torch.optim.Adam([{"params": model[:2].parameters(), "lr": 0.1},
                                  {"params": model[3].parameters(), "lr": 1.0}])

    def step() -> float:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    return model, optimizer, step


def test_range_test_sweeps_exponentially_keeps_group_ratios_and_restores_everything() -> None:
    model, optimizer, step = _tiny_problem()
    step()  # some optimizer state (Adam moments) to restore
    model_before, optimizer_before = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    seen: list[tuple[float, float]] = []

    def recording_step() -> float:
        seen.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"]))
        return step()

    result = lr_finder.range_test(recording_step, model, optimizer, start_lr=1e-4, end_lr=1e3, steps=60)
    assert result.diverged and len(result.lrs) < 60  # Adam at LR 1000 blows the loss up: stopped early
    assert result.lrs[0] == pytest.approx(1e-4)
    ratios = np.diff(np.log(result.lrs))
    assert np.allclose(ratios, math.log(1e7) / 59)  # evenly spaced in log LR
    assert all(small == pytest.approx(big / 10) for small, big in seen)  # discriminative ratio kept
    assert [big for _, big in seen][:len(result.lrs)] == pytest.approx(result.lrs)
    assert result.lrs[0] <= result.suggested_lr <= result.lrs[-1]
    assert result.suggested_lr == result.lrs[result.suggested_index]
    assert result.losses[result.suggested_index] < result.losses[0]  # on the descent
    assert same_state(model.state_dict(), model_before) and same_state(optimizer.state_dict(), optimizer_before)


def test_steepest_descent_before_the_minimum() -> None:
    i = np.arange(90)
    curve = 2.0 - 1.5 / (1 + np.exp(-(i - 40) / 4.0))  # steepest at 40
    curve[70:] += np.linspace(0, 8, 20)  # blow-up after the minimum: steep, but rising
    assert lr_finder.steepest_descent(list(curve)) == 40


def test_a_suggestion_comes_only_from_where_the_loss_was_measured_falling() -> None:
    """A step's loss is measured before it trains at its LR: the last LR's effect is never seen, so it is never
    suggested, even when the loss falls fastest there; a loss that never falls gives no suggestion."""
    assert lr_finder.steepest_descent([1.0, 0.99, 0.97, 0.9, 0.7, 0.2]) == 4  # not 5, the end of the sweep
    for never_falls in ([1.0, 2.0, 3.0, 4.0], [1.0] * 12, [2.0, 2.5, 3.0, 2.9]):
        with pytest.raises(UserError, match="the smoothed loss never fell over the"):
            lr_finder.steepest_descent(never_falls)


def test_too_few_steps_are_refused_by_lr_find_and_fit_lr_auto(train_shards: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """3 steps used to suggest the end LR (10) and `fit --lr auto` trained at it: one line, before any work."""
    for command, out in (("lr-find", ("--out", str(tmp_path / "lrf"))), ("fit", ("--run-dir", str(tmp_path / "run")))):
        result = run_main(capsys, command, "--shards", str(train_shards), *FIT_ARGS, "--lr", "auto",
                          "--lr-find-steps", "3", *out)
        assert result.returncode == 2
        assert_one_line_error(result, "--lr-find-steps/--steps must be >= 20, got 3")
        assert "suggested LR" not in result.stdout
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="--steps must be >= 20"):
        lr_finder.exponential_lrs(1e-7, 10, 19)


def test_fit_lr_auto_refuses_when_the_loss_never_fell(train_shards: Path, tmp_path: Path) -> None:
    """A sweep starting where the loss only rises: it used to 'suggest' its first LR and train at it."""
    run_dir = tmp_path / "run"
    result = run_cli("train", "fit", "--shards", str(train_shards), *FIT_ARGS, "--epochs", "1", "--lr", "auto",
                     "--lr-find-start", "0.05", "--lr-find-end", "50", "--lr-find-steps", "20", "--run-dir",
                     str(run_dir), env=ONE_THREAD)
    assert_one_line_error(result, "lr-find: the smoothed loss never fell over the ",
                          "lower --lr-find-start/--start-lr or run more --lr-find-steps/--steps")
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()


def _constant_step(losses: list[float]) -> Any:
    values = iter(losses)
    return lambda: next(values)


def test_nan_from_the_first_step_and_too_short_sweeps_are_errors() -> None:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(UserError, match="loss is nan from the first step"):
        lr_finder.range_test(_constant_step([math.nan]), model, optimizer, steps=20)
    with pytest.raises(UserError, match="diverged after 1 step"):
        lr_finder.range_test(_constant_step([1.0, math.inf]), model, optimizer, steps=20)
    result = lr_finder.range_test(_constant_step([1.0, 0.9, 0.8, 100.0]), model, optimizer, steps=20)
    assert result.diverged and len(result.lrs) == 4  # 0.05 * 100 + 0.95 * 0.8 > 5 x best: stop
    with pytest.raises(UserError, match="--start-lr"):
        lr_finder.exponential_lrs(1.0, 0.1, 10)


def test_real_model_weights_untouched_and_nan_sweep_restores_too(train_shards: Path, tmp_path: Path) -> None:
    """lr_finder.lr_find on fit's model, groups and stream (tests/lr_find_restores.py, in its own process):
    every model and optimizer tensor is restored, after a good sweep and after one that diverges."""
    out = tmp_path / "report.json"
    result = run_script(ROOT / "tests" / "lr_find_restores.py", str(out), "--shards", str(train_shards),
                        *FIT_ARGS, "--lr-scheme", "notebook", "--lr-find-start", "1e-4", "--lr-find-steps", "20",
                        env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert len(report["lrs"]) == 20 and report["lrs"][0] <= report["suggested_lr"] <= report["lrs"][-1]
    assert report["restored"] and report["accelerator_step"] == 0
    assert "diverged after 1 step" in report["nan_error"]
    assert report["restored_after_nan"]


def test_lr_find_cli_writes_plot_and_values(train_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "lrf"
    result = run_cli("train", "lr-find", "--shards", str(train_shards), *FIT_ARGS, "--out", str(out), *FAST_SWEEP,
                     env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    values = json.loads((out / "lr_find.json").read_text())
    assert set(values) == {"suggested_lr", "lrs", "losses"}
    assert 2 < len(values["lrs"]) == len(values["losses"]) <= 20
    assert values["lrs"][0] == pytest.approx(1e-5)
    assert values["lrs"][0] <= values["suggested_lr"] < values["lrs"][-1]  # the last LR's effect is unmeasured
    assert all(math.isfinite(v) for v in values["losses"])
    assert f"suggested LR: {values['suggested_lr']:.4g}" in result.stdout
    assert_png(out / "lr_find.png")


def test_pretrained_weights_holding_nan_are_named_at_load(train_shards: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """One NaN in one tensor: named when the weights load (it used to surface as a NaN loss, or in `fit` as a
    divergence with advice to lower --lr)."""
    from train.model import build_model

    weights = build_model("resnet18", 6).state_dict()
    weights["layer2.0.conv1.weight"][0, 0, 0, 0] = math.nan
    torch.save(weights, tmp_path / "nan.pth")
    out = tmp_path / "lrf"
    for command, where in (("lr-find", ("--out", str(out), *FAST_SWEEP)), ("fit", ("--run-dir", str(tmp_path / "run")))):
        result = run_main(capsys, command, "--shards", str(train_shards), *FIT_ARGS, "--pretrained",
                          str(tmp_path / "nan.pth"), *where)
        line = assert_one_line_error(result, f"--pretrained: {tmp_path / 'nan.pth'} holds NaN or inf in 1 tensor(s) "
                                             "(first: layer2.0.conv1.weight)")
        assert "lower --lr" not in line and "diverged" not in result.stdout + result.stderr
    assert not (out / "lr_find.png").exists() and not (out / "lr_find.json").exists()
    assert not list((tmp_path / "run").glob("checkpoints/*"))


def test_fit_lr_auto_records_the_choice(train_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("train", "fit", "--shards", str(train_shards), *FIT_ARGS, "--epochs", "1", "--lr", "auto",
                     "--lr-find-start", "1e-5", "--lr-find-steps", "20", "--run-dir", str(run_dir),
                     env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    chosen = json.loads((run_dir / "lr_find" / "lr_find.json").read_text())["suggested_lr"]
    assert_png(run_dir / "lr_find" / "lr_find.png")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["lr"] == pytest.approx(chosen) and isinstance(saved["lr"], float)
    first = next(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "step")
    assert first["lr"]["fc"] == pytest.approx(chosen / cfgmod.Config.div_factor)  # one-cycle from that peak
    assert (run_dir / "results.json").is_file()


def test_lr_auto_in_config_and_on_resume(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    cfgmod.add_arguments(parser)
    assert cfgmod.make_config(parser.parse_args(["--lr", "auto"])).lr == "auto"
    (tmp_path / "c.yaml").write_text("lr: auto\n")
    config = cfgmod.make_config(parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--shards", "s"]))
    assert config.lr == "auto" and cfgmod.check(config) == []
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr", "fast"])
    assert any("--steps" in p for p in cfgmod.check(cfgmod.Config(shards="s", lr_find_steps=1)))

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-00000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000004" / "trainer.json").write_text("{}")
    cfgmod.save(cfgmod.Config(lr=0.0123), run_dir / "config.yaml")
    resumed = cfgmod.Config(lr="auto", resume="auto", run_dir=str(run_dir))
    assert rundir.resolve_auto_lr(resumed).lr == 0.0123  # what lr-find chose when the run started; no new sweep
    fresh = cfgmod.Config(lr="auto", run_dir=str(run_dir))
    assert rundir.resolve_auto_lr(fresh).lr == "auto"
