"""`lr-find` and `evaluate`: one or several processes (`accelerate launch`), like `fit`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from pipeline.errors import UserError
from pipeline.manifest import load_manifest
from train import augment, checkpoint, engine, report
from train.config import Config


def lr_find(config: Config, out: Path) -> float:
    """The LR range test on fit's stream, model, groups and precision; lr_find.{json,png} in `out`."""
    accelerator = engine.make_accelerator(config, with_tracker=False)
    manifest = load_manifest(config.shards)
    engine.batches_per_epoch(accelerator, manifest, config)  # one-line error when a batch does not fit
    set_seed(config.seed)
    model, optimizer = engine.build_model_and_optimizer(accelerator, config, manifest)
    model, optimizer = accelerator.prepare(model, optimizer)
    result = engine.lr_find(accelerator, model, optimizer, manifest, config)
    if accelerator.is_main_process:
        report.write_lr_find(out, result)
    stopped = " (stopped early: the loss diverged)" if result.diverged else ""  # not when the steps ran out
    engine.say(accelerator, f"{len(result.lrs)} steps from {result.lrs[0]:.3g} to {result.lrs[-1]:.3g}{stopped}; "
                            f"plot and values in {out}/lr_find.png, lr_find.json")
    engine.say(accelerator, f"suggested LR: {result.suggested_lr:.4g} (steepest descent of the smoothed loss)")
    accelerator.end_training()
    return result.suggested_lr


def check_classes(meta: dict[str, Any], manifest: dict[str, Any], run: str, shards: str) -> None:
    """The shard set must have the checkpoint's classes, in the same order (index = label)."""
    ours, theirs = meta["classes"], manifest["classes"]
    if ours == theirs:
        return
    pairs = enumerate(zip(ours, theirs, strict=False))
    index = next((i for i, (a, b) in pairs if a != b), min(len(ours), len(theirs)))
    first = f"{theirs[index] if index < len(theirs) else '(none)'!r} in the shards vs " \
            f"{ours[index] if index < len(ours) else '(none)'!r} in the checkpoint"
    raise UserError(f"class mismatch: shard set {shards} has {len(theirs)} classes, checkpoint {run} has "
                    f"{len(ours)}; first difference at index {index}: {first}")


def evaluate(run: str, shards: str, split: str, out: Path, batch_size: int, workers: int, precision: str,
             wandb: str, wandb_project: str) -> dict[str, Any]:
    """Metrics, predictions and plots of a run's best model on one split of a shard set, into `out`."""
    model, meta = checkpoint.load_model(Path(run))
    manifest = load_manifest(shards)
    check_classes(meta, manifest, run, shards)
    if manifest["splits"][split]["num_samples"] == 0:
        raise UserError(f"the {split} split of {shards} is empty: nothing to evaluate")
    accelerator = engine.make_accelerator(Config(precision=precision, wandb=wandb, run_dir=str(out)))
    model = model.to(accelerator.device, memory_format=torch.channels_last)
    transform = augment.Augment(augment.eval_transform(meta["image_size"], meta["crop_pct"]))
    result = engine.evaluate(accelerator, model, shards, manifest, split, transform, batch_size, workers,
                             collect=True)
    if result["num_samples"] == 0:
        raise UserError(f"the {split} split of {shards}: all {result['bad_samples']} samples are corrupt, "
                        "nothing to evaluate")
    if accelerator.log_with:
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers(wandb_project, config={"checkpoint": run, "shards": shards, "split": split},
                                  init_kwargs={"wandb": {"dir": str(out), "mode": engine.wandb_mode(wandb),
                                                         "job_type": "evaluate"}})
    engine.write_evaluation_report(accelerator, result, meta["classes"], out, split, step=0)
    engine.say(accelerator, f"{split}: top1 {result['top1']:.4f} top5 {result['top5']:.4f} loss {result['loss']:.4f} "
                            f"on {result['num_samples']} images ({accelerator.num_processes} process(es))")
    if result["bad_samples"]:
        engine.say(accelerator, f"warning: {result['bad_samples']} corrupt sample(s) skipped")
    accelerator.end_training()
    return result
