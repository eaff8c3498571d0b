"""Discriminative learning rates per model group and a one-cycle schedule, as in the classic CUB notebook.

Parameters are grouped into the model's stem, stages in depth order and head (train.groups), each group with
its own LR (base_lr * multiplier), and split again into decay / no-decay: norm-layer parameters, biases
(every 1-D parameter) and embeddings (position embeddings, class tokens, relative position tables: what the
model's source names, train.archs) get no weight decay.

Warm-up is the one-cycle's rising phase: the LR climbs from max/div_factor to its peak over the first
pct_start of the optimizer steps (build_scheduler), so there is no separate warm-up option.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.errors import UserError
from train.groups import RESNET_GROUPS
from train.model import assign, no_decay_names

NO_DECAY_SUFFIX = "/no_decay"

# LR schemes: the multiplier of the group `depth` groups below the head (the head is depth 0), given
# lr_decay. notebook: the head 1, then 1/2, 1/4, 1/6, ... (a ResNet: fc 1, layer4 /2, layer3 /4, layer2 /6,
# layer1 /8, stem /10, the notebook's exact values); geometric: lr_decay per group; flat: one LR.
SCHEMES: dict[str, Callable[[int, float], float]] = {
    "notebook": lambda depth, decay: 1.0 / (2 * depth) if depth else 1.0,
    "geometric": lambda depth, decay: decay**depth,
    "flat": lambda depth, decay: 1.0,
}
# "auto": the notebook's discriminative LRs when fine-tuning pretrained weights; one LR for every group when
# training from scratch, where lower LRs for the early layers only slow them down (bench/recipe.py measures it).
AUTO = "auto"
# Optimizers: "adam" (the notebook's; L2 weight decay), "adamw" (decoupled decay), "sgd" (Nesterov momentum;
# plain SGD with momentum 0). All step with torch's fused kernels (CPU and CUDA): one kernel per parameter
# group instead of a few per tensor, 2.5-4.5x faster steps on a CPU core (ResNet-50: AdamW 102 -> 22 ms).
OPTIMIZERS: dict[str, Callable[[list[dict], float, float, tuple[float, float]], torch.optim.Optimizer]] = {
    "adam": lambda groups, lr, momentum, betas: torch.optim.Adam(groups, lr=lr, betas=betas, fused=True),
    "adamw": lambda groups, lr, momentum, betas: torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True),
    "sgd": lambda groups, lr, momentum, betas: torch.optim.SGD(groups, lr=lr, momentum=momentum,
                                                                 nesterov=momentum > 0, fused=True),
}

_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def resolve_scheme(scheme: str, pretrained: str) -> str:
    """The LR scheme a run uses: `scheme`, or for AUTO the one that fits its start (`pretrained` "none": flat)."""
    if scheme != AUTO:
        return scheme
    return "flat" if pretrained == "none" else "notebook"


def lr_multipliers(scheme: str = "notebook", decay: float = 0.5,
                   groups: tuple[str, ...] | list[str] = RESNET_GROUPS) -> dict[str, float]:
    """LR multiplier per group; `groups` in depth order, stem first, head last (see SCHEMES)."""
    if scheme not in SCHEMES:
        raise UserError(f"unknown LR scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    if scheme == "geometric" and not 0.0 < decay <= 1.0:
        raise UserError(f"geometric LR decay must be in (0, 1], got {decay}")
    last = len(groups) - 1
    return {group: SCHEMES[scheme](last - index, decay) for index, group in enumerate(groups)}


def _norm_param_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES) or type(module).__name__ == "LayerNorm2d":
            for param_name, _ in module.named_parameters(recurse=False):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def param_groups(
    model: nn.Module, base_lr: float, weight_decay: float, multipliers: dict[str, float]
) -> list[dict]:
    """Optimizer param groups: one per (model group, decay / no-decay) in depth order, empty ones skipped.

    Frozen parameters (requires_grad False) are left out; every trainable parameter is in exactly one group.
    """
    owner = assign(model)
    missing = sorted({g for g in owner.values() if g not in multipliers})
    if missing:
        raise UserError(f"LR multipliers missing for groups: {', '.join(missing)}")
    exempt = _norm_param_names(model) | no_decay_names(model)
    buckets: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name in exempt
        key = owner[name] + (NO_DECAY_SUFFIX if no_decay else "")
        buckets.setdefault(key, []).append(param)
    groups = []
    for group in multipliers:
        lr = base_lr * multipliers[group]
        for key, decay in ((group, weight_decay), (group + NO_DECAY_SUFFIX, 0.0)):
            if buckets.get(key):
                groups.append({"params": buckets[key], "lr": lr, "weight_decay": decay, "name": key})
    return groups


def build_optimizer(
    name: str,
    groups: list[dict],
    lr: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """One of OPTIMIZERS. `lr` is only the default for groups that carry no "lr" of their own."""
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    optimizer = OPTIMIZERS[name](groups, lr, momentum, betas)
    optimizer.register_load_state_dict_post_hook(_keep_fused)
    return optimizer


def _keep_fused(optimizer: torch.optim.Optimizer) -> None:
    """A loaded state replaces each group's settings with the saved ones, "fused" included: a checkpoint of
    an unfused optimizer would turn the kernels off, and with fp16 loss scaling the optimizer would then skip
    unscaling the gradients it was told it unscales. How to step stays this optimizer's choice."""
    for group in optimizer.param_groups:
        group["fused"] = optimizer.defaults["fused"]


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> torch.optim.lr_scheduler.OneCycleLR:
    """One-cycle schedule; each group peaks at its own LR (the "lr" it was built with).

    The LR starts at max/div_factor, rises (cosine) to max over pct_start of the steps, then anneals to
    max/(div_factor*final_div_factor). Momentum (SGD) / beta1 (Adam) cycles 0.95 -> 0.85 -> 0.95,
    overriding the momentum / betas[0] given to `build_optimizer` (as fastai's fit_one_cycle does); SGD
    built with momentum 0 stays plain SGD.

    The trainer must call `scheduler.step()` exactly once per optimizer step (not per micro-batch when
    accumulating gradients; skipped steps, e.g. fp16 overflow, still count) and must NOT pass the scheduler
    to `accelerator.prepare`: a prepared scheduler steps num_processes times per optimizer step, so
    OneCycleLR would overshoot or raise. Stepped by hand, the LR at every step is the same
    for 1 or N processes and with or without gradient accumulation; `total_steps` is then the number of
    optimizer steps of the whole run. Read LRs for logging before `scheduler.step()`: after the final
    step OneCycleLR reports a meaningless LR, and one optimizer step beyond total_steps raises ValueError.
    """
    if total_steps < 1:
        raise UserError(
            f"the one-cycle schedule needs at least 1 optimizer step, got total_steps={total_steps}"
        )
    if not 0.0 < pct_start < 1.0:
        raise UserError(f"pct_start must be in (0, 1), got {pct_start}")
    # A scheduler built earlier on this optimizer already lowered "lr" to max/div_factor and kept the
    # peak in "max_lr"; reading that first makes rebuilding (e.g. before loading a checkpoint) safe.
    max_lrs = [group.get("max_lr", group["lr"]) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=max_lrs,
        total_steps=int(total_steps),
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        cycle_momentum="betas" in optimizer.defaults or optimizer.defaults.get("momentum", 0) > 0,
    )


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current LR per discriminative group name (decay and no-decay halves share one LR), for logging."""
    lrs: dict[str, float] = {}
    for index, group in enumerate(optimizer.param_groups):
        name = group.get("name", f"group{index}").removesuffix(NO_DECAY_SUFFIX)
        lrs.setdefault(name, float(group["lr"]))
    return lrs


def reschedule(scheduler: torch.optim.lr_scheduler.OneCycleLR, total_steps: int) -> None:
    """Make a loaded one-cycle schedule end after `total_steps` optimizer steps instead (a resumed run whose
    length changed), continuous at the step it stands at.

    Rule: the LR (and momentum) at the current step stays what the old schedule gave there. A warm-up still
    running ends at the same absolute step as before (if that comes before the new last step) and the
    annealing after it ends at the new last step. Past the warm-up, the schedule anneals (cosine, as
    OneCycleLR does) from the current LR to the same final LR at the new last step, and the momentum from
    its current value back to its maximum. Applying it again after another change works the same way.
    """
    step = scheduler.last_epoch  # optimizer steps done; the LR now set is the schedule's value at `step`
    last = total_steps - 1  # the schedule position of the run's last optimizer step
    if total_steps <= step:
        raise ValueError(f"cannot end the schedule at step {total_steps}: it already stands at step {step}")
    phases = scheduler._schedule_phases
    running = [phase for phase in phases[:-1] if step <= phase["end_step"]]
    if running and phases[-2]["end_step"] < last:  # warm-up still running and ending in time: keep it
        phases[-1] = {**phases[-1], "end_step": last}
    else:
        for group in scheduler.optimizer.param_groups:
            group["resume_lr"] = group["lr"]
            if scheduler.cycle_momentum:
                group["resume_momentum"] = group["betas"][0] if scheduler.use_beta1 else group["momentum"]
        hold = {"end_step": step, "start_lr": "resume_lr", "end_lr": "resume_lr",
                "start_momentum": "resume_momentum", "end_momentum": "resume_momentum"}
        anneal = {"end_step": last, "start_lr": "resume_lr", "end_lr": "min_lr",
                  "start_momentum": "resume_momentum", "end_momentum": "max_momentum"}
        if last > step:
            phases[:] = [hold, anneal] if step > 0 else [anneal]
        else:  # one step left: it keeps the current LR (the hold's length only avoids a division by zero)
            phases[:] = [{**hold, "end_step": step + 1}]
    scheduler.total_steps = total_steps
