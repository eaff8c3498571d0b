"""The LR range test of the classic CUB notebook (Smith 2015, as in fastai / torch-lr-finder).

The LR grows exponentially from `start_lr` to `end_lr` over `steps` optimizer steps; each step trains on
one batch at that LR. The loss is smoothed as torch-lr-finder does (smoothing 0.05: smoothed = 0.05 * loss +
0.95 * previous smoothed, starting from the first loss) and the test stops early once the smoothed loss
exceeds 5x the best one seen, or is not finite (divergence).

The LR set at each step is that of the head group (fc for a ResNet); the other discriminative groups keep
their ratio to it (whatever LRs the optimizer was built with, relative to its largest group LR).

Suggested LR: the point of steepest descent of the smoothed loss against log(LR) (the LRs are evenly spaced
in log LR, so: the most negative `numpy.gradient` of the smoothed losses), searched from the end of the
first 10% of the points (at most 10: their slopes are mostly noise) up to the lowest loss (beyond it the
loss rises). It lies below the LR of the lowest loss, where training is still fast and stable. Only where
the loss was measured falling: a step's loss is measured before it trains at its LR, so the last LR's
effect is never seen and it is never suggested, and a point whose slope is not negative is not either.
With no such point there is no suggestion: a one-line error. A sweep needs MIN_STEPS = 1 / smoothing = 20
steps: after n steps the smoothed loss still holds 0.95^n of the first loss (0.36 after 20), so a shorter
sweep shows mostly its first loss, not what the LRs did (3 steps used to "suggest" the end LR).

The model and optimizer are restored afterwards: their state dicts are deep-copied before and loaded after.

`lr_find` runs the test on fit's own model, param groups, data stream and train step (what `lr-find` and
`fit --lr auto` use); `choose_lr` is `--lr auto`'s choice from it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from pipeline.errors import UserError
from train import engine, fitrun
from train.config import Config
from train.data.trainstream import TrainStream
from train.lifecycle import batches_per_epoch, topology
from train.tracking import say
from train.validate import SWEEP_FLAGS

SKIP_START = 10
# The sweep's options by both their names (fit's --lr-find-*, lr-find's own), as errors name them.
START, END, STEPS = (SWEEP_FLAGS[name] for name in ("lr_find_start", "lr_find_end", "lr_find_steps"))
MIN_STEPS = 20  # the smoothing's memory (see above); the options' range says the same


@dataclass
class RangeTest:
    lrs: list[float]  # the head group's LR at each completed step
    losses: list[float]  # smoothed losses (bias-free EMA), one per LR
    suggested_lr: float
    suggested_index: int
    diverged: bool  # stopped early (loss > diverge x best, or not finite)

    def as_json(self) -> dict[str, object]:
        return {"suggested_lr": self.suggested_lr, "lrs": self.lrs, "losses": self.losses}


def exponential_lrs(start_lr: float, end_lr: float, steps: int) -> list[float]:
    """`steps` LRs from start_lr to end_lr (both included), evenly spaced on a log scale."""
    if not 0 < start_lr < end_lr:
        raise UserError(f"the LR sweep needs 0 < {START} < {END}, got {start_lr} and {end_lr}")
    if steps < MIN_STEPS:
        raise UserError(f"{STEPS} must be >= {MIN_STEPS}, got {steps}")
    ratio = end_lr / start_lr
    return [start_lr * ratio ** (i / (steps - 1)) for i in range(steps)]


def relative_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each param group's LR as a fraction of the largest one (the head group's, for our schemes)."""
    lrs = [float(group["lr"]) for group in optimizer.param_groups]
    top = max(lrs)
    return [lr / top for lr in lrs]


def set_lr(optimizer: torch.optim.Optimizer, lr: float, ratios: list[float]) -> None:
    for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
        group["lr"] = lr * ratio


def range_test(train_step: Callable[[], float], model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
               start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100, smoothing: float = 0.05,
               diverge: float = 5.0) -> RangeTest:
    """Run the sweep; `train_step()` does one optimizer step at the optimizer's current LRs and returns its
    loss (the same value on every process). Model and optimizer are left as they were."""
    schedule = exponential_lrs(start_lr, end_lr, steps)
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    try:
        lrs, losses, diverged = _sweep(train_step, optimizer, schedule, smoothing, diverge)
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
    index = steepest_descent(losses)
    return RangeTest(lrs, losses, lrs[index], index, diverged)


def _sweep(train_step: Callable[[], float], optimizer: torch.optim.Optimizer, schedule: list[float],
           smoothing: float, diverge: float) -> tuple[list[float], list[float], bool]:
    ratios = relative_lrs(optimizer)
    lrs: list[float] = []
    losses: list[float] = []
    best = math.inf
    for step, lr in enumerate(schedule):
        set_lr(optimizer, lr, ratios)
        loss = train_step()
        if not math.isfinite(loss):
            if step == 0:
                raise UserError(f"lr-find: the loss is {loss} from the first step (LR {lr:.3g}): nothing to plot; "
                                f"check --pretrained weights and the data, or lower {START}")
            return lrs, losses, True
        smoothed = smoothing * loss + (1 - smoothing) * losses[-1] if losses else loss
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > diverge * best:
            return lrs, losses, True
    return lrs, losses, False


def steepest_descent(losses: list[float]) -> int:
    """Index of the most negative slope of `losses` (evenly spaced in log LR) where the loss was measured
    falling; a one-line error when there is none. See the module docstring."""
    if len(losses) < 3:
        raise UserError(f"lr-find: the loss diverged after {len(losses)} step(s), too few to suggest an LR; "
                        f"lower {START} or {END}")
    slopes = np.gradient(np.asarray(losses, dtype=np.float64))
    start = min(SKIP_START, len(losses) // 10)
    last = min(int(np.argmin(losses)), len(losses) - 2)  # the last LR's effect is never measured
    falling = [i for i in range(start, last + 1) if slopes[i] < 0]
    if not falling:
        raise UserError(f"lr-find: the smoothed loss never fell over the {len(losses)} step(s) measured, so no LR "
                        f"can be suggested; lower {START} or run more {STEPS}")
    return min(falling, key=lambda i: slopes[i])


# ---------------------------------------------------------------- on fit's model, stream and train step


def lr_find(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, manifest: dict[str, Any],
            config: Config) -> RangeTest:
    """The LR range test (config.lr_find_*) with fit's data stream, train step (precision, accumulation,
    clipping) and param groups; model, optimizer, gradient scaler and accumulation counter are restored."""
    # fit's train batches (same augmentation, order, rank split) from epoch 0, enough for every step
    batches = batches_per_epoch(accelerator, manifest, config)
    epochs = -(-config.lr_find_steps * config.grad_accum // batches)
    # the loader does not cut epochs to whole optimizer steps here: the sweep reads every batch of each
    batch_by_batch = dataclasses.replace(topology(accelerator, config), grad_accum=1)
    stream = fitrun.open_stream(accelerator, manifest, config, TrainStream(batch_by_batch, batches), epochs)

    def step() -> float:
        total = torch.zeros((), device=accelerator.device)
        for _ in range(config.grad_accum):
            total += engine.train_step(accelerator, model, optimizer, next(stream), config)[2]
        return accelerator.reduce(total / config.grad_accum, "mean").item()  # the same on every process

    saved_step = accelerator.step
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    model.train()
    try:
        return range_test(step, accelerator.unwrap_model(model), optimizer, start_lr=config.lr_find_start,
                          end_lr=config.lr_find_end, steps=config.lr_find_steps)
    finally:
        stream.close()
        accelerator.step = saved_step
        if scaler is not None:
            accelerator.scaler.load_state_dict(scaler)


def choose_lr(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, manifest: dict[str, Any],
              config: Config, run_dir: Path) -> float:
    """`--lr auto`: run the range test, scale every group to its suggestion, record it in run_dir/lr_find/
    (config.yaml, with the chosen LR, is lifecycle.record_config's)."""
    result = lr_find(accelerator, model, optimizer, manifest, config)
    set_lr(optimizer, result.suggested_lr, relative_lrs(optimizer))
    if accelerator.is_main_process:
        from train import report

        report.write_lr_find(run_dir / "lr_find", result)
    say(accelerator, f"--lr auto: lr-find suggests {result.suggested_lr:.3g} (plot in {run_dir}/lr_find/)")
    return result.suggested_lr
