"""Checkpoints in-process with a real single-process Accelerator and a tiny model: saving, pruning, the order
and the names that count, validation of damaged files, the best model, temporaries, and a failed write."""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import damage_inside
from torch import nn

from pipeline.errors import UserError
from train import checkpoint, lifecycle
from train.data.topology import Topology
from train.data.trainstream import TrainStream
from train.lifecycle import TRAINER_KEYS, Progress
from train.metrics import Totals
from train.optim import build_scheduler


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


class Trainer:
    """A tiny model, its optimizer and one-cycle schedule, prepared and registered as fit does."""

    def __init__(self, accelerator, seed: int = 0) -> None:
        from accelerate import Accelerator

        torch.manual_seed(seed)
        self.accelerator = accelerator = Accelerator(cpu=True)  # a fresh one: it keeps what it prepared
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.scheduler = build_scheduler(self.optimizer.optimizer, 100)
        accelerator.register_for_checkpointing(self.scheduler)

    def step(self) -> None:
        loss = self.model(torch.randn(5, 4)).logsumexp(dim=1).mean()
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()

    def save(self, run_dir: Path, step: int, keep: int = 10) -> Path:
        return checkpoint.save_checkpoint(self.accelerator, run_dir, trainer_state(step), keep)


def trainer_state(step: int) -> dict[str, object]:
    """The trainer.json of a one-process run's checkpoint at an epoch's start, at `step`."""
    stream = TrainStream(Topology(processes=1, workers=0, batch_size=0, grad_accum=1, shuffle_buffer=0), 0)
    return lifecycle.trainer_state(Progress(global_step=step), stream, Totals())


def save_steps(accelerator: object, run_dir: Path, steps: list[int], keep: int = 10) -> Trainer:
    """Checkpoints at `steps` of one tiny training (`accelerator` is unused: each Trainer makes its own)."""
    trainer = Trainer(accelerator)
    for step in steps:
        trainer.step()
        trainer.save(run_dir, step, keep)
    return trainer


def test_saved_checkpoint_is_whole_and_loads(accelerator, tmp_path: Path) -> None:
    trainer = save_steps(accelerator, tmp_path, [3])
    saved = tmp_path / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in saved.iterdir()) == ["custom_checkpoint_0.pkl", "model.safetensors",
                                                        "optimizer.bin", "random_states_0.pkl", "trainer.json"]
    assert checkpoint.checkpoint_problem(saved, TRAINER_KEYS) is None
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000003"]  # no temporaries

    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    lr = trainer.optimizer.param_groups[0]["lr"]
    other = Trainer(accelerator, seed=1)
    other.accelerator.load_state(str(saved))
    assert all(torch.equal(weights[k], v) for k, v in other.model.state_dict().items())
    assert other.scheduler.last_epoch == 1 and other.optimizer.param_groups[0]["lr"] == lr


def test_pruning_order_and_stray_names(accelerator, tmp_path: Path) -> None:
    save_steps(accelerator, tmp_path, [1, 2, 10, 100, 1000], keep=3)
    folder = tmp_path / "checkpoints"
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == [
        "step-00000010", "step-00000100", "step-00001000"]
    # names that are not step-<number>, and a step directory without trainer.json (its rename never happened)
    for stray in ("step-old", "step-", "step-12a", "step-00000050", ".tmp-step-00002000", "best"):
        (folder / stray).mkdir()
        if stray != "step-00000050":
            (folder / stray / "trainer.json").write_text("{}")
    (folder / "step-123456789").mkdir()  # nine digits: ordered by number, not by name
    shutil.copy(folder / "step-00001000" / "trainer.json", folder / "step-123456789" / "trainer.json")
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == [
        "step-00000010", "step-00000100", "step-00001000", "step-123456789"]
    assert checkpoint.complete_checkpoints(tmp_path / "nothing-here") == []


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = [  # (what is done to the checkpoint, the problem named)
    (lambda c: _truncate(c / "model.safetensors"), "model.safetensors is truncated"),
    (lambda c: _truncate(c / "model.safetensors", 0.001), "model.safetensors is truncated"),
    (lambda c: (c / "trainer.json").write_text('{"epoch": 0, "glob'), "trainer.json is unreadable"),
    (lambda c: (c / "trainer.json").write_text('["a list"]'), "trainer.json lacks epoch"),
    (lambda c: (c / "trainer.json").write_text(json.dumps({k: 0 for k in TRAINER_KEYS if k != "partial"})),
     "trainer.json lacks partial"),
    (lambda c: (c / "trainer.json").write_text(json.dumps(dict.fromkeys(TRAINER_KEYS, 7))), "trainer.json says step 7, not "),
    (lambda c: _truncate(c / "optimizer.bin"), "optimizer.bin is unreadable"),
    (lambda c: _truncate(c / "custom_checkpoint_0.pkl"), "custom_checkpoint_0.pkl is unreadable"),
    (lambda c: _truncate(c / "random_states_0.pkl"), "random_states_0.pkl is unreadable"),
    (lambda c: (c / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
    (lambda c: (c / "optimizer.bin").unlink(), "optimizer.bin is missing"),
    (lambda c: (c / "model.safetensors").write_bytes(b""), "model.safetensors is truncated"),
]


def test_damaged_checkpoints_are_named(accelerator, tmp_path: Path) -> None:
    save_steps(accelerator, tmp_path / "good", [3])
    good = tmp_path / "good" / "checkpoints" / "step-00000003"
    for index, (damage, problem) in enumerate(DAMAGE):
        copy = Path(shutil.copytree(good, tmp_path / str(index) / "step-00000003"))
        damage(copy)
        found = checkpoint.checkpoint_problem(copy, TRAINER_KEYS)
        assert found is not None and problem in found, (index, found)
    # what the validation stands for: accelerate cannot load a truncated optimizer, and silently skips
    # a missing RNG state (so the run would go on with another random state)
    with pytest.raises(RuntimeError):
        Trainer(accelerator).accelerator.load_state(str(tmp_path / "6" / "step-00000003"))


def test_damage_in_place_is_caught_by_the_recorded_sha256(accelerator, tmp_path: Path) -> None:
    """Same size, intact structure: only the sha256 trainer.json records at save tells. A checkpoint written
    before they were recorded still loads; NaN in its weights is named, zeros in them cannot be seen."""
    save_steps(accelerator, tmp_path / "good", [3])
    good = tmp_path / "good" / "checkpoints" / "step-00000003"
    recorded = json.loads((good / "trainer.json").read_text())["files"]
    assert sorted(recorded) == ["custom_checkpoint_0.pkl", "model.safetensors", "optimizer.bin", "random_states_0.pkl"]
    for name in recorded:
        copy = Path(shutil.copytree(good, tmp_path / name / "step-00000003"))
        damage_inside(copy / name, 0x00 if name.endswith(".safetensors") else 0x5a)
        assert checkpoint.checkpoint_problem(copy, TRAINER_KEYS) == (
            f"{name} is damaged (its sha256 differs from the one recorded when it was saved)")
    old = Path(shutil.copytree(good, tmp_path / "old" / "step-00000003"))
    state = json.loads((old / "trainer.json").read_text())
    (old / "trainer.json").write_text(json.dumps({**state, "files": "garbled"}))
    assert checkpoint.checkpoint_problem(old, TRAINER_KEYS) == "the recorded file checksums ('files') are damaged"
    del state["files"]
    (old / "trainer.json").write_text(json.dumps(state))
    assert checkpoint.checkpoint_problem(old, TRAINER_KEYS) is None
    damage_inside(old / "model.safetensors", 0x00)
    assert checkpoint.checkpoint_problem(old, TRAINER_KEYS) is None  # the limit of a checkpoint without sha256
    damage_inside(old / "model.safetensors", 0xff)
    assert checkpoint.checkpoint_problem(old, TRAINER_KEYS).startswith("model.safetensors holds NaN or inf in ")


META = {"arch": "resnet18", "classes": ["a", "b", "c"], "image_size": 40, "crop_pct": 0.875, "mean": [0.5] * 3,
        "std": [0.2] * 3}


def test_best_model_saved_replaced_and_loaded(accelerator, tmp_path: Path) -> None:
    trainer = Trainer(accelerator)
    checkpoint.save_best(accelerator, tmp_path, trainer.model, {**META, "epoch": 1})
    trainer.step()
    checkpoint.save_best(accelerator, tmp_path, trainer.model, {**META, "epoch": 2})
    state, loaded = checkpoint.load_best(tmp_path)
    assert loaded["epoch"] == 2
    assert all(torch.equal(state[k], v) for k, v in trainer.model.state_dict().items())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best"]


def test_remove_temporaries(accelerator, tmp_path: Path) -> None:
    save_steps(accelerator, tmp_path, [3])
    folder = tmp_path / "checkpoints"
    checkpoint.save_best(accelerator, tmp_path, Trainer(accelerator).model, {"epoch": 1})
    for name in (".tmp-step-00000006", ".tmp-best", ".best.old-4242"):
        (folder / name).mkdir()
        (folder / name / "model.safetensors").write_bytes(b"partial")
    for name in (".config.yaml.tmp-77", ".run.json.tmp-78", ".lock", ".lock.meta", ".lock.holder"):
        (tmp_path / name).write_text("x")
    (folder / ".trainer.json.tmp-9").write_text("{")
    removed = checkpoint.remove_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".best.old-4242", ".config.yaml.tmp-77", ".run.json.tmp-78",
                                               ".tmp-best", ".tmp-step-00000006", ".trainer.json.tmp-9"]
    assert sorted(p.name for p in folder.iterdir()) == ["best", "step-00000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", ".lock.holder", ".lock.meta", "checkpoints"]


def test_a_kill_between_the_renames_of_best_keeps_the_old_best(accelerator, tmp_path: Path) -> None:
    """replace_dir moves best aside, then renames the new one in: a kill in between leaves no best."""
    trainer = Trainer(accelerator)
    checkpoint.save_best(accelerator, tmp_path, trainer.model, {"epoch": 1})
    folder = tmp_path / "checkpoints"
    (folder / "best").rename(folder / ".best.old-31337")
    (folder / ".tmp-best").mkdir()  # the new one, never renamed in
    checkpoint.remove_temporaries(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["best"]
    meta = json.loads((folder / "best" / "meta.json").read_text())
    assert meta.pop("files").keys() == {"model.safetensors"} and meta == {"epoch": 1}
    assert load_file(str(folder / "best" / "model.safetensors")).keys() == trainer.model.state_dict().keys()


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past `limit` bytes fail as on a full disk (EFBIG instead of ENOSPC: the same OSError path)."""
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, previous[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, previous_handler)


def test_a_failed_write_is_one_error_and_keeps_the_previous_checkpoint(accelerator, tmp_path: Path) -> None:
    trainer = save_steps(accelerator, tmp_path, [3])
    checkpoint.save_best(accelerator, tmp_path, trainer.model, {**META, "epoch": 1})
    folder = tmp_path / "checkpoints"
    before = {p.name: p.read_bytes() for p in (folder / "step-00000003").iterdir()}
    trainer.step()
    with file_size_limit(200), pytest.raises(UserError) as failed:
        trainer.save(tmp_path, 6)
    message = str(failed.value)
    assert str(folder / "step-00000006") in message and "step-00000003, is intact" in message
    assert "\n" not in message
    with file_size_limit(200), pytest.raises(UserError, match="the previous best model is intact"):
        checkpoint.save_best(accelerator, tmp_path, trainer.model, {**META, "epoch": 2})
    assert sorted(p.name for p in folder.iterdir()) == ["best", "step-00000003"]  # no temporaries left
    assert {p.name: p.read_bytes() for p in (folder / "step-00000003").iterdir()} == before
    assert checkpoint.load_best(tmp_path)[1] == {**META, "epoch": 1}
