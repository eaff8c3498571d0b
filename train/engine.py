"""fit and evaluate loops: Accelerate for devices and processes, our loaders for data, exact metrics."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import sys
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
from pipeline.manifest import load_manifest, write_atomic, write_json_atomic
from train import augment, checkpoint, data, lr_finder, rundir, stopping
from train.config import Config, to_dict
from train.config import save as save_config
from train.metrics import Totals, format_metric, predictions
from train.model import build_model
from train.optim import build_optimizer, build_scheduler, group_lrs, lr_multipliers, param_groups, reschedule


def say(accelerator: Accelerator, text: str) -> None:
    """Print on the main process only: `accelerator.print` prints on every node's local main process, so a
    multi-node run would print each line once per node."""
    if accelerator.is_main_process:
        print(text, flush=True)


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
        cpu=not torch.cuda.is_available(),  # several CPU processes need cpu=True
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
    steps_per_epoch: int = 0  # optimizer steps of a whole epoch in the run that saved it


# What trainer.json must hold to resume from it (steps_per_epoch is missing from older checkpoints).
TRAINER_KEYS = tuple(name for name in Progress.__dataclass_fields__ if name != "steps_per_epoch")


class MetricsLog:
    """metrics.jsonl (main process) + the W&B tracker through Accelerate; one record per step/epoch."""

    def __init__(self, accelerator: Accelerator, path: Path, resume_step: int | None) -> None:
        """A fresh run (`resume_step` None) starts an empty file; a resumed one keeps the step and epoch
        records up to the checkpoint's step (what the run will write again goes)."""
        self.accelerator, self.path = accelerator, path
        if accelerator.is_main_process:
            kept = kept_records(path, resume_step) if resume_step is not None else []
            write_atomic(path, "".join(json.dumps(record) + "\n" for record in kept).encode())

    def write(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log(_flatten(record), step=record["step"])


def kept_records(path: Path, step: int) -> list[dict[str, Any]]:
    """The records of metrics.jsonl to keep when resuming at `step`: step and epoch records up to it. A line
    that does not parse (the partial last line of a killed run) is dropped, and so is the test record of
    an earlier ending (a resumed run writes its own)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("kind") != "test" and _step(record) <= step:
            kept.append(record)
    return kept


def _step(record: dict[str, Any]) -> float:
    step = record.get("step", 0)
    return step if isinstance(step, int | float) else math.inf


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
    """Train, keep the best-by-valid-loss model, evaluate it on test, write results.json.

    The main process holds the run directory's lock for the whole run and makes every decision about how
    the run starts (fresh, or from which checkpoint); every process learns the outcome, so a refusal is the
    same one line everywhere and nothing is written before it."""
    with contextlib.ExitStack() as held:  # the lock and the stop-signal handlers, until fit returns or fails
        held.enter_context(stopping.installed(config.stop_signals, config.stop_grace))
        accelerator = make_accelerator(config)
        manifest = load_manifest(config.shards)
        steps_per_epoch = epoch_steps(accelerator, manifest, config)
        start = _on_main(accelerator, lambda: _claim_run_dir(held, config, manifest, steps_per_epoch,
                                                             accelerator.num_processes))
        config.lr = start["lr"]
        return _train(accelerator, config, manifest, start, steps_per_epoch)


def epoch_steps(accelerator: Accelerator, manifest: dict[str, Any], config: Config) -> int:
    """Optimizer steps per epoch (the same in every process)."""
    batches = batches_per_epoch(accelerator, manifest, config)
    if batches // config.grad_accum < 1:
        raise UserError(f"--grad-accum {config.grad_accum} exceeds the {batches} batches of an epoch")
    return batches // config.grad_accum


def _on_main(accelerator: Accelerator, decide: Any) -> dict[str, Any]:
    """Run `decide` in the main process only and hand its result (or its one-line error) to every process."""
    from accelerate.utils import broadcast_object_list

    outcome: dict[str, Any] = {}
    failure: BaseException | None = None
    if accelerator.is_main_process:
        try:
            outcome = decide()
        except UserError as e:
            outcome = {"error": str(e)}
        except BaseException as e:  # a bug: the main process shows its traceback, the others stop too
            outcome, failure = {"error": f"the main process failed ({type(e).__name__}: {e})"}, e
    outcome = broadcast_object_list([outcome])[0]
    if failure is not None:
        raise failure
    if "error" in outcome:
        raise UserError(outcome["error"])
    return outcome


def _claim_run_dir(held: contextlib.ExitStack, config: Config, manifest: dict[str, Any], steps_per_epoch: int,
                   world: int) -> dict[str, Any]:
    """Main process: lock the run directory (stale temporaries go), decide how the run starts, and write
    run.json and config.yaml (unless lr-find has still to choose the LR): all before any training."""
    run_dir = Path(config.run_dir)
    held.enter_context(rundir.locked(run_dir))
    rundir.resolve_auto_lr(config)
    start = rundir.resume_point(config, manifest, TRAINER_KEYS)
    for warning in start.skipped:
        print(warning, file=sys.stderr)
    remaining = config.epochs * steps_per_epoch
    if start.checkpoint is not None:
        remaining = _steps_left(start, config, steps_per_epoch, world)
    try:
        info = rundir.write_run_info(config, manifest, resuming=start.checkpoint is not None)
        if remaining > 0:  # results of an earlier ending would not describe this run
            (run_dir / "results.json").unlink(missing_ok=True)
        if config.lr != "auto":
            save_config(config, run_dir / "config.yaml")
        else:  # written once lr-find has chosen; until then no config of another run may stand here
            (run_dir / "config.yaml").unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {e.filename or run_dir}: {e.strerror or e}") from None
    return {"lr": config.lr, "checkpoint": start.checkpoint and str(start.checkpoint), "state": start.state,
            "wandb_id": info["wandb_id"]}


def _steps_left(start: rundir.Start, config: Config, steps_per_epoch: int, world: int) -> int:
    """Optimizer steps the resumed run has still to do; refuses a checkpoint this run cannot continue."""
    state, name = start.state, start.checkpoint
    if state["step_in_epoch"]:
        if (state["world_size"], state["workers"]) != (world, config.workers):
            raise UserError(f"{name} was saved mid-epoch with {state['world_size']} process(es) x "
                            f"{state['workers']} workers; resume with the same, or from an epoch-end checkpoint")
        if state.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
            raise UserError(f"{name} was saved mid-epoch with {state['steps_per_epoch']} steps per epoch, now "
                            f"{steps_per_epoch}; resume with the same shard set, or from an epoch-end checkpoint")
    remaining = (config.epochs - state["epoch"]) * steps_per_epoch - state["step_in_epoch"]
    if remaining < 0:
        least = state["epoch"] + (1 if state["step_in_epoch"] else 0)
        raise UserError(f"cannot resume {config.run_dir} with --epochs {config.epochs}: {name.name} is at step "
                        f"{state['global_step']}, in epoch {state['epoch'] + 1}; --epochs must be at least {least}")
    return remaining


def _train(accelerator: Accelerator, config: Config, manifest: dict[str, Any], start: dict[str, Any],
           steps_per_epoch: int) -> dict[str, Any]:
    run_dir = Path(config.run_dir)
    set_seed(config.seed)
    model, optimizer = build_model_and_optimizer(accelerator, config, manifest)
    if config.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if config.lr == "auto":
        config.lr = choose_lr(accelerator, model, optimizer, manifest, config, run_dir)
    scheduler = build_scheduler(optimizer.optimizer, config.epochs * steps_per_epoch, config.pct_start,
                                config.div_factor, config.final_div_factor)  # the unwrapped optimizer
    accelerator.register_for_checkpointing(scheduler)  # stepped by us once per optimizer step, never prepared

    progress = Progress(world_size=accelerator.num_processes, workers=config.workers,
                        steps_per_epoch=steps_per_epoch)
    if start["checkpoint"] is not None:
        progress = _resume(accelerator, Path(start["checkpoint"]), start["state"], scheduler, config,
                           steps_per_epoch)
    log = MetricsLog(accelerator, run_dir / "metrics.jsonl", progress.global_step if start["checkpoint"] else None)
    if accelerator.log_with:
        accelerator.init_trackers(config.wandb_project, config=to_dict(config), init_kwargs={"wandb": {
            "dir": str(run_dir), "mode": wandb_mode(config.wandb), "name": run_dir.name,
            "id": start["wandb_id"], "resume": "allow"}})

    if manifest["splits"]["valid"]["num_samples"] == 0:
        say(accelerator, "note: the shard set has no valid samples: each epoch's model replaces the best one, "
                         "so the last epoch is the one evaluated on test")
    stream = train_batches(accelerator, manifest, config, progress.epoch,
                           start_batch=progress.step_in_epoch * config.grad_accum,
                           epochs=max(config.epochs - progress.epoch, 1))  # workers start on the first batch
    try:
        for epoch in range(progress.epoch, config.epochs):
            progress.epoch = epoch
            _train_and_validate(accelerator, model, optimizer, scheduler, stream, config, manifest, progress,
                                steps_per_epoch, log)
            signum = agreed_stop(accelerator)
            if signum:  # the epoch-end checkpoint just written is the one to resume from
                _stop(accelerator, signum, progress,
                      checkpoint.checkpoints_dir(run_dir) / f"step-{progress.global_step:08d}")
    finally:
        stream.close()
    if progress.best_epoch < 1:
        raise UserError(f"no epoch of {run_dir} gave a finite validation loss, so there is no best model to test")

    results = final_results(accelerator, model, manifest, config, progress, run_dir)
    log.write({"kind": "test", "step": progress.global_step, "test": results["test"]})
    accelerator.end_training()
    return results


def _resume(accelerator: Accelerator, where: Path, state: dict[str, Any], scheduler: Any, config: Config,
            steps_per_epoch: int) -> Progress:
    """Load a checkpoint into every process; a run whose length changed (--epochs, or steps per epoch) gets
    its LR schedule rebuilt to end at its new last step, continuous at this one."""
    accelerator.load_state(str(where))
    progress = Progress(**{key: value for key, value in state.items() if key in Progress.__dataclass_fields__})
    progress.world_size, progress.workers = accelerator.num_processes, config.workers
    progress.steps_per_epoch = steps_per_epoch
    say(accelerator, f"resuming {config.run_dir} from {where.name} (epoch {progress.epoch + 1}, "
                     f"step {progress.global_step})")
    total = progress.global_step + (config.epochs - progress.epoch) * steps_per_epoch - progress.step_in_epoch
    if total > progress.global_step and total != scheduler.total_steps:
        say(accelerator, f"the LR schedule now ends at step {total} instead of {scheduler.total_steps}, "
                         f"continuing from its LR at step {progress.global_step}")
        reschedule(scheduler, total)
    return progress


def _train_and_validate(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                        stream: Iterator[dict[str, Any]], config: Config, manifest: dict[str, Any],
                        progress: Progress, steps_per_epoch: int, log: MetricsLog) -> None:
    """The rest of epoch `progress.epoch`, its validation, the best model and the epoch-end checkpoint."""
    run_dir, epoch = Path(config.run_dir), progress.epoch
    train_metrics = train_epoch(accelerator, model, optimizer, scheduler, stream, config, progress,
                                steps_per_epoch, log, run_dir)
    require_finite_weights(accelerator, model, progress, run_dir)
    valid = evaluate(accelerator, model, config.shards, manifest, "valid", eval_transform(config),
                     config.eval_batch_size or config.batch_size, config.workers)
    if replaces_best(valid, progress):
        progress.best_loss, progress.best_epoch, progress.best_valid = valid["loss"], epoch + 1, valid
        checkpoint.save_best(accelerator, run_dir, accelerator.unwrap_model(model), {
            **model_meta(config, manifest), "epoch": epoch + 1, "valid": valid})
    log.write({"kind": "epoch", "step": progress.global_step, "epoch": epoch + 1, "train": train_metrics,
               "valid": valid, "best_epoch": progress.best_epoch})
    say(accelerator, f"epoch {epoch + 1}/{config.epochs}: train loss {format_metric(train_metrics['loss'])} "
                     f"top1 {format_metric(train_metrics['top1'], '.3f')} | valid loss "
                     f"{format_metric(valid['loss'])} top1 {format_metric(valid['top1'], '.3f')} "
                     f"top5 {format_metric(valid['top5'], '.3f')}")
    progress.epoch, progress.step_in_epoch = epoch + 1, 0
    progress.partial, progress.partial_bad = [0.0] * 4, 0
    checkpoint.save_checkpoint(accelerator, run_dir, progress.__dict__, config.keep_checkpoints)


def require_finite_weights(accelerator: Accelerator, model: torch.nn.Module, progress: Progress,
                           run_dir: Path) -> None:
    """Stop (one line, every process) instead of saving weights or statistics that hold NaN or inf."""
    tensors = [t for t in accelerator.unwrap_model(model).state_dict().values() if t.is_floating_point()]
    bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).sum().float()
    if accelerator.reduce(bad, "sum").item():
        raise UserError(f"training diverged: the weights hold NaN or inf after step {progress.global_step} "
                        f"(epoch {progress.epoch + 1}), though the loss was finite; {_kept(run_dir)}; train again "
                        "with a lower --lr or with --clip-grad, in another --run-dir")


def _kept(run_dir: Path) -> str:
    """What a stopped run leaves to go back to."""
    newest = checkpoint.complete_checkpoints(run_dir)
    return (f"nothing was saved from that step on; the last good checkpoint is {newest[-1]}" if newest
            else "nothing was saved; no checkpoint was written before")


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
            step_loss = accelerator.reduce(loss, "mean").item()  # the same in every process
            if not math.isfinite(step_loss):
                raise UserError(f"training diverged: the loss is {step_loss} at step {progress.global_step} "
                                f"(epoch {epoch + 1}, LR {_lr_text(lrs)}); {_kept(run_dir)}; train again with a lower "
                                "--lr or with --clip-grad, in another --run-dir")
            img_per_s, wait = throughput.rates(accelerator.num_processes)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", img_s=f"{img_per_s:.0f}", wait=f"{wait:.0%}")
            if progress.global_step % config.log_every == 0 or progress.step_in_epoch == steps_per_epoch:
                log.write({"kind": "step", "step": progress.global_step, "epoch": epoch + 1, "loss": step_loss,
                           "lr": lrs, "img_per_s": img_per_s, "data_wait": wait})
            if progress.step_in_epoch == steps_per_epoch:
                continue  # the epoch end saves (and a stop asked now is taken after it)
            saved = None
            if config.checkpoint_every and progress.global_step % config.checkpoint_every == 0:
                saved = _save_mid_epoch(accelerator, model, config, progress, totals, bad, run_dir)
            signum = agreed_stop(accelerator)
            if signum:
                saved = saved or _save_mid_epoch(accelerator, model, config, progress, totals, bad, run_dir)
                _stop(accelerator, signum, progress, saved)
    totals.sums = accelerator.reduce(totals.sums, "sum")
    bad_total = int(accelerator.reduce(bad, "sum").item())
    if bad_total:
        say(accelerator, f"warning: {bad_total} corrupt sample(s) skipped in epoch {epoch + 1}")
    # Per process, in rank order: the batches it ran in this epoch (since the resume, after one).
    per_rank = accelerator.gather(torch.tensor([rank_batches], device=accelerator.device)).tolist()
    return {**totals.as_dict(), "bad_samples": bad_total, "rank_batches": per_rank}


def _save_mid_epoch(accelerator: Accelerator, model: torch.nn.Module, config: Config, progress: Progress,
                    totals: Totals, bad: torch.Tensor, run_dir: Path) -> Path:
    """A checkpoint at this step of the epoch, with the train sums of the epoch so far (all ranks)."""
    progress.partial = accelerator.reduce(totals.sums.clone(), "sum").tolist()
    progress.partial_bad = int(accelerator.reduce(bad.clone(), "sum").item())
    require_finite_weights(accelerator, model, progress, run_dir)
    return checkpoint.save_checkpoint(accelerator, run_dir, progress.__dict__, config.keep_checkpoints)


def agreed_stop(accelerator: Accelerator) -> int:
    """The stop signal any process of the run got (the highest number when several did; 0: none). Every
    process calls it at the same step, so all of them stop there; one process needs no collective."""
    if accelerator.num_processes == 1:
        return stopping.requested()
    flag = torch.tensor([stopping.requested()], device=accelerator.device)
    return int(accelerator.reduce(flag, "max").item())


def _stop(accelerator: Accelerator, signum: int, progress: Progress, saved: Path) -> None:
    """After the stop checkpoint `saved`: trackers closed, and Stopped to end the command, carrying the line
    the main process prints once the progress bar is closed."""
    line = (f"stopped by {signal.Signals(signum).name} at step {progress.global_step} (epoch {progress.epoch + 1}): "
            f"checkpoint {saved} written; rerun with --resume auto to continue")
    accelerator.end_training()
    raise stopping.Stopped(line if accelerator.is_main_process else "")


def _lr_text(lrs: dict[str, float]) -> str:
    """The fc group's LR, or every group's when there is no fc group."""
    return f"{lrs['fc']:.3g} for fc" if "fc" in lrs else ", ".join(f"{k} {v:.3g}" for k, v in lrs.items())


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
    state, _ = checkpoint.load_best(run_dir)
    accelerator.unwrap_model(model).load_state_dict(state)
    test = evaluate(accelerator, model, config.shards, manifest, "test", eval_transform(config),
                    config.eval_batch_size or config.batch_size, config.workers, collect=True)
    results = {"test": _public(test), "valid": _public(progress.best_valid), "best_epoch": progress.best_epoch}
    if accelerator.is_main_process:
        write_json_atomic(run_dir / "results.json", results)
    if test["num_samples"] == 0:
        why = f"all {test['bad_samples']} of its samples are corrupt" if test["bad_samples"] else "it is empty"
        say(accelerator, f"test (best epoch {progress.best_epoch}): no score, the test split has no readable "
                         f"sample ({why}); no test report; results in {run_dir}/results.json")
        return results
    say(accelerator, f"test (best epoch {progress.best_epoch}): top1 {test['top1']:.4f} top5 {test['top5']:.4f} "
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
    say(accelerator, f"{title} report: {out}/ (metrics.json, predictions.csv, {', '.join(report.PLOTS)})")


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
    say(accelerator, f"--lr auto: lr-find suggests {result.suggested_lr:.3g} (plot in {run_dir}/lr_find/)")
    return result.suggested_lr


def _public(metrics: dict[str, Any]) -> dict[str, Any]:
    """top1, top5, loss (null with no sample) and num_samples; a split never scored counts 0 samples."""
    return {"top1": metrics.get("top1"), "top5": metrics.get("top5"), "loss": metrics.get("loss"),
            "num_samples": metrics.get("num_samples", 0)}
