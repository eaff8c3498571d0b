"""fit and evaluate loops: Accelerate for devices and processes, our loaders for data, exact metrics."""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.manifest import load_manifest, write_json_atomic
from train import augment, checkpoint, data, lr_finder, rundir
from train.config import Config, to_dict
from train.config import save as save_config
from train.metrics import Totals
from train.model import build_model
from train.optim import build_optimizer, build_scheduler, group_lrs, lr_multipliers, param_groups


def wandb_mode(requested: str) -> str:
    """auto: online when an API key is configured (env or ~/.netrc), else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


def make_accelerator(config: Config, with_tracker: bool = True) -> Accelerator:
    if config.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
    tracker = with_tracker and wandb_mode(config.wandb) != "disabled"
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # several CPU processes need this (DESIGN 5)
        mixed_precision=None if config.precision == "auto" else config.precision,  # None: launcher decides
        gradient_accumulation_steps=config.grad_accum,
        log_with="wandb" if tracker else None,
        project_dir=config.run_dir,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.dist_timeout))],
    )


def eval_transform(config: Config) -> augment.Augment:
    return augment.Augment(augment.eval_transform(config.image_size, config.crop_pct))


def batches_per_epoch(accelerator: Accelerator, manifest: dict[str, Any], config: Config) -> int:
    """Train batches each process runs per epoch; a one-line error when one global batch does not fit."""
    return data.train_batches_per_epoch(manifest["splits"]["train"]["num_samples"], config.batch_size,
                                        accelerator.num_processes)


def train_batches(accelerator: Accelerator, manifest: dict[str, Any], config: Config, epoch: int,
                  start_batch: int, epochs: int) -> Generator[dict[str, Any], None, None]:
    """This process's train batches of `epochs` epochs from batch `start_batch` of `epoch` on, as one stream
    (workers start once): what fit and lr-find both read. Close it to stop its workers."""
    transform = augment.Augment(augment.train_transform(config.augment, config.image_size, tuple(config.crop_scale)))
    return iter(data.train_loader(
        config.shards, manifest, transform=transform, batch_size=config.batch_size, workers=config.workers,
        seed=config.seed, epoch=epoch, rank=accelerator.process_index, world_size=accelerator.num_processes,
        start_batch=start_batch, epochs=epochs, shuffle_buffer=config.shuffle_buffer))


def model_meta(config: Config, manifest: dict[str, Any]) -> dict[str, Any]:
    """What predict / evaluate / export need to use a checkpoint with no other flags."""
    return {"arch": config.arch, "classes": manifest["classes"], "image_size": config.image_size,
            "crop_pct": config.crop_pct, "mean": list(augment.IMAGENET_MEAN), "std": list(augment.IMAGENET_STD),
            "eval_transform": {"resize_short": round(config.image_size / config.crop_pct),
                               "center_crop": config.image_size},
            "shard_set": rundir.shard_set_id(manifest)}


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint as trainer.json."""

    epoch: int = 0  # the epoch in progress (or next, when step_in_epoch == 0)
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    global_step: int = 0
    best_loss: float = math.inf
    best_epoch: int = -1
    best_valid: dict[str, Any] = field(default_factory=dict)
    partial: list[float] = field(default_factory=lambda: [0.0] * 4)  # train sums of the epoch so far (all ranks)
    partial_bad: int = 0
    world_size: int = 1
    workers: int = 0


class MetricsLog:
    """metrics.jsonl (main process) + the W&B tracker through Accelerate; one record per step/epoch."""

    def __init__(self, accelerator: Accelerator, path: Path, resume_step: int | None) -> None:
        self.accelerator, self.path = accelerator, path
        if accelerator.is_main_process and resume_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log(_flatten(record), step=record["step"])


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and key != "step":
            flat[f"{prefix}{key}"] = value
    return flat


def build_model_and_optimizer(accelerator: Accelerator, config: Config,
                              manifest: dict[str, Any]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and its discriminative param groups; with --lr auto (or for lr-find) the fc group's LR is 1
    and the others their multiplier, to be scaled once the LR is known."""
    with accelerator.main_process_first():
        model = build_model(config.arch, len(manifest["classes"]), config.pretrained)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    base_lr = 1.0 if config.lr == "auto" else config.lr
    groups = param_groups(model, base_lr, config.weight_decay, lr_multipliers(config.lr_scheme, config.lr_decay))
    return model, build_optimizer(config.optimizer, groups, base_lr, momentum=config.momentum)


def fit(config: Config) -> dict[str, Any]:
    """Train, keep the best-by-valid-loss model, evaluate it on test, write results.json."""
    accelerator = make_accelerator(config)
    manifest = load_manifest(config.shards)
    run_dir = Path(config.run_dir)
    rundir.resolve_auto_lr(config)
    resume_from = rundir.resume_point(config, manifest)
    accelerator.wait_for_everyone()
    info = rundir.write_run_files(config, manifest) if accelerator.is_main_process else {}
    set_seed(config.seed)

    model, optimizer = build_model_and_optimizer(accelerator, config, manifest)
    world = accelerator.num_processes
    batches = batches_per_epoch(accelerator, manifest, config)
    steps_per_epoch = batches // config.grad_accum
    if steps_per_epoch < 1:
        raise UserError(f"--grad-accum {config.grad_accum} exceeds the {batches} batches of an epoch")
    if config.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if config.lr == "auto":
        config.lr = choose_lr(accelerator, model, optimizer, manifest, config, run_dir)
    scheduler = build_scheduler(optimizer.optimizer, config.epochs * steps_per_epoch, config.pct_start,
                                config.div_factor, config.final_div_factor)  # the unwrapped optimizer
    accelerator.register_for_checkpointing(scheduler)  # stepped by us once per optimizer step, never prepared

    progress = Progress(world_size=world, workers=config.workers)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        progress = Progress(**checkpoint.load_trainer_state(resume_from))
        if (progress.world_size, progress.workers) != (world, config.workers) and progress.step_in_epoch:
            raise UserError(f"{resume_from} was saved mid-epoch with {progress.world_size} process(es) x "
                            f"{progress.workers} workers; resume with the same, or from an epoch-end checkpoint")
        progress.world_size, progress.workers = world, config.workers
        accelerator.print(f"resuming {run_dir} from {resume_from.name} (epoch {progress.epoch + 1}, "
                          f"step {progress.global_step})")
    log = MetricsLog(accelerator, run_dir / "metrics.jsonl", progress.global_step if resume_from else None)
    if accelerator.log_with:
        accelerator.init_trackers(config.wandb_project, config=to_dict(config), init_kwargs={"wandb": {
            "dir": str(run_dir), "mode": wandb_mode(config.wandb), "name": run_dir.name,
            "id": info.get("wandb_id"), "resume": "allow"}})

    stream = train_batches(accelerator, manifest, config, progress.epoch,
                           start_batch=progress.step_in_epoch * config.grad_accum,
                           epochs=max(config.epochs - progress.epoch, 1))  # workers start on the first batch
    for epoch in range(progress.epoch, config.epochs):
        progress.epoch = epoch
        train_metrics = train_epoch(accelerator, model, optimizer, scheduler, stream, config, progress,
                                    steps_per_epoch, log, run_dir)
        valid = evaluate(accelerator, model, config.shards, manifest, "valid", eval_transform(config),
                         config.eval_batch_size or config.batch_size, config.workers)
        if valid["loss"] < progress.best_loss:
            progress.best_loss, progress.best_epoch, progress.best_valid = valid["loss"], epoch + 1, valid
            if accelerator.is_main_process:
                checkpoint.save_best(run_dir, accelerator.unwrap_model(model), {
                    **model_meta(config, manifest), "epoch": epoch + 1, "valid": valid})
        log.write({"kind": "epoch", "step": progress.global_step, "epoch": epoch + 1, "train": train_metrics,
                   "valid": valid, "best_epoch": progress.best_epoch})
        accelerator.print(f"epoch {epoch + 1}/{config.epochs}: train loss {train_metrics['loss']:.4f} "
                          f"top1 {train_metrics['top1']:.3f} | valid loss {valid['loss']:.4f} "
                          f"top1 {valid['top1']:.3f} top5 {valid['top5']:.3f}")
        progress.epoch, progress.step_in_epoch = epoch + 1, 0
        progress.partial, progress.partial_bad = [0.0] * 4, 0
        checkpoint.save_checkpoint(accelerator, run_dir, progress.__dict__, config.keep_checkpoints)
    stream.close()

    results = final_results(accelerator, model, manifest, config, progress, run_dir)
    log.write({"kind": "test", "step": progress.global_step, "test": results["test"]})
    accelerator.end_training()
    return results


class Throughput:
    """Images/s and the fraction of wall time spent waiting for the loader."""

    def __init__(self) -> None:
        self.start, self.wait, self.images = time.perf_counter(), 0.0, 0

    def timed(self, batches: Any) -> Any:
        iterator = iter(batches)
        while True:
            tick = time.perf_counter()
            batch = next(iterator, None)
            self.wait += time.perf_counter() - tick
            if batch is None:
                return
            yield batch

    def rates(self, world_size: int) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return self.images * world_size / elapsed, self.wait / elapsed


def train_epoch(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                stream: Iterator[dict[str, Any]], config: Config, progress: Progress, steps_per_epoch: int,
                log: MetricsLog, run_dir: Path) -> dict[str, Any]:
    """One epoch (or the rest of one, after a resume) from `stream`; returns exact train metrics over all
    ranks."""
    epoch = progress.epoch
    remaining = (steps_per_epoch - progress.step_in_epoch) * config.grad_accum
    totals = Totals(accelerator.device)
    if accelerator.is_main_process:
        totals.add_sums(progress.partial)  # what the ranks summed before the checkpoint we resumed from
    bad = torch.tensor(progress.partial_bad if accelerator.is_main_process else 0, device=accelerator.device)
    model.train()
    throughput = Throughput()
    rank_batches = 0  # batches this rank ran; gathered at the end, so a user sees every rank took the same
    with tqdm(total=steps_per_epoch, initial=progress.step_in_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
              disable=not accelerator.is_main_process, dynamic_ncols=True) as bar:
        for batch in throughput.timed(itertools.islice(stream, remaining)):
            logits, labels, loss = _train_step(accelerator, model, optimizer, batch, config)
            totals.add(logits, labels, loss * labels.numel())
            bad += batch["bad"]
            throughput.images += labels.numel()
            rank_batches += 1
            if not accelerator.sync_gradients:
                continue
            lrs = group_lrs(optimizer)  # the LR this step used (read before stepping the schedule)
            scheduler.step()
            progress.global_step += 1
            progress.step_in_epoch += 1
            step_loss = accelerator.reduce(loss, "mean").item()
            img_per_s, wait = throughput.rates(accelerator.num_processes)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", img_s=f"{img_per_s:.0f}", wait=f"{wait:.0%}")
            if progress.global_step % config.log_every == 0 or progress.step_in_epoch == steps_per_epoch:
                log.write({"kind": "step", "step": progress.global_step, "epoch": epoch + 1, "loss": step_loss,
                           "lr": lrs, "img_per_s": img_per_s, "data_wait": wait})
            if (config.checkpoint_every and progress.global_step % config.checkpoint_every == 0
                    and progress.step_in_epoch < steps_per_epoch):
                progress.partial = accelerator.reduce(totals.sums.clone(), "sum").tolist()
                progress.partial_bad = int(accelerator.reduce(bad.clone(), "sum").item())
                checkpoint.save_checkpoint(accelerator, run_dir, progress.__dict__, config.keep_checkpoints)
    totals.sums = accelerator.reduce(totals.sums, "sum")
    bad_total = int(accelerator.reduce(bad, "sum").item())
    if bad_total:
        accelerator.print(f"warning: {bad_total} corrupt sample(s) skipped in epoch {epoch + 1}")
    # Per process, in rank order: the batches it ran in this epoch (since the resume, after one).
    per_rank = accelerator.gather(torch.tensor([rank_batches], device=accelerator.device)).tolist()
    return {**totals.as_dict(), "bad_samples": bad_total, "rank_batches": per_rank}


def _train_step(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, batch: dict[str, Any],
                config: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward, backward and (on accumulation boundaries) an optimizer step; returns detached outputs."""
    images = augment.normalize(batch["image"].to(accelerator.device, non_blocking=True))
    labels = batch["label"].to(accelerator.device, non_blocking=True)
    with accelerator.accumulate(model):
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
        accelerator.backward(loss)
        if accelerator.sync_gradients and config.clip_grad:
            accelerator.clip_grad_norm_(model.parameters(), config.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return logits.detach(), labels, loss.detach()


MOST_INCORRECT = 16  # wrong predictions kept with their images, per process, for most_incorrect.png


class _Collector:
    """Per-sample records of one process (features as float16: bounded memory) and its most confident
    wrong predictions with their uint8 images (at most MOST_INCORRECT)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.wrong: list[dict[str, Any]] = []

    def add(self, batch: dict[str, Any], labels: torch.Tensor, logits: torch.Tensor, features: torch.Tensor) -> None:
        conf, pred = logits.softmax(dim=1).max(dim=1)
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
             split: str, transform: augment.Augment, batch_size: int, workers: int,
             collect: bool = False) -> dict[str, Any]:
    """Loss / top-1 / top-5 over every sample of `split` exactly once across processes.

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
        images = augment.normalize(batch["image"].to(accelerator.device, non_blocking=True))
        labels = batch["label"].to(accelerator.device)
        with accelerator.autocast():
            features = net.forward_features(images)
            logits = net.fc(features).float()
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


def final_results(accelerator: Accelerator, model: torch.nn.Module, manifest: dict[str, Any], config: Config,
                  progress: Progress, run_dir: Path) -> dict[str, Any]:
    """Load the best model into every process, evaluate it on test, write results.json, then the test
    report (metrics.json, predictions.csv, PNGs) into run_dir/report/."""
    state, _ = checkpoint.load_best(run_dir)
    accelerator.unwrap_model(model).load_state_dict(state)
    test = evaluate(accelerator, model, config.shards, manifest, "test", eval_transform(config),
                    config.eval_batch_size or config.batch_size, config.workers, collect=True)
    results = {"test": _public(test), "valid": _public(progress.best_valid), "best_epoch": progress.best_epoch}
    if accelerator.is_main_process:
        write_json_atomic(run_dir / "results.json", results)
    accelerator.print(f"test (best epoch {progress.best_epoch}): top1 {test['top1']:.4f} top5 {test['top5']:.4f} "
                      f"loss {test['loss']:.4f} on {test['num_samples']} images; results in {run_dir}/results.json")
    write_evaluation_report(accelerator, test, manifest["classes"], run_dir / "report", "test", progress.global_step)
    return results


def write_evaluation_report(accelerator: Accelerator, result: dict[str, Any], classes: list[str], out: Path,
                            title: str, step: int) -> None:
    """The report of an `evaluate(..., collect=True)` result, by the main process; its PNGs and predictions
    table also go to W&B when the accelerator has that tracker."""
    if not accelerator.is_main_process:
        return
    from train import report

    report.write_report(out, result, result["records"], result["wrong"], classes, title)
    if any(tracker.name == "wandb" for tracker in accelerator.trackers):
        run = accelerator.get_tracker("wandb", unwrap=True)
        run.log(report.wandb_payload(out, result["records"], classes, f"report/{title}"), step=step)
    accelerator.print(f"{title} report: {out}/ (metrics.json, predictions.csv, {', '.join(report.PLOTS)})")


def lr_find(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, manifest: dict[str, Any],
            config: Config) -> lr_finder.RangeTest:
    """The LR range test (config.lr_find_*) with fit's data stream, train step (precision, accumulation,
    clipping) and param groups; model, optimizer, gradient scaler and accumulation counter are restored."""
    # fit's train batches (same augmentation, order, rank split) from epoch 0, enough for every step
    epochs = -(-config.lr_find_steps * config.grad_accum // batches_per_epoch(accelerator, manifest, config))
    stream = train_batches(accelerator, manifest, config, 0, start_batch=0, epochs=epochs)

    def step() -> float:
        total = torch.zeros((), device=accelerator.device)
        for _ in range(config.grad_accum):
            total += _train_step(accelerator, model, optimizer, next(stream), config)[2]
        return accelerator.reduce(total / config.grad_accum, "mean").item()  # the same on every process

    saved_step = accelerator.step
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    model.train()
    try:
        return lr_finder.range_test(step, accelerator.unwrap_model(model), optimizer,
                                    start_lr=config.lr_find_start, end_lr=config.lr_find_end,
                                    steps=config.lr_find_steps)
    finally:
        stream.close()
        accelerator.step = saved_step
        if scaler is not None:
            accelerator.scaler.load_state_dict(scaler)


def choose_lr(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, manifest: dict[str, Any],
              config: Config, run_dir: Path) -> float:
    """`--lr auto`: run the range test, scale every group to its suggestion, record it (run_dir/lr_find/,
    config.yaml)."""
    result = lr_find(accelerator, model, optimizer, manifest, config)
    lr_finder.set_lr(optimizer, result.suggested_lr, lr_finder.relative_lrs(optimizer))
    config.lr = result.suggested_lr
    if accelerator.is_main_process:
        from train import report

        report.write_lr_find(run_dir / "lr_find", result)
        save_config(config, run_dir / "config.yaml")
    accelerator.print(f"--lr auto: lr-find suggests {result.suggested_lr:.3g} (plot in {run_dir}/lr_find/)")
    return result.suggested_lr


def _public(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in ("top1", "top5", "loss", "num_samples") if k in metrics}
