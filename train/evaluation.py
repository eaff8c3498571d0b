"""Scoring a model on one split: loss / top-1 / top-5 over every sample exactly once across processes,
optionally collecting what a report needs (per-sample predictions and embeddings, the most confident wrong
predictions with their images); fit's final test with results.json, and the report writer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

from pipeline.files import write_json_atomic
from train import augment, checkpoint, data, evaltime, rundir
from train.config import Config
from train.metrics import Totals, predictions
from train.model import preprocessing
from train.tracking import say

if TYPE_CHECKING:
    from train.lifecycle import Progress


def eval_transform(config: Config) -> augment.Augment:
    """Resize the short side to eval size / crop_pct, then centre-crop the eval size (evaltime)."""
    return augment.run_eval_transform(eval_meta(config))


def norm_stats(config: Config) -> tuple[list[float], list[float]]:
    """The mean and std that normalise the model's inputs (the pretrained weights' own, when they have any)."""
    settings = preprocessing(config.arch, config.pretrained, config.crop_pct)
    return settings["mean"], settings["std"]


def eval_meta(config: Config) -> dict[str, Any]:
    """How a run scores: the train size (the model is built for it), the eval size, normalisation, resize
    filter, crop and TTA, as a checkpoint's meta.json records them."""
    settings = preprocessing(config.arch, config.pretrained, config.crop_pct)
    size = evaltime.eval_image_size(config.arch, config.image_size, config.eval_image_size,
                                     config.eval_size_ratio, config.pretrained)
    meta = {"arch": config.arch, "image_size": config.image_size, **settings, "eval_image_size": size}
    return evaltime.with_overrides(meta, 0, config.tta)


def eval_settings(config: Config) -> dict[str, Any]:
    """What results.json and W&B record of how a fit run's valid and test numbers were obtained."""
    return evaltime.settings(eval_meta(config))


def model_meta(config: Config, manifest: dict[str, Any]) -> dict[str, Any]:
    """What predict / evaluate / export need to use a checkpoint with no other flags."""
    return {**eval_meta(config), "classes": manifest["classes"], "shard_set": rundir.shard_set_id(manifest)}


MOST_INCORRECT = 16  # wrong predictions kept with their images, per process, for most_incorrect.png


class _Collector:
    """Per-sample records of one process (features as float16: bounded memory) and its most confident
    wrong predictions with their uint8 images (at most MOST_INCORRECT)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.wrong: list[dict[str, Any]] = []

    def add(self, batch: dict[str, Any], labels: torch.Tensor, logits: torch.Tensor, features: torch.Tensor) -> None:
        pred = predictions(logits)  # ties and NaN ranked as top-1 accuracy ranks them
        conf = logits.softmax(dim=1).gather(1, pred[:, None])[:, 0]
        labels, conf, pred = labels.tolist(), conf.tolist(), pred.tolist()
        features = features.float().cpu().numpy().astype("float16")
        for i, key in enumerate(batch["key"]):
            record = {"key": key, "label": labels[i], "pred": pred[i], "conf": conf[i]}
            self.records.append({**record, "features": features[i]})
            if pred[i] != labels[i]:
                self.wrong.append({**record, "image": batch["image"][i].clone().numpy()})  # not a view of the batch
        self.wrong = _most_confident(self.wrong)

    def gather(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Everything from every process (all of them receive it), records sorted by key."""
        from accelerate.utils import gather_object

        records = sorted(gather_object(self.records), key=lambda r: r["key"])
        return records, _most_confident(gather_object(self.wrong))


def _most_confident(wrong: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(wrong, key=lambda r: (-r["conf"], r["key"]))[:MOST_INCORRECT]


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, location: str, manifest: dict[str, Any],
             split: str, transform: augment.Augment, stats: tuple[list[float], list[float]], batch_size: int,
             workers: int, collect: bool = False, tta: str = "none") -> dict[str, Any]:
    """Loss / top-1 / top-5 over every sample of `split` exactly once across processes, of the model's
    outputs under test-time augmentation `tta` (evaltime.forward).

    With `collect`, also returns, gathered on every process, "records" (per sample: key, label, pred, conf,
    features; sorted by key) and "wrong" (the most confident wrong predictions, with uint8 images).
    """
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    loader = data.eval_loader(location, manifest, split, transform=transform, batch_size=batch_size,
                              workers=workers, rank=accelerator.process_index, world_size=accelerator.num_processes)
    totals = Totals(accelerator.device)
    collector = _Collector()
    for batch in loader:
        images = augment.normalize(batch["image"].to(accelerator.device, non_blocking=True), *stats)
        labels = batch["label"].to(accelerator.device)
        with accelerator.autocast():
            features, logits = evaltime.forward(net, images, tta)
            logits = logits.float()
        totals.add(logits, labels)
        if collect:
            collector.add(batch, labels, logits, features)
    net.train(was_training)
    totals.sums = accelerator.reduce(totals.sums, "sum")
    result = totals.as_dict()
    expected = manifest["splits"][split]["num_samples"]
    result["bad_samples"] = expected - result["num_samples"]
    if collect:
        result["records"], result["wrong"] = collector.gather()
    return result


def replaces_best(valid: dict[str, Any], progress: Progress) -> bool:
    """Whether this epoch's model becomes the best: a lower valid loss than the best so far, or, when the valid
    split gave no sample to score (empty, or every sample corrupt), always, so the last epoch is kept."""
    if valid["num_samples"] == 0 or progress.best_loss is None:
        return True
    return valid["loss"] < progress.best_loss


def final_results(accelerator: Accelerator, model: torch.nn.Module, manifest: dict[str, Any], config: Config,
                  progress: Progress, run_dir: Path) -> dict[str, Any]:
    """Load the best model into every process, evaluate it on test, write results.json, then the test
    report (metrics.json, predictions.csv, PNGs) into run_dir/report/. A split with no sample has null
    metrics in results.json (num_samples 0), and an empty test split gets no report."""
    state, meta = checkpoint.load_best(run_dir, flag="")  # fit has no --checkpoint option
    accelerator.unwrap_model(model).load_state_dict(state)
    test = evaluate(accelerator, model, config.shards, manifest, "test", eval_transform(config),
                    norm_stats(config), config.eval_batch_size or config.batch_size, config.workers, collect=True,
                    tta=config.tta)
    test["eval"] = {**eval_settings(config), "weights": meta.get("weights", "raw")}  # trained or averaged
    results = {"test": _public(test), "valid": _public(progress.best_valid), "best_epoch": progress.best_epoch,
               "eval": test["eval"]}
    if accelerator.is_main_process:
        write_json_atomic(run_dir / "results.json", results)
    if test["num_samples"] == 0:
        why = f"all {test['bad_samples']} of its samples are corrupt" if test["bad_samples"] else "it is empty"
        say(accelerator, f"test (best epoch {progress.best_epoch}): no score, the test split has no readable "
                         f"sample ({why}); no test report; results in {run_dir}/results.json")
        return results
    say(accelerator, f"test (best epoch {progress.best_epoch}): top1 {test['top1']:.4f} top5 {test['top5']:.4f} "
                     f"loss {test['loss']:.4f} on {test['num_samples']} images ({evaltime.describe(test['eval'])}); "
                     f"results in {run_dir}/results.json")
    write_evaluation_report(accelerator, test, manifest["classes"], run_dir / "report", "test", progress.global_step,
                            plots=config.plots)
    return results


def write_evaluation_report(accelerator: Accelerator, result: dict[str, Any], classes: list[str], out: Path,
                            title: str, step: int, plots: bool = True) -> None:
    """The report of an `evaluate(..., collect=True)` result, by the main process (its PNGs unless `plots` is
    False); the PNGs and the predictions table also go to W&B when the accelerator has that tracker."""
    if not accelerator.is_main_process:
        return
    from train import report

    report.write_report(out, result, result["records"], result["wrong"], classes, title, plots)
    if any(tracker.name == "wandb" for tracker in accelerator.trackers):
        run = accelerator.get_tracker("wandb", unwrap=True)
        run.log(report.wandb_payload(out, result["records"], classes, f"report/{title}"), step=step)
    drawn = [name for name in report.PLOTS if (out / name).exists()]
    say(accelerator, f"{title} report: {out}/ ({', '.join(['metrics.json', 'predictions.csv', *drawn])})")


def _public(metrics: dict[str, Any]) -> dict[str, Any]:
    """top1, top5, loss (null with no sample) and num_samples; a split never scored counts 0 samples."""
    return {"top1": metrics.get("top1"), "top5": metrics.get("top5"), "loss": metrics.get("loss"),
            "num_samples": metrics.get("num_samples", 0)}
