"""`python -m train fit` end to end: results, run files, W&B offline log, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import wandb_log
import yaml
from conftest import FIT_ARGS, ROOT, TRAIN_SYNTH, assert_one_line_error, run_cli
from safetensors.torch import load_file

from pipeline.manifest import load_manifest
from train.config import Config


def test_fit_results_and_run_files(fitted_run: Path, train_shards: Path) -> None:
    manifest = load_manifest(str(train_shards))
    results = json.loads((fitted_run / "results.json").read_text())
    assert set(results) == {"test", "valid", "best_epoch"}
    assert results["test"]["num_samples"] == manifest["splits"]["test"]["num_samples"]
    assert results["valid"]["num_samples"] == manifest["splits"]["valid"]["num_samples"]
    chance = 1 / TRAIN_SYNTH["classes"]
    assert results["test"]["top1"] > 2.5 * chance, results  # far above chance
    assert results["test"]["top5"] >= results["test"]["top1"]
    assert 1 <= results["best_epoch"] <= 5

    config = Config(**yaml.safe_load((fitted_run / "config.yaml").read_text()))
    assert (config.arch, config.image_size, config.epochs) == ("resnet18", 40, 5)

    records = [json.loads(line) for line in (fitted_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert set(steps[0]["lr"]) == {"stem", "layer1", "layer2", "layer3", "layer4", "fc"}
    assert len(epochs) == 5 and all({"train", "valid"} <= set(r) for r in epochs)
    best_valid = min(r["valid"]["loss"] for r in epochs)
    assert results["valid"]["loss"] == pytest.approx(best_valid)

    best = fitted_run / "checkpoints" / "best"
    meta = json.loads((best / "meta.json").read_text())
    assert meta["classes"] == manifest["classes"] and meta["arch"] == "resnet18" and meta["image_size"] == 40
    assert "fc.weight" in load_file(str(best / "model.safetensors"))
    assert len(list((fitted_run / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints


def test_wandb_offline_run_holds_the_history(fitted_run: Path) -> None:
    (run_file,) = (fitted_run / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_log.history(run_file)
    logged = [json.loads(line) for line in (fitted_run / "metrics.jsonl").read_text().splitlines()]
    step_losses = [r["loss"] for r in logged if r["kind"] == "step"]
    assert [h["loss"] for h in history if "loss" in h] == pytest.approx(step_losses)
    assert any("lr/layer3" in h for h in history)
    assert any("valid/top1" in h and "train/top5" in h for h in history)
    assert any("test/top1" in h for h in history)
    assert wandb_log.config(run_file)["arch"] == "resnet18"


def _fit_command(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train", "fit", "--shards", str(shards), *FIT_ARGS, "--run-dir", str(run_dir),
            *extra]


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(train_shards: Path, tmp_path: Path) -> None:
    extra = ("--epochs", "2", "--workers", "2", "--checkpoint-every", "3", "--keep-checkpoints", "10")
    reference = subprocess.run(_fit_command(train_shards, tmp_path / "a", *extra), cwd=ROOT, capture_output=True,
                               text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]

    command = _fit_command(train_shards, tmp_path / "b", *extra)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "b" / "checkpoints" / "step-00000003" / "trainer.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not first.exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.exists() and not (tmp_path / "b" / "results.json").exists()
    resumed = subprocess.run(command + ["--resume", "auto"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout

    final = sorted((tmp_path / "a" / "checkpoints").glob("step-*"))[-1].name
    a = load_file(str(tmp_path / "a" / "checkpoints" / final / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / final / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6

    def steps(run: str) -> list[tuple]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"], r["lr"]["fc"]) for r in map(json.loads, lines) if r["kind"] == "step"]

    assert steps("b") == steps("a")  # killed steps replayed, metrics.jsonl not duplicated
    assert json.loads((tmp_path / "b" / "results.json").read_text()) == json.loads(
        (tmp_path / "a" / "results.json").read_text())


def test_resume_with_other_config_refused_unless_force(fitted_run: Path, train_shards: Path, tmp_path: Path) -> None:
    import shutil

    run_dir = Path(shutil.copytree(fitted_run, tmp_path / "run"))
    base = ["train", "fit", "--shards", str(train_shards), *FIT_ARGS, "--run-dir", str(run_dir)]
    assert_one_line_error(run_cli(*base), "already holds a run", "--resume auto")
    assert_one_line_error(run_cli(*base, "--resume", "auto", "--lr", "0.01"), "config differs in lr", "--force")
    result = run_cli(*base, "--resume", "auto", "--lr", "0.01", "--force")
    assert result.returncode == 0, result.stderr[-2000:]  # all epochs done: straight to the test evaluation


@pytest.mark.parametrize("flag,value,message", [
    ("--arch", "resnet19", "invalid choice 'resnet19'"),
    ("--precision", "fp8", "invalid choice 'fp8'"),
    ("--optimizer", "lamb", "invalid choice 'lamb'"),
    ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--lr", "0", "--lr must be > 0"),
    ("--lr", "-1e-3", "--lr must be > 0"),
    ("--epochs", "0", "--epochs must be >= 1"),
])
def test_bad_options_fail_before_any_work(flag: str, value: str, message: str, tmp_path: Path) -> None:
    result = run_cli("train", "fit", "--shards", str(tmp_path), *FIT_ARGS, f"{flag}={value}", "--run-dir",
                     str(tmp_path / "run"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_yaml_key(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("arch: resnet18\nlearning_rate: 0.1\n")
    result = run_cli("train", "fit", "--config", str(tmp_path / "c.yaml"), "--shards", str(tmp_path))
    assert result.returncode == 2 and "unknown key 'learning_rate'" in result.stderr


def test_shards_without_manifest_unknown_version_unreachable(train_shards: Path, tmp_path: Path) -> None:
    args = [*FIT_ARGS, "--run-dir", str(tmp_path / "run")]
    assert_one_line_error(run_cli("train", "fit", "--shards", str(tmp_path), *args), "no shard set at")
    bad = tmp_path / "v2"
    bad.mkdir()
    manifest = json.loads((train_shards / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    assert_one_line_error(run_cli("train", "fit", "--shards", str(bad), *args), "version 2 is not supported")
    start = time.monotonic()
    result = run_cli("train", "fit", "--shards", "http://127.0.0.1:9/shards", *args)  # port 9: nothing listens
    assert_one_line_error(result, "unreachable")
    assert time.monotonic() - start < 60


def test_pretrained_file_for_another_arch(train_shards: Path, tmp_path: Path) -> None:
    import torch
    import torchvision

    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    result = run_cli("train", "fit", "--shards", str(train_shards), *FIT_ARGS, "--pretrained",
                     str(tmp_path / "r34.pth"), "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(result, "unexpected", "layer1.2.conv1.weight")


def _corrupt_one_sample(shards: Path, out: Path) -> str:
    """Copy a shard set, replacing one train sample's JPEG with garbage (manifest untouched)."""
    import shutil

    shutil.copytree(shards, out)
    shard = out / load_manifest(str(out))["splits"]["train"]["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(m.name for m, _ in members if m.name.endswith(".jpg"))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, payload in members:
            payload = b"garbage!" * 10 if member.name == victim else payload
            member.size = len(payload)
            import io

            tar.addfile(member, io.BytesIO(payload))
    return victim.split(".")[0]


def test_corrupt_sample_is_skipped_and_counted(train_shards: Path, tmp_path: Path) -> None:
    key = _corrupt_one_sample(train_shards, tmp_path / "shards")
    result = run_cli("train", "fit", "--shards", str(tmp_path / "shards"), *FIT_ARGS, "--epochs", "1",
                     "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert key in result.stderr  # the warning names the sample
    epoch = next(json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "epoch")
    assert epoch["train"]["bad_samples"] >= 1


def test_vanished_shard_stops_the_run_naming_it(train_shards: Path, tmp_path: Path) -> None:
    import shutil

    shards = Path(shutil.copytree(train_shards, tmp_path / "shards"))
    victim = load_manifest(str(shards))["splits"]["train"]["shards"][1]["name"]
    (shards / victim).unlink()
    result = run_cli("train", "fit", "--shards", str(shards), *FIT_ARGS, "--workers", "2",
                     "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(result, victim, "resume")


def test_grad_accumulation_keeps_the_lr_schedule(train_shards: Path, tmp_path: Path) -> None:
    """batch 8 vs batch 4 x 2 accumulation steps: the same optimizer steps, the same LR at each."""
    def lrs(run: str, *extra: str) -> list[dict]:
        result = run_cli("train", "fit", "--shards", str(train_shards), *FIT_ARGS, "--epochs", "1",
                         "--run-dir", str(tmp_path / run), *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["lr"]) for r in map(json.loads, lines) if r["kind"] == "step"]

    plain = lrs("plain")
    assert len(plain) == manifest_train(train_shards) // 8
    assert lrs("accum", "--batch-size", "4", "--grad-accum", "2") == plain


def manifest_train(shards: Path) -> int:
    return load_manifest(str(shards))["splits"]["train"]["num_samples"]
