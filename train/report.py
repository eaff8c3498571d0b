"""Evaluation reports and the LR range test plot: metrics.json, predictions.csv and PNGs (matplotlib, Agg).

Input: the per-sample records of `evaluation.evaluate(..., collect=True)` (every sample once, sorted by key):
{"key", "label", "pred", "conf", "features"} and the most confident wrong predictions with their uint8
images ({"key", "label", "pred", "conf", "image": CHW uint8}, as the eval transform left them).
"""

from __future__ import annotations

import csv
import functools
import io
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.files import atomic_path, write_atomic, write_json_atomic
from train import embedding

if TYPE_CHECKING:
    import matplotlib.pyplot as plt

ANNOTATE_MAX_CLASSES = 30  # write the count in each confusion-matrix cell up to this many classes
LEGEND_MAX_CLASSES = 20
PLOTS = ("confusion_matrix.png", "most_incorrect.png", "embeddings.png")


@functools.cache
def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display), imported on first use: ~0.7 s that
    `fit` pays only when it plots."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported
    import matplotlib.pyplot

    return matplotlib.pyplot


def short_name(name: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black footed Albatross'."""
    head, dot, tail = name.partition(".")
    return (tail if dot and head.isdigit() else name).replace("_", " ")


def image_id(key: str) -> int | str:
    """Our shard keys are the zero-padded CUB image id; other keys are kept as they are."""
    return int(key) if key.isdigit() else key


# ---------------------------------------------------------------- numbers


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, preds), 1)
    return matrix


def per_class(matrix: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    """Top-1 accuracy per class (null for a class with no sample in the split)."""
    rows = []
    for index, name in enumerate(classes):
        total, correct = int(matrix[index].sum()), int(matrix[index, index])
        rows.append({"class": name, "num_samples": total, "correct": correct,
                     "accuracy": correct / total if total else None})
    return rows


def metrics_json(metrics: dict[str, Any], matrix: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """The numbers, and (`metrics["eval"]`, when the caller recorded it) how they were obtained."""
    how = {"eval": metrics["eval"]} if "eval" in metrics else {}
    return {"top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
            "num_samples": metrics["num_samples"], "per_class": per_class(matrix, classes), **how}


def prediction_rows(records: list[dict[str, Any]], classes: list[str]) -> list[list[Any]]:
    return [[image_id(r["key"]), classes[r["label"]], classes[r["pred"]], round(r["conf"], 6)] for r in records]


PREDICTION_COLUMNS = ["image_id", "true", "predicted", "confidence"]


def write_predictions_csv(path: Path, rows: list[list[Any]]) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(PREDICTION_COLUMNS)
    writer.writerows(rows)
    write_atomic(path, text.getvalue().encode())


# ---------------------------------------------------------------- the whole report


def write_report(out: Path, metrics: dict[str, Any], records: list[dict[str, Any]], wrong: list[dict[str, Any]],
                 classes: list[str], title: str = "", plots: bool = True) -> dict[str, Any]:
    """metrics.json and predictions.csv first, then the three PNGs into `out` (each file written whole under a
    temporary name, then renamed; none with `plots` False); returns the metrics.json payload. A plot that
    cannot be drawn is one warning line on stderr and is missing from `out` (an older report's copy is removed
    first): the numbers never depend on a plot."""
    out.mkdir(parents=True, exist_ok=True)
    labels = np.array([r["label"] for r in records], dtype=np.int64)
    preds = np.array([r["pred"] for r in records], dtype=np.int64)
    matrix = confusion_matrix(labels, preds, len(classes))
    payload = metrics_json(metrics, matrix, classes)
    write_predictions_csv(out / "predictions.csv", prediction_rows(records, classes))
    write_json_atomic(out / "metrics.json", payload)
    for name in PLOTS:
        (out / name).unlink(missing_ok=True)
    if not plots:
        return payload
    features = np.stack([r["features"] for r in records]).astype(np.float32) if records else np.zeros((0, 1))
    drawings = {"confusion_matrix.png": lambda path: plot_confusion_matrix(matrix, classes, path, title),
             "most_incorrect.png": lambda path: plot_most_incorrect(wrong, classes, path),
             "embeddings.png": lambda path: plot_embeddings(features, labels, classes, path)}
    for name, draw in drawings.items():
        try:
            draw(out / name)
        except Exception as e:  # a plot is an extra: say why it is missing, keep the rest of the report
            print(f"warning: {out / name} not drawn: {type(e).__name__}: {e}", file=sys.stderr)
    return payload


def wandb_payload(out: Path, records: list[dict[str, Any]], classes: list[str], prefix: str) -> dict[str, Any]:
    """The report's PNGs (those in `out`) as wandb.Image and the predictions as a wandb.Table, keyed
    `prefix/...`."""
    import wandb

    payload: dict[str, Any] = {f"{prefix}/{name.removesuffix('.png')}": wandb.Image(str(out / name))
                               for name in PLOTS if (out / name).exists()}
    payload[f"{prefix}/predictions"] = wandb.Table(columns=PREDICTION_COLUMNS,
                                                   data=prediction_rows(records, classes))
    return payload


# ---------------------------------------------------------------- plots


def _save(fig: plt.Figure, path: Path, dpi: int = 100) -> None:
    """The PNG under a temporary name, then renamed: never a half-written plot at `path`."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        pyplot().close(fig)


def plot_confusion_matrix(matrix: np.ndarray, classes: list[str], path: Path, title: str = "") -> None:
    """Rows (true) normalised to 1, classes in index order; cell counts written only for few classes."""
    n = len(classes)
    size = min(max(6.0, 0.11 * n + 3.0), 26.0)
    fig, ax = pyplot().subplots(figsize=(size, size))
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    row_pt = size * 0.8 * 72 / max(n, 1)  # the axes take ~80% of the figure; 72 pt per inch
    font = max(3.0, min(9.0, 0.75 * row_pt))  # every class name fits its row
    ax.set_xticks(range(n), [short_name(c) for c in classes], rotation=90, fontsize=font)
    ax.set_yticks(range(n), [short_name(c) for c in classes], fontsize=font)
    if n <= ANNOTATE_MAX_CLASSES:
        for (row, col), count in np.ndenumerate(matrix):
            if count:
                ax.text(col, row, str(count), ha="center", va="center", fontsize=font,
                        color="white" if rates[row, col] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"{title + ': ' if title else ''}confusion matrix, top-1 {accuracy:.3f} on {matrix.sum()} images")
    _save(fig, path, dpi=100 if n <= 60 else 150)  # small names stay legible when zoomed in


def plot_most_incorrect(wrong: list[dict[str, Any]], classes: list[str], path: Path) -> None:
    """The most confident wrong predictions, as the model saw them (eval transform, before normalisation)."""
    if not wrong:
        fig, ax = pyplot().subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no incorrect predictions", ha="center", va="center", fontsize=14)
        ax.set_axis_off()
        _save(fig, path)
        return
    cols = min(4, len(wrong))
    rows = math.ceil(len(wrong) / cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, item in zip(axes.flat, wrong, strict=False):
        ax.imshow(np.asarray(item["image"]).transpose(1, 2, 0))
        ax.set_title(f"{item['key']}\ntrue: {short_name(classes[item['label']])}\n"
                     f"pred: {short_name(classes[item['pred']])} ({item['conf']:.2f})", fontsize=8)
    fig.suptitle("most confident wrong predictions")
    _save(fig, path)


def plot_embeddings(features: np.ndarray, labels: np.ndarray, classes: list[str], path: Path) -> None:
    """PCA and t-SNE (seeded) of the penultimate features, one colour per class; images whose features are
    not finite are left out (the titles say how many), a panel that cannot be computed says why."""
    keep = embedding.finite_rows(features)
    dropped = len(features) - len(keep)
    features, labels = features[keep], labels[keep]
    note = f", {dropped} with non-finite features left out" if dropped else ""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(14, 6.5))
    try:
        if len(features) < 2 or features.shape[1] < 2:
            raise embedding.EmbeddingError(f"too few images ({len(features)})")
        _scatter(left, embedding.pca(features, 2), labels, classes)
        left.set_title(f"PCA of the penultimate features ({len(features)} images{note})")
    except embedding.EmbeddingError as e:
        _no_plot(left, f"PCA: {e}")
    try:
        embedded, chosen = embedding.tsne(features)
        _scatter(right, embedded, labels[chosen], classes)
        right.set_title(f"t-SNE ({len(chosen)} of {len(features)} images{note})")
    except embedding.EmbeddingError as e:
        _no_plot(right, f"t-SNE: {e}")
    if len(classes) <= LEGEND_MAX_CLASSES and len(features):
        handles = [pyplot().Line2D([], [], marker="o", linestyle="", color=_colour(i, len(classes)),
                              label=short_name(name)) for i, name in enumerate(classes)]
        fig.legend(handles=handles, loc="center right", fontsize=8)
        fig.subplots_adjust(right=0.8)
    _save(fig, path)


def _colour(index: int, num_classes: int) -> Any:
    cmap = pyplot().get_cmap("tab20" if num_classes <= 20 else "turbo")
    return cmap(index if num_classes <= 20 else index / max(num_classes - 1, 1))


def _scatter(ax: plt.Axes, points: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    colours = [_colour(int(label), len(classes)) for label in labels]
    ax.scatter(points[:, 0], points[:, 1], c=colours, s=8, alpha=0.8, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])


def _no_plot(ax: plt.Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.set_axis_off()


def plot_lr_find(lrs: list[float], losses: list[float], suggested_index: int, path: Path) -> None:
    """Smoothed loss against LR (log axis), the suggested LR marked."""
    fig, ax = pyplot().subplots(figsize=(8, 5))
    ax.plot(lrs, losses, color="tab:blue")
    lr, loss = lrs[suggested_index], losses[suggested_index]
    ax.plot([lr], [loss], marker="o", markersize=9, color="tab:red", linestyle="",
            label=f"suggested LR {lr:.2e} (steepest descent)")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (fc group)")
    ax.set_ylabel("loss (smoothed)")
    ax.set_title("LR range test")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(fig, path)


def write_lr_find(out: Path, result: Any) -> None:
    """lr_find.png and then lr_find.json ({"suggested_lr", "lrs", "losses"}) of a `lr_finder.RangeTest`."""
    out.mkdir(parents=True, exist_ok=True)
    plot_lr_find(result.lrs, result.losses, result.suggested_index, out / "lr_find.png")
    write_json_atomic(out / "lr_find.json", result.as_json())
