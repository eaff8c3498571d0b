"""evaluate: fit's test report, the CLI in one and two processes (same metrics), W&B media, bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import procs
import pytest
import wandb_log
from conftest import FITTED_EVAL
from support import ONE_THREAD, assert_one_line_error, assert_png, free_port, launch_env, run_cli, run_main

from pipeline.manifest import load_manifest

PLOTS = ("confusion_matrix.png", "most_incorrect.png", "embeddings.png")


def _check_report(out: Path, num_classes: int, num_samples: int) -> dict[str, Any]:
    """metrics.json agrees with its own counts and with predictions.csv; the plots are real."""
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"top1", "top5", "loss", "num_samples", "per_class", "eval"}
    assert metrics["num_samples"] == num_samples
    per_class = metrics["per_class"]
    assert len(per_class) == num_classes
    assert sum(c["num_samples"] for c in per_class) == num_samples
    correct = sum(c["correct"] for c in per_class)
    assert correct / num_samples == pytest.approx(metrics["top1"])
    assert all(c["accuracy"] == pytest.approx(c["correct"] / c["num_samples"]) for c in per_class if c["num_samples"])
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 1

    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image_id", "true", "predicted", "confidence"]
    assert len(rows) == num_samples == len({r["image_id"] for r in rows})  # every image exactly once
    assert sum(r["true"] == r["predicted"] for r in rows) == correct
    assert all(0 < float(r["confidence"]) <= 1 for r in rows)
    for name in PLOTS:
        assert_png(out / name)
    return metrics


def test_fit_writes_the_test_report(fitted_run: Path, train_shards: Path) -> None:
    manifest = load_manifest(str(train_shards))
    metrics = _check_report(fitted_run / "report", len(manifest["classes"]), manifest["splits"]["test"]["num_samples"])
    test = json.loads((fitted_run / "results.json").read_text())["test"]
    assert metrics["num_samples"] == test["num_samples"]
    assert (metrics["top1"], metrics["top5"]) == (test["top1"], test["top5"])
    assert metrics["loss"] == pytest.approx(test["loss"])


def test_fit_logs_the_report_to_wandb(fitted_run: Path, train_shards: Path) -> None:
    (run_file,) = (fitted_run / "wandb").glob("offline-run-*/run-*.wandb")
    logged: dict[str, Any] = {}
    for row in wandb_log.history(run_file):
        logged.update({k: v for k, v in row.items() if k.startswith("report/test/")})
    for name in ("confusion_matrix", "most_incorrect", "embeddings"):
        assert logged[f"report/test/{name}/_type"] == "image-file"
    assert logged["report/test/predictions/_type"] == "table-file"
    assert logged["report/test/predictions/nrows"] == load_manifest(str(train_shards))["splits"]["test"]["num_samples"]


@pytest.fixture(scope="module")
def one_process_eval(fitted_run: Path, train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "one"
    result = run_cli("train", "evaluate", "--checkpoint", str(fitted_run), "--shards", str(train_shards),
                     "--split", "test", "--out", str(out), "--workers", "0", "--batch-size", "16",
                     env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(eval 48 px, tta flip; 1 process(es))" in result.stdout  # the recorded settings
    return out


def test_evaluate_cli_equals_the_fit_report(one_process_eval: Path, fitted_run: Path, train_shards: Path) -> None:
    """Without eval flags, evaluate scores as fit did (fitted_run: eval size 48 for train size 40, flip TTA)."""
    manifest = load_manifest(str(train_shards))
    metrics = _check_report(one_process_eval, len(manifest["classes"]), manifest["splits"]["test"]["num_samples"])
    fit_metrics = json.loads((fitted_run / "report" / "metrics.json").read_text())
    assert metrics["per_class"] == fit_metrics["per_class"] and metrics["top5"] == fit_metrics["top5"]
    results = json.loads((fitted_run / "results.json").read_text())
    assert (metrics["top1"], metrics["top5"]) == (results["test"]["top1"], results["test"]["top5"])
    assert metrics["loss"] == pytest.approx(results["test"]["loss"], rel=1e-6)
    assert metrics["eval"] == fit_metrics["eval"] == results["eval"] == FITTED_EVAL


def test_evaluate_flags_override_the_recorded_settings(fitted_run: Path, train_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain"
    result = run_cli("train", "evaluate", "--checkpoint", str(fitted_run), "--shards", str(train_shards), "--split",
                     "test", "--out", str(out), "--workers", "0", "--eval-image-size", "40", "--tta", "none",
                     "--no-plots", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(eval 40 px, tta none; 1 process(es))" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"] == {**FITTED_EVAL, "image_size": 40, "resize_short": 46, "tta": "none"}
    fit_loss = json.loads((fitted_run / "results.json").read_text())["test"]["loss"]
    assert metrics["loss"] != pytest.approx(fit_loss, rel=1e-4)  # really scored otherwise
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.csv"]  # --no-plots
    assert f"test report: {out}/ (metrics.json, predictions.csv)\n" in result.stdout


@pytest.mark.multiprocess
def test_evaluate_two_processes_equals_one(one_process_eval: Path, fitted_run: Path, train_shards: Path,
                                          tmp_path: Path) -> None:
    out = tmp_path / "two"
    command = [*procs.launch_args(2, free_port()), "-m", "train", "evaluate", "--checkpoint", str(fitted_run),
               "--shards", str(train_shards), "--split", "test", "--out", str(out), "--workers", "0",
               "--batch-size", "16"]
    with procs.group(tmp_path / "logs") as group:
        group.start("launch", command, launch_env(tmp_path))
        assert group.finish(timeout=240) == [0], group.output("launch")[-3000:]
        output = group.output("launch")
    assert "tta flip; 2 process(es))" in output  # really two processes, not one
    one = json.loads((one_process_eval / "metrics.json").read_text())
    two = json.loads((out / "metrics.json").read_text())
    assert two["num_samples"] == one["num_samples"]
    assert two["per_class"] == one["per_class"]
    assert (two["top1"], two["top5"]) == (one["top1"], one["top5"])
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["eval"] == one["eval"] == FITTED_EVAL  # the exact path with an eval size and flip TTA
    assert (out / "predictions.csv").read_text().count("\n") == one["num_samples"] + 1
    for name in PLOTS:
        assert_png(out / name)


def test_checkpoint_that_is_not_a_run(capsys: pytest.CaptureFixture[str], train_shards: Path, tmp_path: Path) -> None:
    def evaluate(run: Path) -> Any:
        return run_main(capsys, "evaluate", "--checkpoint", str(run), "--shards", str(train_shards),
                        "--out", str(tmp_path / "out"))

    assert_one_line_error(evaluate(tmp_path / "missing"), "no such run directory")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(evaluate(tmp_path / "empty"), "no complete best checkpoint")
    assert not (tmp_path / "out").exists()


def test_run_without_a_complete_checkpoint(capsys: pytest.CaptureFixture[str], fitted_run: Path,
                                           train_shards: Path, tmp_path: Path) -> None:
    best = tmp_path / "run" / "checkpoints" / "best"
    best.mkdir(parents=True)
    shutil.copy(fitted_run / "checkpoints" / "best" / "meta.json", best)
    args = ("evaluate", "--checkpoint", str(tmp_path / "run"), "--shards", str(train_shards), "--out",
            str(tmp_path / "out"))
    assert_one_line_error(run_main(capsys, *args), "no complete best checkpoint")
    weights = (fitted_run / "checkpoints" / "best" / "model.safetensors").read_bytes()
    (best / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # cut short
    assert_one_line_error(run_main(capsys, *args), "unreadable best checkpoint")


def test_shards_with_other_classes(capsys: pytest.CaptureFixture[str], fitted_run: Path, train_shards: Path,
                                   tmp_path: Path) -> None:
    other = Path(shutil.copytree(train_shards, tmp_path / "other"))
    manifest = json.loads((other / "manifest.json").read_text())
    original = manifest["classes"][2]
    manifest["classes"][2] = "003.Not_A_Bird"
    (other / "manifest.json").write_text(json.dumps(manifest))
    result = run_main(capsys, "evaluate", "--checkpoint", str(fitted_run), "--shards", str(other), "--out",
                      str(tmp_path / "out"))
    assert_one_line_error(result, "class mismatch", "index 2", "003.Not_A_Bird", original)
