"""`python -m train fit` end to end: results, run files, W&B offline log, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import wandb_log
import yaml
from conftest import FIT_ARGS, FITTED_EVAL, TRAIN_SYNTH
from safetensors.torch import load_file
from support import (
    assert_one_line_error,
    free_port,
    launch_env,
    max_ema_difference,
    run_cli,
    run_main,
    run_python,
    start_warm,
    wait_for,
)

from pipeline.files import sha256_file
from pipeline.manifest import load_manifest
from train.config import Config


def test_fit_results_and_run_files(fitted_run: Path, train_shards: Path) -> None:
    manifest = load_manifest(str(train_shards))
    results = json.loads((fitted_run / "results.json").read_text())
    assert set(results) == {"test", "valid", "best_epoch", "eval"}
    assert results["eval"] == FITTED_EVAL | {"weights": results["eval"]["weights"]}  # how: conftest.EVAL_ARGS
    assert results["eval"]["weights"] in ("raw", "ema")
    if not Config().ema_decay:  # no EMA of the weights (the default): the trained ones
        assert results["eval"]["weights"] == "raw"
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
    assert meta["weights"] == results["eval"]["weights"]
    assert (meta["eval_image_size"], meta["tta"]) == (48, "flip")
    assert meta["eval_transform"] == {"resize_short": 55, "center_crop": 48}
    assert "fc.weight" in load_file(str(best / "model.safetensors"))
    assert len(list((fitted_run / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints
    assert sorted(p.name for p in (fitted_run / "report").iterdir()) == sorted(
        ["metrics.json", "predictions.csv", "confusion_matrix.png", "most_incorrect.png", "embeddings.png"])


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
    assert wandb_log.config(run_file)["eval"] == FITTED_EVAL


def _fit_command(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """`python -m ARGS` of a fit, for run_cli and start_warm."""
    return ["train", "fit", "--shards", str(shards), *FIT_ARGS, "--run-dir", str(run_dir), *extra]


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _without_rank_batches(record: dict) -> dict:
    """An epoch record minus the per-rank batch counts (after a resume they count only the batches since)."""
    return {**record, "train": {k: v for k, v in record["train"].items() if k != "rank_batches"}}


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(train_shards: Path, tmp_path: Path) -> None:
    """With an EMA of the weights, whose state the checkpoint carries too."""
    extra = ("--epochs", "2", "--workers", "2", "--checkpoint-every", "3", "--keep-checkpoints", "10",
             "--ema-decay", "0.9", "--tta", "flip")
    reference = run_cli(*_fit_command(train_shards, tmp_path / "a", *extra))
    assert reference.returncode == 0, reference.stderr[-2000:]

    command = _fit_command(train_shards, tmp_path / "b", *extra)
    process = start_warm(*command, env={})
    first = tmp_path / "b" / "checkpoints" / "step-00000003" / "trainer.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not first.exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.exists() and not (tmp_path / "b" / "results.json").exists()
    # what a kill can leave: the lock's holder record (the kernel dropped the lock itself), half-written
    # temporaries, a partial last line in metrics.jsonl
    assert json.loads((tmp_path / "b" / ".lock.holder").read_text())["pid"] == process.pid
    leftovers = [tmp_path / "b" / "checkpoints" / ".tmp-step-00000099", tmp_path / "b" / "checkpoints" / ".tmp-best",
                 tmp_path / "b" / "checkpoints" / ".best.old-4242"]
    for leftover in leftovers:
        leftover.mkdir(exist_ok=True)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 4, "epo')
    damaged = Path(shutil.copytree(first.parent, tmp_path / "b" / "checkpoints" / "step-00000099"))
    (damaged / "trainer.json").write_text((damaged / "trainer.json").read_text().replace(
        '"global_step": 3', '"global_step": 99'))
    whole = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    resumed = run_cli(*command, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    skipped = [line for line in resumed.stderr.splitlines() if line.startswith("warning: skipping checkpoint")]
    assert skipped == [f"warning: skipping checkpoint {damaged}: model.safetensors is truncated "
                       f"({len(whole) // 2} of {len(whole)} bytes)"]
    assert not any(leftover.exists() for leftover in leftovers)
    assert not (tmp_path / "b" / ".lock.holder").exists()  # released at the end

    final = sorted((tmp_path / "a" / "checkpoints").glob("step-*"))[-1].name
    a = load_file(str(tmp_path / "a" / "checkpoints" / final / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / final / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6
    assert max_ema_difference(tmp_path / "a" / "checkpoints" / final, tmp_path / "b" / "checkpoints" / final) <= 1e-6

    def steps(run: str) -> list[tuple]:
        return [(r["step"], r["loss"], r["lr"]["fc"]) for r in _records(tmp_path / run, "step")]

    assert steps("b") == steps("a")  # killed steps replayed, metrics.jsonl not duplicated
    # the epoch the kill fell in: its train metrics cover the samples before the checkpoint too
    epochs_a, epochs_b = _records(tmp_path / "a", "epoch"), _records(tmp_path / "b", "epoch")
    assert [_without_rank_batches(r) for r in epochs_b] == [_without_rank_batches(r) for r in epochs_a]
    assert len(epochs_a) == 2 and len(_records(tmp_path / "b", "test")) == 1
    assert json.loads((tmp_path / "b" / "results.json").read_text()) == json.loads(
        (tmp_path / "a" / "results.json").read_text())


def _one_cycle_lr(total: int, position: int, peak: float = 0.003) -> float:
    """The LR torch's OneCycleLR gives at `position` of a `total`-step schedule (fit's defaults)."""
    import torch

    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=peak)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=total)
    for _ in range(position):
        optimizer.step()
        scheduler.step()
    return optimizer.param_groups[0]["lr"]


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


def _assert_anneals_from(lrs: dict[int, float], resumed: int, last: int, lr_there: float) -> None:
    """fc LRs by step after a resume at step `resumed`: the old schedule's LR there, then a cosine down to
    the final LR at step `last` (the LR of step k is the schedule's value at position k - 1)."""
    final = 0.003 / 25 / 1e4
    for step in range(resumed + 1, last + 1):
        pct = (step - 1 - resumed) / (last - 1 - resumed)
        assert lrs[step] == pytest.approx(_cos(lr_there, final, pct), rel=1e-9, abs=1e-15), step
    assert lrs[last] == pytest.approx(final, rel=1e-9)


def test_resume_force_changes_only_epochs_and_follows_them(capsys: pytest.CaptureFixture[str], fitted_run: Path,
                                                           train_shards: Path, tmp_path: Path) -> None:
    import shutil

    run_dir = Path(shutil.copytree(fitted_run, tmp_path / "run"))
    base = ["fit", "--shards", str(train_shards), *FIT_ARGS, "--run-dir", str(run_dir)]
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "results.json", "metrics.jsonl")}
    old_steps = {r["step"]: r["lr"]["fc"] for r in _records(run_dir, "step")}
    steps_per_epoch = len(old_steps) // 5
    total, last = 5 * steps_per_epoch, 6 * steps_per_epoch
    rows = [
        ([], "already holds a run"),
        (["--resume", "auto", "--lr", "0.01"], "config differs in lr, which --force cannot change (it can change "
                                               "epochs and the shard set)"),
        (["--resume", "auto", "--lr", "0.01", "--force"], "config differs in lr, which --force cannot change"),
        (["--resume", "auto", "--epochs", "6"], "config differs in epochs (pass --force to resume anyway)"),
        (["--resume", "auto", "--epochs", "4", "--force"], f"is at step {total}, in epoch 6; --epochs must be at "
                                                           "least 5"),
    ]
    for extra, fragment in rows:
        assert_one_line_error(run_main(capsys, *base, *extra), fragment)
        assert {name: (run_dir / name).read_bytes() for name in before} == before, extra  # nothing written

    result = run_cli("train", *base, "--resume", "auto", "--epochs", "6", "--force")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"the LR schedule now ends at step {last} instead of {total}" in result.stdout
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["epochs"] == 6  # what ran
    steps = {r["step"]: r["lr"]["fc"] for r in _records(run_dir, "step")}
    assert list(steps) == list(range(1, last + 1))
    assert {k: steps[k] for k in old_steps} == old_steps
    _assert_anneals_from(steps, total, last, _one_cycle_lr(total, total))
    assert [r["epoch"] for r in _records(run_dir, "epoch")] == [1, 2, 3, 4, 5, 6]
    assert len(_records(run_dir, "test")) == 1
    results = json.loads((run_dir / "results.json").read_text())
    best = _records(run_dir, "epoch")[-1]["best_epoch"]
    assert results["best_epoch"] == best
    assert results["test"]["num_samples"] == load_manifest(str(train_shards))["splits"]["test"]["num_samples"]


def test_second_fit_on_a_run_dir_is_refused_and_a_killed_holder_does_not_block(train_shards: Path,
                                                                               tmp_path: Path) -> None:
    """Two real `fit` processes on one run dir: the second is refused before it writes anything, naming the
    first; the first, SIGKILLed, is resumed with a shorter --epochs whose schedule continues its LR."""
    import socket

    run_dir = tmp_path / "run"
    first = start_warm(*_fit_command(train_shards, run_dir, "--epochs", "20", "--checkpoint-every", "2",
                                     "--keep-checkpoints", "100"), env={})
    checkpoint = run_dir / "checkpoints" / "step-00000002" / "trainer.json"  # the first one
    try:
        holder = run_dir / ".lock.holder"
        wait_for(lambda: holder.is_file() and json.loads(holder.read_text())["pid"] == first.pid, 120,
                 "the first fit to lock its run directory")
        second = run_cli("train", "fit", "--shards", str(train_shards), *FIT_ARGS, "--epochs", "3",
                         "--run-dir", str(run_dir))
        assert_one_line_error(second, f"run directory {run_dir} is in use by pid {first.pid} on "
                                      f"{socket.gethostname()}", "wait for it to finish")
        assert first.poll() is None  # still training, its files untouched by the second
        wait_for(lambda: (run_dir / "config.yaml").is_file(), 120, "the first fit's config.yaml")  # once resolved
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["epochs"] == 20
        wait_for(lambda: checkpoint.exists() or first.poll() is not None, 240, "the first checkpoint")
    finally:
        first.kill()
        first.wait()
    assert checkpoint.exists()
    newest = json.loads(sorted((run_dir / "checkpoints").glob("step-*"))[-1].joinpath("trainer.json").read_text())
    epochs = newest["epoch"] + 1  # down to the epoch in progress (or the next after an epoch end)
    resumed = run_cli("train", "fit", "--shards", str(train_shards), *FIT_ARGS, "--run-dir", str(run_dir),
                      "--resume", "auto", "--force", "--epochs", str(epochs))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"from step-{newest['global_step']:08d}" in resumed.stdout
    steps_per_epoch, resumed_at = newest["steps_per_epoch"], newest["global_step"]
    steps = {r["step"]: r["lr"]["fc"] for r in _records(run_dir, "step")}
    assert list(steps) == list(range(1, epochs * steps_per_epoch + 1))
    _assert_anneals_from(steps, resumed_at, epochs * steps_per_epoch, _one_cycle_lr(20 * steps_per_epoch, resumed_at))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["epochs"] == epochs
    assert [r["epoch"] for r in _records(run_dir, "epoch")] == list(range(1, epochs + 1))


def test_every_process_of_a_launch_gets_the_same_refusal(train_shards: Path, tmp_path: Path) -> None:
    """Only the main process takes the lock; the others learn its outcome and exit with the same line (no
    hang waiting for a peer that stopped). The run directory is held here, by this test's process."""
    import os

    import procs

    from train import rundir

    run_dir = tmp_path / "run"
    with rundir.locked(run_dir), procs.group(tmp_path / "logs") as group:
        group.start("launch", [*procs.launch_args(2, free_port()), "-m", "train", "fit", "--shards",
                               str(train_shards), *FIT_ARGS, "--run-dir", str(run_dir)], launch_env(tmp_path))
        assert group.finish(timeout=240) != [0]
    errors = [line for line in group.output("launch").splitlines() if line.startswith("error:")]
    assert errors == [f"error: run directory {run_dir} is in use by pid {os.getpid()} on {_hostname()} "
                      f"({errors[0].split(' (', 1)[1]}"] * 2, group.output("launch")[-3000:]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", ".lock.meta"]  # nothing written


def _hostname() -> str:
    import socket

    return socket.gethostname()


def test_diverging_run_stops_at_the_first_non_finite_loss(train_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("train", "fit", "--shards", str(train_shards), *FIT_ARGS, "--optimizer", "sgd", "--lr", "1e6",
                     "--checkpoint-every", "1", "--keep-checkpoints", "100", "--run-dir", str(run_dir))
    line = assert_one_line_error(result, "training diverged: the ")
    steps = _records(run_dir, "step")
    stopped = len(steps) + 1  # the step whose loss (or weights) went non-finite is not logged
    assert f"at step {stopped} " in line or f"after step {stopped - 1} " in line, line
    saved = _checkpoint_steps(run_dir)
    assert saved == list(range(1, len(steps) + (0 if "weights" in line else 1))), (saved, line)
    assert (f"the last good checkpoint is {run_dir / 'checkpoints' / f'step-{saved[-1]:08d}'}" in line
            if saved else "no checkpoint was written before" in line), line
    for step in saved:
        weights = load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))
        assert all(t.isfinite().all() for t in weights.values()), step
    assert not (run_dir / "results.json").exists() and _records(run_dir, "epoch") == []


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


@pytest.mark.parametrize("flag,value,message", [
    ("--arch", "resnet19", "invalid choice 'resnet19'"),
    ("--precision", "fp8", "invalid choice 'fp8'"),
    ("--optimizer", "lamb", "invalid choice 'lamb'"),
    ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--lr", "0", "--lr must be > 0"),
    ("--lr", "-1e-3", "--lr must be > 0"),
    ("--epochs", "0", "--epochs must be >= 1"),
    ("--ema-decay", "0.2", "--ema-decay must be 0 (off) or in [0.5, 1), got 0.2"),
])
def test_bad_options_fail_before_any_work(flag: str, value: str, message: str, tmp_path: Path,
                                         train_shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_main(capsys, "fit", "--shards", str(train_shards), *FIT_ARGS, f"{flag}={value}", "--run-dir",
                      str(tmp_path / "run"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_yaml_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.yaml").write_text("arch: resnet18\nlearning_rate: 0.1\n")
    result = run_main(capsys, "fit", "--config", str(tmp_path / "c.yaml"), "--shards", str(tmp_path))
    assert result.returncode == 2 and "unknown key 'learning_rate'" in result.stderr


def test_shards_without_manifest_unknown_version_unreachable(train_shards: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    args = [*FIT_ARGS, "--run-dir", str(tmp_path / "run")]
    assert_one_line_error(run_main(capsys, "fit", "--shards", str(tmp_path), *args), "no shard set at")
    bad = tmp_path / "v2"
    bad.mkdir()
    manifest = json.loads((train_shards / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    assert_one_line_error(run_main(capsys, "fit", "--shards", str(bad), *args), "version 2 is not supported")
    start = time.monotonic()
    result = run_main(capsys, "fit", "--shards", "http://127.0.0.1:9/shards", *args)  # port 9: nothing listens
    assert_one_line_error(result, "unreachable")
    assert time.monotonic() - start < 60


def test_pretrained_file_for_another_arch(train_shards: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    import torchvision

    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    result = run_main(capsys, "fit", "--shards", str(train_shards), *FIT_ARGS, "--pretrained",
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
    # the manifest describes the shard as it now is (as if built from a bad image): only the sample is bad
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["splits"]["train"]["shards"][0]
    record["bytes"], record["sha256"] = shard.stat().st_size, sha256_file(shard)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return victim.split(".")[0]


def test_corrupt_sample_is_skipped_and_counted(train_shards: Path, tmp_path: Path) -> None:
    key = _corrupt_one_sample(train_shards, tmp_path / "shards")
    result = run_cli("train", "fit", "--shards", str(tmp_path / "shards"), *FIT_ARGS, "--epochs", "1",
                     "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert key in result.stderr  # the warning names the sample
    epoch = next(json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "epoch")
    assert epoch["train"]["bad_samples"] == 1  # 65 good train samples, 64 used: the bad one is read once
    # FIT_ARGS has --no-plots: the test report holds the numbers only, and says so
    assert sorted(p.name for p in (tmp_path / "run" / "report").iterdir()) == ["metrics.json", "predictions.csv"]
    assert f"test report: {tmp_path / 'run' / 'report'}/ (metrics.json, predictions.csv)" in result.stdout


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


def test_a_fit_forked_from_the_warm_server_equals_a_cold_start(train_shards: Path, tmp_path: Path) -> None:
    """run_cli forks `python -m train` from a warm interpreter (tests/warm.py); a cold `python -m train fit`
    of the same command gives the same numbers and the same best model, byte for byte."""
    def fit(name: str, run: Callable[..., subprocess.CompletedProcess], *prefix: str) -> Path:
        result = run(*prefix, "train", "fit", "--shards", str(train_shards), *FIT_ARGS, "--epochs", "1",
                     "--run-dir", str(tmp_path / name))
        assert result.returncode == 0, result.stderr[-2000:]
        assert "test (best epoch" in result.stdout
        return tmp_path / name

    def numbers(run_dir: Path) -> list[dict]:  # metrics.jsonl less the wall-clock rates
        records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        return [{k: v for k, v in r.items() if k not in ("img_per_s", "data_wait")} for r in records]

    warm, cold = fit("warm", run_cli), fit("cold", run_python, "-m")
    assert numbers(warm) == numbers(cold)
    assert (warm / "results.json").read_text() == (cold / "results.json").read_text()
    best = Path("checkpoints") / "best" / "model.safetensors"
    assert (warm / best).read_bytes() == (cold / best).read_bytes()


def manifest_train(shards: Path) -> int:
    return load_manifest(str(shards))["splits"]["train"]["num_samples"]
