"""Damaged or missing checkpoint files met by the real commands: `fit --resume auto` skips checkpoints whose
bytes differ from the sha256 recorded at save (same size, intact structure) and goes on from the newest
intact one; evaluate, predict and export name a damaged best model in one line; a run whose best model is
gone resumes, chooses it again and ends with results.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import FIT_ARGS
from support import ONE_THREAD, assert_one_line_error, damage_inside, run_cli, run_main

from train import checkpoint
from train.lifecycle import TRAINER_KEYS

STEPPED = ("--epochs", "2", "--checkpoint-every", "4", "--keep-checkpoints", "20")  # 8 steps an epoch


@pytest.fixture(scope="module")
def stepped_run(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch run with checkpoints at steps 4, 8 (end of epoch 1), 12 and 16 (the end)."""
    run_dir = tmp_path_factory.mktemp("stepped") / "run"
    result = run_cli("train", "fit", "--shards", str(train_shards), *FIT_ARGS, *STEPPED, "--run-dir", str(run_dir),
                     env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("step-*"))] == [
        "step-00000004", "step-00000008", "step-00000012", "step-00000016"]
    return run_dir


def _resume(run_dir: Path, train_shards: Path) -> object:
    return run_cli("train", "fit", "--shards", str(train_shards), *FIT_ARGS, *STEPPED, "--run-dir", str(run_dir),
                   "--resume", "auto", env=ONE_THREAD)


def test_damage_in_place_is_skipped_at_resume(stepped_run: Path, train_shards: Path, tmp_path: Path) -> None:
    """Zeros inside the weights, a damaged optimizer.bin, 0xff bytes inside the weights: three checkpoints
    skipped, one line each, and the run goes on from the newest intact one to its end."""
    run_dir = Path(shutil.copytree(stepped_run, tmp_path / "run"))
    folder = run_dir / "checkpoints"
    damage_inside(folder / "step-00000016" / "model.safetensors", 0x00)
    damage_inside(folder / "step-00000012" / "optimizer.bin", 0x5a)
    damage_inside(folder / "step-00000008" / "model.safetensors", 0xff)
    result = _resume(run_dir, train_shards)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "diverged" not in result.stderr + result.stdout
    damaged = "is damaged (its sha256 differs from the one recorded when it was saved)"
    assert [line for line in result.stderr.splitlines() if line.startswith("warning:")] == [
        f"warning: skipping checkpoint {folder / 'step-00000016'}: model.safetensors {damaged}",
        f"warning: skipping checkpoint {folder / 'step-00000012'}: optimizer.bin {damaged}",
        f"warning: skipping checkpoint {folder / 'step-00000008'}: model.safetensors {damaged}"]
    assert "from step-00000004 (epoch 1, step 4)" in result.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results["best_epoch"] in (1, 2) and results["test"]["num_samples"] > 0
    assert all(checkpoint.checkpoint_problem(c, TRAINER_KEYS) is None for c in folder.glob("step-*"))  # rewritten


def test_a_damaged_best_model_is_one_line_in_every_command(capsys: pytest.CaptureFixture[str], stepped_run: Path,
                                                          train_shards: Path, tmp_path: Path) -> None:
    run_dir = Path(shutil.copytree(stepped_run, tmp_path / "run"))
    best = run_dir / "checkpoints" / "best"
    image = next((train_shards.parent / "CUB_200_2011" / "images").rglob("*.jpg"))
    commands = [("evaluate", "--checkpoint", str(run_dir), "--shards", str(train_shards), "--out",
                 str(tmp_path / "eval")),
                ("predict", "--checkpoint", str(run_dir), str(image)),
                ("export", "--checkpoint", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))]
    damage_inside(best / "model.safetensors", 0x00)  # same size, valid header: only the sha256 tells
    for command in commands:
        assert_one_line_error(run_main(capsys, *command), f"--checkpoint {run_dir}: unreadable best checkpoint",
                              "model.safetensors is damaged (its sha256 differs")
    # a best model saved before sha256 were recorded: still loads; NaN in its weights is named
    shutil.copy(stepped_run / "checkpoints" / "best" / "model.safetensors", best)
    meta = json.loads((best / "meta.json").read_text())
    del meta["files"]
    (best / "meta.json").write_text(json.dumps(meta))
    result = run_main(capsys, *commands[1])
    assert result.returncode == 0 and result.stdout.startswith(str(image)), result.stderr
    damage_inside(best / "model.safetensors", 0xff)
    for command in commands:
        assert_one_line_error(run_main(capsys, *command), "model.safetensors holds NaN or inf in 1 tensor(s)")
    assert not (tmp_path / "eval").exists() and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("removed", [(), ("step-00000016",)], ids=["epoch-end", "mid-epoch"])
def test_a_run_without_its_best_model_resumes_and_finishes(stepped_run: Path, train_shards: Path, tmp_path: Path,
                                                           removed: tuple[str, ...]) -> None:
    """Resumed from the end of the last epoch (nothing left to train: that model is validated as the best)
    or from the middle of epoch 2 (the best is chosen at its end): results.json either way."""
    run_dir = Path(shutil.copytree(stepped_run, tmp_path / "run"))
    best = run_dir / "checkpoints" / "best"
    shutil.rmtree(best)
    for name in removed:
        shutil.rmtree(run_dir / "checkpoints" / name)
    result = _resume(run_dir, train_shards)
    assert result.returncode == 0, result.stderr[-3000:]
    how = ("step-00000016's model (end of epoch 2) is validated now as the best so far" if not removed
           else "the best model is chosen from epoch 2 on")
    assert [line for line in result.stderr.splitlines() if line.startswith("warning:")] == [
        f"warning: {best}/meta.json is missing: the models of earlier epochs are gone, so {how}"]
    assert "--checkpoint" not in result.stdout + result.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["best_epoch"] == 2 and results["test"]["num_samples"] > 0
    assert json.loads((best / "meta.json").read_text())["epoch"] == 2


def test_a_checkpoint_without_recorded_sha256_that_cannot_load_is_one_line(stepped_run: Path, train_shards: Path,
                                                                           tmp_path: Path) -> None:
    """A checkpoint from before sha256 were recorded still resumes (checked for structure only): when its
    optimizer's pickle is damaged, loading it fails with one line naming it, not a traceback."""
    run_dir = Path(shutil.copytree(stepped_run, tmp_path / "run"))
    newest = run_dir / "checkpoints" / "step-00000016"
    for where in run_dir.glob("checkpoints/step-*"):
        state = json.loads((where / "trainer.json").read_text())
        del state["files"]
        (where / "trainer.json").write_text(json.dumps(state))
    data = bytearray((newest / "optimizer.bin").read_bytes())
    data[400:416] = b"\xff" * 16  # inside the pickle (the zip's first member): its structure is intact
    (newest / "optimizer.bin").write_bytes(bytes(data))
    result = _resume(run_dir, train_shards)
    assert_one_line_error(result, f"cannot load checkpoint {newest} (UnpicklingError: ",
                          "remove it to resume from the one before")
    shutil.rmtree(newest)
    result = _resume(run_dir, train_shards)  # the one before, without sha256 too, resumes to the end
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from step-00000012" in result.stdout and (run_dir / "results.json").is_file()
