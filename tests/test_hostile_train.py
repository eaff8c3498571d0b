"""Hostile or unlucky input to the train CLIs: each row is one clear `error:` line, a non-zero exit, no
traceback, and nothing left behind that a later command would take as complete (no run directory, no
metrics.json, no export file). Also: splits with no sample are never scored 0.0."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import FIT_ARGS
from support import ONE_THREAD, assert_one_line_error, run_cli, run_main

from pipeline.build import build
from pipeline.files import sha256_file, write_json_atomic
from pipeline.manifest import load_manifest
from pipeline.plan import BuildOptions

NO_SCORE = {"top1": None, "top5": None, "loss": None, "num_samples": 0}

# fit and lr-find: bad options, refused at parse time. (extra arguments, YAML text or None, error fragment)
CONFIG_ROWS = [
    (["--lr", "inf"], None, "--lr must be > 0 and finite"),
    (["--weight-decay", "nan"], None, "--weight-decay must be a finite number"),
    (["--lr", "1e39"], None, "--lr must be at most 3.403e+38 (the largest float32"),
    ([], "lr: 1.0e+39\n", "--lr must be at most 3.403e+38 (the largest float32"),
    (["--weight-decay", "1e300"], None, "--weight-decay must be at most 3.403e+38"),
    (["--lr-find-end", "1e39"], None, "--lr-find-end/--end-lr must be at most 3.403e+38"),
    (["--lr", "auto", "--lr-find-steps", "3"], None, "--lr-find-steps/--steps must be >= 20, got 3"),
    ([], "lr: .inf\n", "--lr must be > 0 and finite"),
    ([], "weight_decay: .nan\n", "--weight-decay must be a finite number"),
    (["--log-every", "0"], None, "--log-every must be >= 1"),
    (["--label-smoothing", "5"], None, "--label-smoothing must be in [0, 1)"),
    (["--div-factor", "0"], None, "--div-factor must be >= 1"),
    (["--final-div-factor", "0"], None, "--final-div-factor must be >= 1"),
    (["--pct-start", "1"], None, "--pct-start must be in (0, 1)"),
    (["--shuffle-buffer", "-5"], None, "--shuffle-buffer must be >= 1"),
    ([], "crop_scale: 5\n", "crop_scale: expected two numbers"),
    (["--crop-scale", "0.5", "5"], None, "--crop-scale needs two numbers 0 < min <= max <= 1"),
    (["--crop-pct", "2"], None, "--crop-pct must be in (0, 1]"),
    (["--momentum", "1"], None, "--momentum must be in [0, 1)"),
    (["--lr-decay", "0"], None, "--lr-decay must be in (0, 1]"),
    (["--dist-timeout", "0"], None, "--dist-timeout must be >= 1"),
    (["--seed", "-1"], None, "--seed must be in [0, "),
    (["--image-size", "8"], None, "--image-size must be in [16, 2048]"),
    (["--eval-batch-size", "-1"], None, "--eval-batch-size must be >= 0"),
    ([], "epochs: 2.5\n", "expected a whole number"),
    (["--epochs", "two"], None, "argument --epochs: invalid int value"),
]


def _left(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_fit_and_lr_find_refuse_bad_options_before_any_work(capsys: pytest.CaptureFixture[str],
                                                            train_shards: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    for extra, yaml_text, fragment in CONFIG_ROWS:
        options = FIT_ARGS  # the command line overrides YAML: a YAML row goes without them
        if yaml_text is not None:
            (tmp_path / "c.yaml").write_text(yaml_text)
            options = ("--config", str(tmp_path / "c.yaml"))
        for command, out in (("fit", []), ("lr-find", ["--out", str(work / "lrf")])):
            result = run_main(capsys, command, "--shards", str(train_shards), *options, *extra,
                              "--run-dir", str(work / "run"), *out)
            assert result.returncode == 2, (command, extra, yaml_text)
            assert_one_line_error(result, fragment)
        assert _left(work) == [], extra

def test_output_paths_refused_before_any_work(capsys: pytest.CaptureFixture[str], train_shards: Path,
                                              fitted_run: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory\n")
    shards, run = str(train_shards), str(fitted_run)
    rows = [
        (["fit", "--shards", shards, *FIT_ARGS, "--run-dir", str(tmp_path / "file")], "exists and is not a directory"),
        (["fit", "--shards", shards, *FIT_ARGS, "--run-dir", str(tmp_path / "file" / "run")], "is not a directory"),
        (["fit", "--shards", shards, *FIT_ARGS, "--run-dir", "/sys/cubstream-run"], "cannot write in /sys"),
        (["lr-find", "--shards", shards, *FIT_ARGS, "--out", str(tmp_path / "file")], "exists and is not a directory"),
        (["lr-find", "--shards", shards, *FIT_ARGS, "--out", "/sys/lrf"], "cannot write in /sys"),
        (["lr-find", "--shards", shards, *FIT_ARGS, "--out", str(tmp_path / "lrf"), "--steps", "3"],
         "--lr-find-steps/--steps must be >= 20"),
        (["evaluate", "--checkpoint", run, "--shards", shards, "--out", str(tmp_path / "file")],
         "exists and is not a directory"),
        (["evaluate", "--checkpoint", run, "--shards", shards, "--out", "/sys/eval"], "cannot write in /sys"),
        (["evaluate", "--checkpoint", run, "--shards", shards, "--out", str(tmp_path / "e"), "--batch-size", "0"],
         "--batch-size >= 1"),
        (["evaluate", "--checkpoint", run, "--shards", shards, "--out", str(tmp_path / "e"), "--workers", "-1"],
         "--workers >= 0"),
        (["evaluate", "--checkpoint", run, "--shards", shards, "--out", str(tmp_path / "e"), "--split", "dev"],
         "invalid choice: 'dev'"),
        (["predict", "--checkpoint", run, "--batch-size", "0", str(tmp_path / "file")], "--batch-size must be >= 1"),
        (["export", "--checkpoint", run, "--format", "onnx", "--out", str(tmp_path)], "is a directory"),
        (["export", "--checkpoint", run, "--format", "torchscript", "--out", "/dev/full"], "not a regular file"),
        (["export", "--checkpoint", run, "--format", "onnx", "--out", "/sys/m.onnx"], "cannot write in /sys"),
        (["export", "--checkpoint", run, "--format", "onnx", "--out", str(tmp_path / "file" / "m.onnx")],
         "is not a directory"),
    ]
    for args, fragment in rows:
        result = run_main(capsys, *args)
        assert result.returncode == 2, args
        assert_one_line_error(result, fragment)
        assert _left(tmp_path) == ["file"], args  # no run dir, report, sweep or export was started
        assert (tmp_path / "file").read_text() == "not a directory\n"


@pytest.fixture(scope="module")
def empty_splits(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The train synth set built with --valid-fraction 0 (an empty valid split), its test split emptied too."""
    out = tmp_path_factory.mktemp("empty-splits") / "shards"
    build(train_shards.parent / "CUB_200_2011", out, BuildOptions(valid_fraction=0, resize_short=48,
                                                                  shard_samples=8), workers=1, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["valid"]["num_samples"] == 0
    test = manifest["splits"]["test"]
    test["shards"], test["num_samples"] = [], 0
    test["class_counts"] = [0] * len(manifest["classes"])
    write_json_atomic(out / "manifest.json", manifest)
    load_manifest(str(out))  # still a valid manifest
    return out


def test_fit_with_empty_valid_and_test_splits_scores_nothing(empty_splits: Path, tmp_path: Path) -> None:
    """No valid split: every epoch's model replaces the best (the last is kept), said once; the test split
    with no sample gets null metrics, not 0.0, and no report."""
    run_dir = tmp_path / "run"
    result = run_cli("train", "fit", "--shards", str(empty_splits), *FIT_ARGS, "--epochs", "2", "--run-dir",
                     str(run_dir), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("no valid samples") == 1, result.stdout
    assert "valid loss n/a top1 n/a top5 n/a" in result.stdout
    assert "no score, the test split has no readable sample (it is empty)" in result.stdout
    assert "top1 0.0000" not in result.stdout
    results = json.loads((run_dir / "results.json").read_text())
    default_eval = {"image_size": 40, "resize_short": 46, "crop_pct": 0.875, "interpolation": "bilinear",
                    "tta": "none", "weights": "raw"}  # FIT_ARGS: the train size, no TTA, no EMA
    assert results == {"test": NO_SCORE, "valid": NO_SCORE, "best_epoch": 2, "eval": default_eval}
    epochs = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "epoch"]
    assert [(r["best_epoch"], r["valid"]["num_samples"], r["valid"]["loss"]) for r in epochs] == [
        (1, 0, None), (2, 0, None)]
    assert json.loads((run_dir / "checkpoints" / "best" / "meta.json").read_text())["epoch"] == 2
    assert not (run_dir / "report").exists()


def _corrupt_split(shards: Path, out: Path, split: str) -> int:
    """A copy of a shard set whose every JPEG in `split` is garbage, recorded in the manifest (sizes and
    sha256 of the rewritten shards, as if built so); returns how many."""
    shutil.copytree(shards, out)
    count = 0
    manifest = load_manifest(str(out))
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(out / shard["name"], "w", format=tarfile.USTAR_FORMAT) as tar:
            for member, payload in members:
                if member.name.endswith(".jpg"):
                    payload, count = b"garbage!" * 10, count + 1
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))
        shard["bytes"], shard["sha256"] = (out / shard["name"]).stat().st_size, sha256_file(out / shard["name"])
    write_json_atomic(out / "manifest.json", manifest)
    return count


def test_evaluate_with_no_sample_to_score(capsys: pytest.CaptureFixture[str], fitted_run: Path,
                                          empty_splits: Path, train_shards: Path, tmp_path: Path) -> None:
    for split in ("valid", "test"):
        result = run_main(capsys, "evaluate", "--checkpoint", str(fitted_run), "--shards", str(empty_splits),
                          "--split", split, "--out", str(tmp_path / "out"))
        assert_one_line_error(result, f"the {split} split of {empty_splits} is empty")
    corrupt = _corrupt_split(train_shards, tmp_path / "corrupt", "valid")
    result = run_cli("train", "evaluate", "--checkpoint", str(fitted_run), "--shards", str(tmp_path / "corrupt"),
                     "--split", "valid", "--out", str(tmp_path / "out"), "--workers", "0", env=ONE_THREAD)
    assert_one_line_error(result, f"all {corrupt} samples are corrupt")
    assert not (tmp_path / "out").exists()  # no metrics.json a later reader would trust
