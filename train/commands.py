"""One function per command (fit, lr-find, evaluate, predict, export): the wiring from checked arguments to
the work (accelerator, manifest, model, the loops) and the lines a command ends with; each returns the
exit status. `fit`, `lr-find` and `evaluate` run in one or several processes (`accelerate launch`).

fit and lr-find get the shard set's manifest from the command line, which checks it before torch is
imported (python -m train's `run`)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.manifest import load_manifest
from pipeline.remote import set_io_timeout
from train.config import Config
from train.data.cache import configure as configure_cache


def fit(config: Config, manifest: dict[str, Any]) -> int:
    """`fit` on the shard set of `manifest`; a stop signal ends it with stopping.STOP_EXIT once its checkpoint
    is written."""
    configure_cache(config.cache_dir, config.cache_limit_gb)  # inherited by DataLoader workers and ranks
    from train.stopping import STOP_EXIT, Stopped

    try:
        run_fit(config, manifest)
    except Stopped as stop:  # the checkpoint is written
        if str(stop):
            print(stop, flush=True)
        return STOP_EXIT
    return 0


def run_fit(config: Config, manifest: dict[str, Any]) -> dict[str, Any]:
    """Train, keep the best-by-valid-loss model, evaluate it on test, write results.json.

    The main process holds the run directory's lock for the whole run and makes every decision about how
    the run starts (fresh, or from which checkpoint); every process learns the outcome, so a refusal is the
    same one line everywhere and nothing is written before it. config.yaml is written once, when the config
    is complete (with --lr auto, once lr-find has chosen on the prepared model)."""
    from train import engine, lifecycle, lr_finder, stopping, tracking

    with contextlib.ExitStack() as held:  # the lock and the stop-signal handlers, until fit returns or fails
        held.enter_context(stopping.installed(config.stop_signals, config.stop_grace))
        accelerator = tracking.make_accelerator(config)
        config, start, steps_per_epoch = lifecycle.begin(held, accelerator, config, manifest)
        model, optimizer = engine.prepared_model(accelerator, config, manifest)
        if config.lr == "auto":
            lr = lr_finder.choose_lr(accelerator, model, optimizer, manifest, config, Path(config.run_dir))
            config = dataclasses.replace(config, lr=lr)
        lifecycle.record_config(accelerator, config)
        return engine.train(accelerator, model, optimizer, config, manifest, start, steps_per_epoch)


def lr_find(config: Config, manifest: dict[str, Any], out: Path) -> int:
    """The LR range test on fit's stream, model, groups and precision; lr_find.{json,png} in `out`."""
    configure_cache(config.cache_dir, config.cache_limit_gb)
    from accelerate.utils import set_seed

    from train import engine, lifecycle, lr_finder, report, tracking

    accelerator = tracking.make_accelerator(config, with_tracker=False)
    lifecycle.batches_per_epoch(accelerator, manifest, config)  # one-line error when a batch does not fit
    set_seed(config.seed)
    model, optimizer = engine.build_model_and_optimizer(accelerator, config, manifest)
    model, optimizer = accelerator.prepare(model, optimizer)
    result = lr_finder.lr_find(accelerator, model, optimizer, manifest, config)
    if accelerator.is_main_process:
        report.write_lr_find(out, result)
    stopped = " (stopped early: the loss diverged)" if result.diverged else ""  # not when the steps ran out
    say = tracking.say
    say(accelerator, f"{len(result.lrs)} steps from {result.lrs[0]:.3g} to {result.lrs[-1]:.3g}{stopped}; "
                     f"plot and values in {out}/lr_find.png, lr_find.json")
    say(accelerator, f"suggested LR: {result.suggested_lr:.4g} (steepest descent of the smoothed loss)")
    accelerator.end_training()
    return 0


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
             wandb: str, wandb_project: str, io_timeout: float = 0.0, cache_dir: str = "",
             cache_limit_gb: float = 0.0, eval_size: int = 0, tta: str = "", plots: bool = True) -> int:
    """Metrics, predictions and (unless not `plots`) plots of a run's best model on one split of a shard set,
    into `out`, at the eval size and TTA the run recorded unless `eval_size` / `tta` are given (0 / "")."""
    set_io_timeout(io_timeout or None)  # 0: the environment's or the default
    configure_cache(cache_dir, cache_limit_gb)  # "" and 0: the environment's
    import torch

    from train import augment, checkpoint, evaltime, evaluation, tracking

    model, meta = checkpoint.load_model(Path(run))
    meta = evaltime.with_overrides(meta, eval_size, tta)
    manifest = load_manifest(shards)
    check_classes(meta, manifest, run, shards)
    if manifest["splits"][split]["num_samples"] == 0:
        raise UserError(f"the {split} split of {shards} is empty: nothing to evaluate")
    accelerator = tracking.make_accelerator(Config(precision=precision, wandb=wandb, run_dir=str(out)))
    model = model.to(accelerator.device, memory_format=torch.channels_last)
    transform = augment.run_eval_transform(meta)
    stats = (meta["mean"], meta["std"])
    result = evaluation.evaluate(accelerator, model, shards, manifest, split, transform, stats, batch_size,
                                 workers, collect=True, tta=meta["tta"])
    result["eval"] = evaltime.settings(meta)
    if result["num_samples"] == 0:
        raise UserError(f"the {split} split of {shards}: all {result['bad_samples']} samples are corrupt, "
                        "nothing to evaluate")
    if accelerator.log_with:
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
        recorded = {"checkpoint": run, "shards": shards, "split": split, "eval": result["eval"]}
        accelerator.init_trackers(wandb_project, config=recorded,
                                  init_kwargs={"wandb": {"dir": str(out), "mode": tracking.wandb_mode(wandb),
                                                         "job_type": "evaluate"}})
    evaluation.write_evaluation_report(accelerator, result, meta["classes"], out, split, step=0, plots=plots)
    say = tracking.say
    say(accelerator, f"{split}: top1 {result['top1']:.4f} top5 {result['top5']:.4f} loss {result['loss']:.4f} "
                     f"on {result['num_samples']} images ({evaltime.describe(result['eval'])}; "
                     f"{accelerator.num_processes} process(es))")
    if result["bad_samples"]:
        say(accelerator, f"warning: {result['bad_samples']} corrupt sample(s) skipped")
    accelerator.end_training()
    return 0


def predict(run: str, images: list[str], as_json: bool, batch_size: int, eval_size: int = 0, tta: str = "") -> int:
    """Top-5 species of each image (at the run's eval size and TTA unless given); status 1 when some image
    could not be read."""
    from train.predict import predict as predict_images

    failed = predict_images(run, images, as_json=as_json, batch_size=batch_size, eval_size=eval_size, tta=tta)
    return 1 if failed else 0


def export(run: str, fmt: str, out: Path) -> int:
    """The best model as TorchScript or ONNX (auto: the format --out's suffix names, else TorchScript where
    the model traces, else ONNX), reloaded and compared on a check batch."""
    from train.export import export as export_model

    fmt, diff = export_model(run, fmt, out)
    print(f"wrote {out} ({fmt}); reloaded: max abs logit difference {diff:.3g} on a check batch")
    return 0


def models(pattern: str) -> int:
    """The models of each source whose --arch name matches `pattern`, with their native input size and where
    their published weights come from; one line with the closest names when none matches."""
    from train import archs

    found = archs.listing(pattern)
    if not any(rows for _, rows in found):
        close = archs.closest(pattern.strip("*?[]"))
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise UserError(f"no model matches {pattern!r}{hint}")
    print("weights: cached = here already; download = fetched on first use of --pretrained imagenet; "
          "none = no published weights (--pretrained none or a local file)")
    for source, rows in found:
        if rows:
            print(f"\n{source.name}: {source.syntax}; {len(rows)} model(s)")
            print(f"  {'--arch':<44} {'size':>5}  {'weights':<8}  note")
            for row in rows:
                print(f"  {row.arch:<44} {row.input_size:>5}  {row.weights:<8}  {row.note}".rstrip())
    return 0
