"""--ema-decay: the EMA update against a hand computation of timm's decay warm-up (parameters and BatchNorm
buffers), its state through a checkpoint, which weights win an epoch, and a fit run's records: both valid
curves in metrics.jsonl and W&B, the best checkpoint holding the weights that won. Resume exactness with the
EMA on is in the resume tests (test_fit, test_signals, test_elastic, test_distributed), 1 vs 2 processes in
test_distributed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import wandb_log
from conftest import FIT_ARGS
from safetensors.torch import load_file
from support import damage_inside, run_cli
from test_checkpoint import trainer_state
from torch import nn

from train import checkpoint, ema
from train.lifecycle import TRAINER_KEYS
from train.optim import build_scheduler

DECAY = 0.6  # reached by the warm-up at step 4 (1 - 4 ** -2/3 = 0.603): steps 2-3 warm up, 4-6 are capped


class Trainer:
    """A tiny model with BatchNorm, its optimizer and schedule, and its EMA, registered as fit does."""

    def __init__(self, seed: int = 0) -> None:
        from accelerate import Accelerator

        torch.manual_seed(seed)
        self.accelerator = Accelerator(cpu=True)
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
        self.model, self.optimizer = self.accelerator.prepare(model, torch.optim.Adam(model.parameters(), lr=0.05))
        self.scheduler = build_scheduler(self.optimizer.optimizer, 100)
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.averaged = ema.create(self.accelerator, self.model, DECAY)
        self.step = 0

    def train_step(self) -> None:
        loss = self.model(torch.randn(5, 4) * 3 + 1).logsumexp(dim=1).mean()
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        self.step += 1
        ema.update(self.accelerator, self.averaged, self.model, self.step)


def test_update_is_timm_warm_up_over_parameters_and_buffers() -> None:
    """Six steps against the formula: step 1 copies, then e = d * e + (1 - d) * w with
    d = min(1 - step ** (-2/3), DECAY), for every parameter and BatchNorm running statistic; the counter of
    batches is copied."""
    trainer = Trainer()
    expected: dict[str, torch.Tensor] = {}
    decays = []
    for step in range(1, 7):
        trainer.train_step()
        decay = 0.0 if step == 1 else min(1 - step ** (-2 / 3), DECAY)
        decays.append(decay)
        for name, value in trainer.model.state_dict().items():
            value = value.detach().double()
            expected[name] = value if step == 1 or name.endswith("num_batches_tracked") else (
                decay * expected[name] + (1 - decay) * value)
    assert decays[1:3] == pytest.approx([1 - 2 ** (-2 / 3), 1 - 3 ** (-2 / 3)]) and decays[3:] == [DECAY] * 3

    averaged = trainer.averaged.module.state_dict()
    assert averaged.keys() == expected.keys() and {"1.running_mean", "1.running_var"} <= set(averaged)
    for name, value in averaged.items():
        assert torch.allclose(value.double(), expected[name], rtol=0, atol=1e-6), name
    assert int(averaged["1.num_batches_tracked"]) == 6
    raw = trainer.model.state_dict()
    assert (averaged["0.weight"] - raw["0.weight"]).abs().max() > 1e-3  # an average, not a copy
    assert (averaged["1.running_mean"] - raw["1.running_mean"]).abs().max() > 1e-3


def test_no_ema_when_the_decay_is_0() -> None:
    from accelerate import Accelerator

    assert ema.create(Accelerator(cpu=True), nn.Linear(2, 2), 0.0) is None


def test_the_ema_is_saved_in_every_checkpoint_sealed_and_restored(tmp_path: Path) -> None:
    trainer = Trainer()
    for _ in range(3):
        trainer.train_step()
    saved = checkpoint.save_checkpoint(trainer.accelerator, tmp_path, trainer_state(3), keep=2)
    state = json.loads((saved / checkpoint.TRAINER_STATE).read_text())
    assert ema.EMA_STATE in state["files"]  # its sha256 recorded: damage is caught like any file's
    assert checkpoint.checkpoint_problem(saved, TRAINER_KEYS) is None

    resumed = Trainer(seed=1)
    resumed.accelerator.load_state(str(saved))
    resumed.step = 3
    for name, value in trainer.averaged.module.state_dict().items():
        assert torch.equal(resumed.averaged.module.state_dict()[name], value), name
    trainer.train_step()  # the next update continues the same sequence
    resumed.model.load_state_dict(trainer.model.state_dict())
    ema.update(resumed.accelerator, resumed.averaged, resumed.model, 4)
    for name, value in trainer.averaged.module.state_dict().items():
        assert torch.equal(resumed.averaged.module.state_dict()[name], value), name

    damage_inside(saved / ema.EMA_STATE, 0x55)
    assert checkpoint.checkpoint_problem(saved, TRAINER_KEYS).startswith(f"{ema.EMA_STATE} is damaged")


def _scored(raw: float | None, averaged: float | None, samples: int = 6) -> dict[str, dict]:
    return {ema.RAW: {"loss": raw, "num_samples": samples}, ema.EMA: {"loss": averaged, "num_samples": samples}}


@pytest.mark.parametrize("scored,weights", [
    (_scored(1.0, 0.9), ema.EMA),
    (_scored(0.9, 1.0), ema.RAW),
    (_scored(1.0, 1.0), ema.RAW),  # a tie keeps the trained weights
    (_scored(float("nan"), 2.0), ema.EMA),  # a finite loss beats a non-finite one
    (_scored(2.0, float("nan")), ema.RAW),
    (_scored(float("inf"), float("nan")), ema.RAW),
    (_scored(None, None, samples=0), ema.EMA),  # nothing to compare: the average the user asked for
    ({ema.RAW: {"loss": 1.0, "num_samples": 6}}, ema.RAW),
])
def test_the_lower_valid_loss_wins(scored: dict, weights: str) -> None:
    assert ema.winner(scored) == weights


EMA_ARGS = (*FIT_ARGS, "--epochs", "3", "--ema-decay", "0.9", "--keep-checkpoints", "10", "--wandb", "offline")


@pytest.fixture(scope="module")
def ema_run(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    result = run_cli("train", "fit", "--shards", str(train_shards), *EMA_ARGS, "--run-dir", str(run_dir),
                     env={"WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _epochs(run_dir: Path) -> list[dict]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in records if r["kind"] == "epoch"]


def test_both_weights_validated_and_the_best_keeps_the_winner(ema_run: Path) -> None:
    epochs = _epochs(ema_run)
    assert len(epochs) == 3
    for record in epochs:
        raw, averaged, weights = record["valid_raw"], record["valid_ema"], record["valid_weights"]
        assert raw["num_samples"] == averaged["num_samples"] > 0 and raw["loss"] != averaged["loss"]
        assert weights == ema.winner({ema.RAW: raw, ema.EMA: averaged})
        assert record["valid"] == record[f"valid_{weights}"]

    results = json.loads((ema_run / "results.json").read_text())
    best = min(epochs, key=lambda r: r["valid"]["loss"])
    assert results["best_epoch"] == best["epoch"] and results["valid"]["loss"] == best["valid"]["loss"]
    meta = json.loads((ema_run / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["weights"] == results["eval"]["weights"] == best["valid_weights"] and meta["epoch"] == best["epoch"]

    # the best model is the winner's weights at the end of its epoch: the model of that epoch-end checkpoint,
    # or the EMA saved beside it
    saved = ema_run / "checkpoints" / f"step-{best['step']:08d}"
    if meta["weights"] == ema.EMA:
        state = {k.removeprefix("module."): v for k, v in torch.load(saved / ema.EMA_STATE).items()}
    else:
        state = load_file(str(saved / "model.safetensors"))
    best_state = load_file(str(ema_run / "checkpoints" / "best" / "model.safetensors"))
    assert best_state.keys() == state.keys()
    assert all(torch.equal(best_state[k], state[k]) for k in state)


def test_wandb_gets_the_raw_and_the_ema_curves(ema_run: Path) -> None:
    (run_file,) = (ema_run / "wandb").glob("offline-run-*/run-*.wandb")
    history = [h for h in wandb_log.history(run_file) if "valid_ema/loss" in h]
    epochs = _epochs(ema_run)
    assert [h["valid_ema/loss"] for h in history] == pytest.approx([r["valid_ema"]["loss"] for r in epochs])
    assert [h["valid_raw/top1"] for h in history] == pytest.approx([r["valid_raw"]["top1"] for r in epochs])
    assert [h["valid/loss"] for h in history] == pytest.approx([r["valid"]["loss"] for r in epochs])
    assert wandb_log.config(run_file)["ema_decay"] == 0.9
