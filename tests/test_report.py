"""report: metrics.json, predictions.csv, the three evaluation PNGs and the LR range test plot, written from
hand-made records whose every number is known."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from support import assert_png, run_script

from train import embedding, report
from train.lr_finder import RangeTest

CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross", "004.Groove_billed_Ani"]
# (key, label, pred, conf): class 0 2/3 right, class 1 1/2, class 2 1/1, class 3 has no sample
SAMPLES = [("000001", 0, 0, 0.91), ("000002", 0, 1, 0.8765432), ("000003", 0, 0, 0.5), ("000004", 1, 1, 0.7),
           ("000005", 1, 2, 0.66), ("extra_7", 2, 2, 0.99)]


def _records() -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"key": key, "label": label, "pred": pred, "conf": conf,
             "features": (rng.normal(size=8) + 3 * label).astype("float16")}
            for key, label, pred, conf in SAMPLES]


def _wrong() -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"key": key, "label": label, "pred": pred, "conf": conf,
             "image": rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)}
            for key, label, pred, conf in SAMPLES if label != pred]


def test_names_and_ids() -> None:
    assert report.short_name("001.Black_footed_Albatross") == "Black footed Albatross"
    assert report.short_name("Laysan_Albatross") == "Laysan Albatross"
    assert report.short_name("v1.2_bird") == "v1.2 bird"  # not a numbered CUB name: only underscores go
    assert report.image_id("000042") == 42 and report.image_id("extra_7") == "extra_7"


def test_confusion_matrix_and_per_class() -> None:
    records = _records()
    labels = np.array([r["label"] for r in records])
    preds = np.array([r["pred"] for r in records])
    matrix = report.confusion_matrix(labels, preds, len(CLASSES))
    assert matrix.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert report.per_class(matrix, CLASSES) == [
        {"class": CLASSES[0], "num_samples": 3, "correct": 2, "accuracy": 2 / 3},
        {"class": CLASSES[1], "num_samples": 2, "correct": 1, "accuracy": 0.5},
        {"class": CLASSES[2], "num_samples": 1, "correct": 1, "accuracy": 1.0},
        {"class": CLASSES[3], "num_samples": 0, "correct": 0, "accuracy": None},
    ]


def test_write_report_files(tmp_path: Path) -> None:
    metrics = {"top1": 4 / 6, "top5": 1.0, "loss": 0.75, "num_samples": 6, "bad_samples": 1}
    out = tmp_path / "report"
    payload = report.write_report(out, metrics, _records(), _wrong(), CLASSES, "test")
    written = json.loads((out / "metrics.json").read_text())
    assert written == payload
    assert {k: written[k] for k in ("top1", "top5", "loss", "num_samples")} == {
        "top1": 4 / 6, "top5": 1.0, "loss": 0.75, "num_samples": 6}
    assert set(written) == {"top1", "top5", "loss", "num_samples", "per_class"}
    assert [c["accuracy"] for c in written["per_class"]] == [2 / 3, 0.5, 1.0, None]

    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["image_id", "true", "predicted", "confidence"],
                    ["1", CLASSES[0], CLASSES[0], "0.91"],
                    ["2", CLASSES[0], CLASSES[1], "0.876543"],
                    ["3", CLASSES[0], CLASSES[0], "0.5"],
                    ["4", CLASSES[1], CLASSES[1], "0.7"],
                    ["5", CLASSES[1], CLASSES[2], "0.66"],
                    ["extra_7", CLASSES[2], CLASSES[2], "0.99"]]
    for name in report.PLOTS:
        assert_png(out / name)
    assert sorted(p.name for p in out.iterdir()) == sorted(["metrics.json", "predictions.csv", *report.PLOTS])


def test_report_with_no_mistakes_and_few_images(tmp_path: Path) -> None:
    """All right, two images: the mistakes plot says so, the t-SNE panel says it has too few images."""
    records = [r for r in _records() if r["label"] == r["pred"]][:2]
    metrics = {"top1": 1.0, "top5": 1.0, "loss": 0.1, "num_samples": 2}
    report.write_report(tmp_path, metrics, records, [], CLASSES)
    assert_png(tmp_path / "most_incorrect.png", min_height=50)
    assert_png(tmp_path / "confusion_matrix.png")
    assert_png(tmp_path / "embeddings.png")


def test_plots_are_deterministic(tmp_path: Path) -> None:
    """Same records -> the same pixels (seeded t-SNE and PCA)."""
    from PIL import Image

    records = _records()
    labels = np.array([r["label"] for r in records])
    features = np.stack([r["features"] for r in records]).astype(np.float32)
    report.plot_embeddings(features, labels, CLASSES, tmp_path / "a.png")
    report.plot_embeddings(features, labels, CLASSES, tmp_path / "b.png")
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_write_lr_find(tmp_path: Path) -> None:
    lrs = [1e-5 * 10 ** (i / 4) for i in range(13)]
    losses = [2.0, 2.0, 1.98, 1.9, 1.7, 1.4, 1.1, 0.9, 0.8, 0.85, 1.2, 2.5, 6.0]
    result = RangeTest(lrs=lrs, losses=losses, suggested_lr=lrs[5], suggested_index=5, diverged=True)
    report.write_lr_find(tmp_path / "lrf", result)
    assert json.loads((tmp_path / "lrf" / "lr_find.json").read_text()) == {
        "suggested_lr": pytest.approx(lrs[5]), "lrs": pytest.approx(lrs), "losses": losses}
    assert_png(tmp_path / "lrf" / "lr_find.png")
    assert sorted(p.name for p in (tmp_path / "lrf").iterdir()) == ["lr_find.json", "lr_find.png"]


def test_a_plot_that_fails_is_one_warning_and_the_rest_is_written(tmp_path: Path, capsys) -> None:
    """metrics.json and predictions.csv come first; a plot that raises is one warning line naming it, its
    older copy is gone (never a stale plot beside new numbers), the other plots are drawn, no temporary file
    is left."""
    (tmp_path / "metrics.json").write_text('{"top1": 0.5}')
    (tmp_path / "most_incorrect.png").write_bytes(b"an older report's plot")
    wrong = [{**_wrong()[0], "image": np.zeros(3, dtype=np.uint8)}]  # not an image: the mistakes plot fails
    metrics = {"top1": 4 / 6, "top5": 1.0, "loss": 0.75, "num_samples": 6}
    capsys.readouterr()
    payload = report.write_report(tmp_path, metrics, _records(), wrong, CLASSES)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: {tmp_path / 'most_incorrect.png'} not drawn: ValueError: axes don't match array"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == payload and payload["top1"] == 4 / 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion_matrix.png", "embeddings.png", "metrics.json",
                                                           "predictions.csv"]
    assert_png(tmp_path / "embeddings.png")


def test_without_plots_the_numbers_are_written_and_older_plots_removed(tmp_path: Path) -> None:
    """fit --no-plots: metrics.json and predictions.csv as with plots, no PNG (an older report's are removed,
    never left beside new numbers), and the W&B payload holds the predictions table only."""
    metrics = {"top1": 4 / 6, "top5": 1.0, "loss": 0.75, "num_samples": 6}
    with_plots = report.write_report(tmp_path / "a", metrics, _records(), _wrong(), CLASSES)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "embeddings.png").write_bytes(b"an older report's plot")
    without = report.write_report(tmp_path / "b", metrics, _records(), _wrong(), CLASSES, plots=False)
    assert without == with_plots
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["metrics.json", "predictions.csv"]
    for name in ("metrics.json", "predictions.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    payload = report.wandb_payload(tmp_path / "b", _records()[:5], CLASSES, "report/test")  # image ids all numbers
    assert list(payload) == ["report/test/predictions"]


@pytest.mark.parametrize("kind", ["constant", "nan", "inf"])
def test_degenerate_features_never_take_the_process_down(kind: str, tmp_path: Path, capsys) -> None:
    """Features with no variance (a model that has collapsed) or with NaN / inf rows (a diverged one): this
    crashed scikit-learn's t-SNE with a segmentation fault inside the calling process (or raised its
    traceback). Now the non-finite rows are left out and named, constant features give a panel that says so,
    and the report is whole without a warning."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    features = rng.normal(size=(120, 64)).astype(np.float32) + labels[:, None]
    if kind == "constant":
        features[:] = 0.25
    else:
        features[::3, 5] = np.nan if kind == "nan" else np.inf
    records = [{"key": f"{i:06d}", "label": int(label), "pred": int(label), "conf": 0.9, "features": row}
               for i, (label, row) in enumerate(zip(labels, features, strict=True))]
    capsys.readouterr()
    report.write_report(tmp_path, {"top1": 1.0, "top5": 1.0, "loss": 0.1, "num_samples": 120}, records, [],
                        CLASSES[:3])
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["metrics.json", "predictions.csv", *report.PLOTS])
    assert_png(tmp_path / "embeddings.png")
    if kind != "constant":  # 40 rows dropped, 80 embedded: the same result as the finite rows alone
        points, chosen = embedding.tsne(features[np.isfinite(features).all(axis=1)])
        assert points.shape == (80, 2) and np.isfinite(points).all() and chosen.tolist() == list(range(80))
    else:
        with pytest.raises(embedding.EmbeddingError, match="the same for every image"):
            embedding.tsne(features)


def test_a_crash_in_the_tsne_process_is_an_error_not_a_crash(tmp_path: Path, monkeypatch) -> None:
    """The t-SNE child dying by a signal (as scikit-learn's native code did) is an EmbeddingError naming the
    status: here the child is made to die by SIGSEGV itself."""
    hook = tmp_path / "sitecustomize.py"
    hook.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    features = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    with pytest.raises(embedding.EmbeddingError, match="t-SNE's process ended with status -11"):
        embedding.tsne(features)


@pytest.mark.e2e
def test_the_whole_report_path_after_fit_with_workers_in_one_process(train_shards: Path, tmp_path: Path) -> None:
    """fit and evaluate with DataLoader workers, then a collapsed model's report, in one process (the t-SNE of
    equal features crashed it); the fit's failing plot is one warning and results.json is written."""
    args = ("--arch", "resnet18", "--pretrained", "none", "--image-size", "40", "--batch-size", "8", "--lr", "0.003",
            "--epochs", "1", "--wandb", "disabled")
    result = run_script(Path(__file__).with_name("report_after_fit.py"), str(train_shards), str(tmp_path), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    done = json.loads(result.stdout.splitlines()[-1])
    whole = sorted(["metrics.json", "predictions.csv", *report.PLOTS])
    assert done == {"fit": 0, "evaluate": 0, "results": True, "eval": whole, "collapsed": whole,
                    "run/report": ["confusion_matrix.png", "embeddings.png", "metrics.json", "predictions.csv"]}
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {tmp_path / 'run' / 'report' / 'most_incorrect.png'} not drawn: "
                        "RuntimeError: simulated plot failure"]
