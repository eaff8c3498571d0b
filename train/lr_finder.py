"""The LR range test of the classic CUB notebook (Smith 2015, as in fastai / torch-lr-finder).

The LR grows exponentially from `start_lr` to `end_lr` over `steps` optimizer steps; each step trains on
one batch at that LR. The loss is smoothed as torch-lr-finder does (smoothing 0.05: smoothed = 0.05 * loss +
0.95 * previous smoothed, starting from the first loss) and the test stops early once the smoothed loss
exceeds 5x the best one seen, or is not finite (divergence).

The LR set at each step is that of the fc group; the other discriminative groups keep their ratio to it
(whatever LRs the optimizer was built with, relative to its largest group LR).

Suggested LR: the point of steepest descent of the smoothed loss against log(LR) (the LRs are evenly spaced
in log LR, so: the most negative `numpy.gradient` of the smoothed losses), searched from the end of the
first 10% of the points (at most 10: their slopes are mostly noise) up to the lowest loss (beyond it the
loss rises). It lies below the LR of the lowest loss, where training is still fast and stable. With no
descent at all (the lowest loss in the first 10%), the LR of the lowest loss.

The model and optimizer are restored afterwards: their state dicts are deep-copied before and loaded after.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import UserError

SKIP_START = 10
MIN_STEPS = 3  # a slope needs 3 points


@dataclass
class RangeTest:
    lrs: list[float]  # the fc group's LR at each completed step
    losses: list[float]  # smoothed losses (bias-free EMA), one per LR
    suggested_lr: float
    suggested_index: int
    diverged: bool  # stopped early (loss > diverge x best, or not finite)

    def as_json(self) -> dict[str, object]:
        return {"suggested_lr": self.suggested_lr, "lrs": self.lrs, "losses": self.losses}


def exponential_lrs(start_lr: float, end_lr: float, steps: int) -> list[float]:
    """`steps` LRs from start_lr to end_lr (both included), evenly spaced on a log scale."""
    if not 0 < start_lr < end_lr:
        raise UserError(f"the LR sweep needs 0 < --start-lr < --end-lr, got {start_lr} and {end_lr}")
    if steps < MIN_STEPS:
        raise UserError(f"--steps must be >= {MIN_STEPS}, got {steps}")
    ratio = end_lr / start_lr
    return [start_lr * ratio ** (i / (steps - 1)) for i in range(steps)]


def relative_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each param group's LR as a fraction of the largest one (the fc group's, for our schemes)."""
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
                                "check --pretrained weights and the data, or lower --start-lr")
            return lrs, losses, True
        smoothed = smoothing * loss + (1 - smoothing) * losses[-1] if losses else loss
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > diverge * best:
            return lrs, losses, True
    return lrs, losses, False


def steepest_descent(losses: list[float]) -> int:
    """Index of the most negative slope of `losses` (evenly spaced in log LR); see the module docstring."""
    if len(losses) < 3:
        raise UserError(f"lr-find: the loss diverged after {len(losses)} step(s), too few to suggest an LR; "
                        "lower --start-lr or --end-lr")
    lowest = int(np.argmin(losses))
    start = min(SKIP_START, len(losses) // 10)
    if lowest - start < 1:
        return lowest
    slopes = np.gradient(np.asarray(losses[start:lowest + 1], dtype=np.float64))
    return start + int(np.argmin(slopes))
