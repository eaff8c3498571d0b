"""The fit loop: epochs of train steps from one stream, validation and the best model at each epoch end,
checkpoints, and the stop a signal asks for, taken at the same step in every process."""

from __future__ import annotations

import itertools
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from pipeline.errors import UserError
from train import augment, checkpoint, ema, fitrun, keylog, stopping, tracking
from train.config import Config
from train.evaluation import eval_transform, evaluate, final_results, model_meta, norm_stats, replaces_best
from train.fitrun import FitRun
from train.metrics import Totals, format_metric
from train.model import build_model, group_names
from train.optim import build_optimizer, group_lrs, lr_multipliers, param_groups, resolve_scheme
from train.tracking import say


def build_model_and_optimizer(accelerator: Accelerator, config: Config,
                              manifest: dict[str, Any]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and its discriminative param groups; with --lr auto (or for lr-find) the fc group's LR is 1
    and the others their multiplier, to be scaled once the LR is known."""
    with accelerator.main_process_first():
        model = build_model(config.arch, len(manifest["classes"]), config.pretrained, config.image_size)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    base_lr = 1.0 if config.lr == "auto" else config.lr
    scheme = resolve_scheme(config.lr_scheme, config.pretrained)
    multipliers = lr_multipliers(scheme, config.lr_decay, group_names(model))
    groups = param_groups(model, base_lr, config.weight_decay, multipliers)
    return model, build_optimizer(config.optimizer, groups, base_lr, momentum=config.momentum)


def prepared_model(accelerator: Accelerator, config: Config,
                   manifest: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """fit's seeded model and optimizer (compiled with --compile), prepared by the accelerator."""
    set_seed(config.seed)
    model, optimizer = build_model_and_optimizer(accelerator, config, manifest)
    if config.compile:
        model = torch.compile(model)
    return accelerator.prepare(model, optimizer)


def train(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, config: Config,
          manifest: dict[str, Any], start: dict[str, Any], steps_per_epoch: int) -> dict[str, Any]:
    """The epochs from `start` (lifecycle.begin) on, then the best model's test (results.json, report)."""
    run = fitrun.start(accelerator, model, optimizer, config, manifest, start, steps_per_epoch)
    if start["renew_best"]:
        renew_best(run)
    tracking.start_run_tracker(accelerator, config, start["wandb_id"])

    if manifest["splits"]["valid"]["num_samples"] == 0:
        say(accelerator, "note: the shard set has no valid samples: each epoch's model replaces the best one, "
                         "so the last epoch is the one evaluated on test")
    stream = fitrun.open_stream(accelerator, manifest, config, run.stream,
                                epochs=max(config.epochs - run.stream.epoch, 1))  # workers start on the first batch
    try:
        for _ in range(stream.epoch, config.epochs):
            _train_and_validate(run)
            signum = agreed_stop(accelerator)
            if signum:  # the epoch-end checkpoint just written is the one to resume from
                _stop(run, signum, checkpoint.checkpoints_dir(run.run_dir) / f"step-{run.progress.global_step:08d}")
    finally:
        stream.close()
    if run.progress.best_epoch < 1:
        raise UserError(f"no epoch of {run.run_dir} gave a finite validation loss, so there is no best model to test")

    results = final_results(accelerator, model, manifest, config, run.progress, run.run_dir)
    run.log.write({"kind": "test", "step": run.progress.global_step, "test": results["test"]})
    accelerator.end_training()
    return results


def _train_and_validate(run: FitRun) -> None:
    """The rest of the stream's epoch, its validation, the best model and the epoch-end checkpoint."""
    accelerator, config, progress, epoch = run.accelerator, run.config, run.progress, run.stream.epoch
    train_metrics = train_epoch(run)
    require_finite_weights(run, epoch)
    entries = validate(run, epoch + 1)
    valid = entries["valid"]
    run.log.write({"kind": "epoch", "step": progress.global_step, "epoch": epoch + 1, "train": train_metrics,
                   **entries, "best_epoch": progress.best_epoch})
    which = f" ({entries['valid_weights']} weights)" if run.averaged is not None else ""
    say(accelerator, f"epoch {epoch + 1}/{config.epochs}: train loss {format_metric(train_metrics['loss'])} "
                     f"top1 {format_metric(train_metrics['top1'], '.3f')} | valid{which} loss "
                     f"{format_metric(valid['loss'])} top1 {format_metric(valid['top1'], '.3f')} "
                     f"top5 {format_metric(valid['top5'], '.3f')}")
    # the stream is at the next epoch's start now; its sums start from zero
    checkpoint.save_checkpoint(accelerator, run.run_dir, run.trainer_state(Totals()), config.keep_checkpoints)


def validate(run: FitRun, epoch: int) -> dict[str, Any]:
    """The valid metrics of the model (epoch `epoch`, counted from 1) and of its EMA (when the run keeps
    one), as ema.valid_entries: the weights with the lower valid loss count, and become the best model
    when they beat the best so far (meta.json says which: "weights")."""
    accelerator, config, progress = run.accelerator, run.config, run.progress
    nets = {ema.RAW: run.model} if run.averaged is None else {ema.RAW: run.model, ema.EMA: run.averaged.module}
    scored = {name: evaluate(accelerator, net, config.shards, run.manifest, "valid", eval_transform(config),
                             norm_stats(config), config.eval_batch_size or config.batch_size, config.workers,
                             tta=config.tta)
              for name, net in nets.items()}
    weights = ema.winner(scored)
    valid = scored[weights]
    if replaces_best(valid, progress):
        progress.best_loss, progress.best_epoch, progress.best_valid = valid["loss"], epoch, valid
        checkpoint.save_best(accelerator, run.run_dir, accelerator.unwrap_model(nets[weights]), {
            **model_meta(config, run.manifest), "epoch": epoch, "valid": valid, "weights": weights})
    return ema.valid_entries(scored, weights)


def renew_best(run: FitRun) -> None:
    """After a resume whose best model is missing or damaged (lifecycle says so): the best is chosen again
    from what there is, the resumed model when it ended an epoch, else the epochs still to train."""
    progress, stream = run.progress, run.stream
    progress.best_loss, progress.best_epoch, progress.best_valid = math.inf, -1, {}
    if stream.step_in_epoch == 0 and stream.epoch >= 1:
        validate(run, stream.epoch)


def require_finite_weights(run: FitRun, epoch: int) -> None:
    """Stop (one line, every process) instead of saving weights or statistics that hold NaN or inf (in epoch
    `epoch`, counted from 0)."""
    accelerator = run.accelerator
    tensors = [t for t in accelerator.unwrap_model(run.model).state_dict().values() if t.is_floating_point()]
    bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).sum().float()
    if accelerator.reduce(bad, "sum").item():
        raise UserError(f"training diverged: the weights hold NaN or inf after step {run.progress.global_step} "
                        f"(epoch {epoch + 1}), though the loss was finite; {_kept(run.run_dir)}; train again "
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


def train_epoch(run: FitRun) -> dict[str, Any]:
    """The rest of the stream's epoch (all of it but after a mid-epoch resume); returns exact train metrics
    over all ranks. The EMA of the weights, when the run keeps one, is updated after every optimizer step."""
    accelerator, model, config, progress, stream = run.accelerator, run.model, run.config, run.progress, run.stream
    epoch, step, steps_per_epoch = stream.epoch, stream.step_in_epoch, run.steps_per_epoch
    totals = run.epoch_totals()  # with what the ranks summed before the checkpoint resumed from
    model.train()
    throughput = Throughput()
    rank_batches = 0  # batches this rank ran; gathered at the end, so a user sees every rank took the same
    with tqdm(total=steps_per_epoch, initial=step, desc=f"epoch {epoch + 1}/{config.epochs}",
              disable=not accelerator.is_main_process, dynamic_ncols=True) as bar, \
            keylog.KeyLog(accelerator.process_index) as consumed:
        for batch in throughput.timed(itertools.islice(stream, (steps_per_epoch - step) * config.grad_accum)):
            consumed.write(epoch + 1, progress.global_step + 1, batch["key"])
            logits, labels, loss = train_step(accelerator, model, run.optimizer, batch, config)
            totals.add(logits, labels, loss * labels.numel())
            totals.bad += batch["bad"]
            throughput.images += labels.numel()
            rank_batches += 1
            if not accelerator.sync_gradients:
                continue
            lrs = group_lrs(run.optimizer)  # the LR this step used (read before stepping the schedule)
            run.scheduler.step()
            progress.global_step += 1
            step += 1
            if run.averaged is not None:
                ema.update(accelerator, run.averaged, model, progress.global_step)
            step_loss = accelerator.reduce(loss, "mean").item()  # the same in every process
            if not math.isfinite(step_loss):
                raise UserError(f"training diverged: the loss is {step_loss} at step {progress.global_step} "
                                f"(epoch {epoch + 1}, LR {_lr_text(lrs)}); {_kept(run.run_dir)}; train again with a "
                                "lower --lr or with --clip-grad, in another --run-dir")
            img_per_s, wait = throughput.rates(accelerator.num_processes)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", img_s=f"{img_per_s:.0f}", wait=f"{wait:.0%}")
            if progress.global_step % config.log_every == 0 or step == steps_per_epoch:
                run.log.write({"kind": "step", "step": progress.global_step, "epoch": epoch + 1, "loss": step_loss,
                               "lr": lrs, "img_per_s": img_per_s, "data_wait": wait})
            if step == steps_per_epoch:
                continue  # the epoch end saves (and a stop asked now is taken after it)
            saved = None
            if config.checkpoint_every and progress.global_step % config.checkpoint_every == 0:
                saved = _save_mid_epoch(run, totals)
            signum = agreed_stop(accelerator)
            if signum:
                _stop(run, signum, saved or _save_mid_epoch(run, totals))
    totals = totals.summed(lambda t: accelerator.reduce(t, "sum"))
    bad_total = int(totals.bad.item())
    if bad_total:
        say(accelerator, f"warning: {bad_total} corrupt sample(s) skipped in epoch {epoch + 1}")
    # Per process, in rank order: the batches it ran in this epoch (since the resume, after one).
    per_rank = accelerator.gather(torch.tensor([rank_batches], device=accelerator.device)).tolist()
    return {**totals.as_dict(), "bad_samples": bad_total, "rank_batches": per_rank}


def _save_mid_epoch(run: FitRun, totals: Totals) -> Path:
    """A checkpoint at this step of the epoch, with the train sums of the epoch so far (all ranks)."""
    summed = totals.summed(lambda t: run.accelerator.reduce(t, "sum"))
    require_finite_weights(run, run.stream.epoch)
    return checkpoint.save_checkpoint(run.accelerator, run.run_dir, run.trainer_state(summed),
                                      run.config.keep_checkpoints)


def agreed_stop(accelerator: Accelerator) -> int:
    """The stop signal any process of the run got (the highest number when several did; 0: none). Every
    process calls it at the same step, so all of them stop there; one process needs no collective."""
    if accelerator.num_processes == 1:
        return stopping.requested()
    flag = torch.tensor([stopping.requested()], device=accelerator.device)
    return int(accelerator.reduce(flag, "max").item())


def _stop(run: FitRun, signum: int, saved: Path) -> None:
    """After the stop checkpoint `saved`: trackers closed, and Stopped to end the command, carrying the line
    the main process prints once the progress bar is closed."""
    accelerator = run.accelerator
    line = (f"stopped by {signal.Signals(signum).name} at step {run.progress.global_step} (epoch {run.stream.epoch + 1}): "
            f"checkpoint {saved} written; rerun with --resume auto to continue")
    accelerator.end_training()
    raise stopping.Stopped(line if accelerator.is_main_process else "")


def _lr_text(lrs: dict[str, float]) -> str:
    """The head group's LR (the last group: fc for a ResNet)."""
    head = next(reversed(lrs))
    return f"{lrs[head]:.3g} for {head}"


def train_step(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, batch: dict[str, Any],
                config: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward, backward and (on accumulation boundaries) an optimizer step; returns detached outputs."""
    images = augment.normalize(batch["image"].to(accelerator.device, non_blocking=True), *norm_stats(config))
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
