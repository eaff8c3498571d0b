"""The exponential moving average (EMA) of the weights (--ema-decay): timm's ModelEmaV3, updated after every
optimizer step, validated beside the trained ("raw") weights at each epoch end, and saved in every checkpoint.

The decay warms up as ModelEmaV3's does (use_warmup, gamma 1, power 2/3): at optimizer step `step` of the
run (counted from 1 over the whole run, so a resumed run continues the same sequence) it is
min(1 - step ** (-2/3), --ema-decay), 0 at step 1 (the first update copies the weights). A short run thus
averages over few steps at first and over about 1 / (1 - decay) steps once the warm-up reaches the cap
(0.99 at step 1000, 0.999 at step 31623).

BatchNorm statistics: the EMA averages the buffers too (running mean and variance; the counters are copied),
rather than re-estimating statistics for the averaged weights with an extra pass over train data. The
running statistics are themselves a moving average over recent batches, taken while the weights drifted, so
their average follows the averaged weights about as closely as the weights' own average does, at no cost. A
re-estimation pass would decode and augment train samples at every validation (part of an epoch's compute),
and, to keep resume exact, would need a train stream of its own beside the one whose position checkpoints
record. With several processes, DistributedDataParallel copies the main process's buffers into the others
only at the start of the next forward (each process has updated its own with its own batch since), so
`update` makes that copy first: every process then averages the same numbers and holds the same EMA, which
is what a checkpoint (written by the main process) restores into all of them.

The state is registered for checkpointing after the LR schedule, so it is saved as EMA_STATE next to it in
every checkpoint (mid-epoch, epoch end, a stop signal's) and loaded by `accelerator.load_state` on resume,
covered by the checkpoint's recorded sha256 like every other file.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

if TYPE_CHECKING:
    from timm.utils.model_ema import ModelEmaV3

EMA_STATE = "custom_checkpoint_1.pkl"  # accelerate's name for the second object registered for checkpointing
WARMUP_GAMMA, WARMUP_POWER = 1.0, 2 / 3  # ModelEmaV3's own defaults
RAW, EMA = "raw", "ema"  # which weights a validation, the best checkpoint and results.json are of


def create(accelerator: Accelerator, model: torch.nn.Module, decay: float) -> ModelEmaV3 | None:
    """The EMA of `model` (prepared), a copy of its weights until the first update, registered for
    checkpointing (call it after the LR schedule is, and before a resume loads the state); None when
    `decay` is 0."""
    if not decay:
        return None
    from timm.utils.model_ema import ModelEmaV3

    ema = ModelEmaV3(_plain(accelerator, model), decay=decay, use_warmup=True, warmup_gamma=WARMUP_GAMMA,
                     warmup_power=WARMUP_POWER)
    accelerator.register_for_checkpointing(ema)
    return ema


@torch.no_grad()
def update(accelerator: Accelerator, ema: ModelEmaV3, model: torch.nn.Module, step: int) -> None:
    """After optimizer step `step` (the run's global step, from 1), in every process."""
    net = _plain(accelerator, model)
    if accelerator.num_processes > 1:
        share_buffers(net)
    ema.update(net, step=step)


def share_buffers(net: torch.nn.Module) -> None:
    """The main process's buffers into every process, in place: the copy DistributedDataParallel makes at
    the start of the next forward, made now. Training is unchanged by it (a BatchNorm in train mode uses
    the batch's statistics, and the next forward copies them again); one broadcast per dtype."""
    from accelerate.utils import broadcast

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in net.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = broadcast(torch.cat([b.reshape(-1) for b in buffers]), from_process=0)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view(b.shape))
            offset += b.numel()


def winner(scored: dict[str, dict[str, Any]]) -> str:
    """Which weights of an epoch count (RAW or EMA; scored: their valid metrics): the lower valid loss wins,
    a finite loss beats a non-finite one, and a tie keeps the raw weights. With no valid sample to score,
    the EMA (what the user asked for) counts."""
    if EMA not in scored:
        return RAW
    raw, ema = scored[RAW], scored[EMA]
    if not raw["num_samples"] or not ema["num_samples"]:
        return EMA
    if not math.isfinite(raw["loss"]):
        return EMA if math.isfinite(ema["loss"]) else RAW
    return EMA if ema["loss"] < raw["loss"] else RAW


def valid_entries(scored: dict[str, dict[str, Any]], weights: str) -> dict[str, Any]:
    """An epoch record's validation: "valid" (the weights that count); with an EMA also both weights'
    metrics ("valid_raw", "valid_ema": W&B draws both curves) and which counted ("valid_weights")."""
    if EMA not in scored:
        return {"valid": scored[RAW]}
    return {"valid": scored[weights], "valid_raw": scored[RAW], "valid_ema": scored[EMA], "valid_weights": weights}


def _plain(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model without its DDP and torch.compile wrappers (its parameter names are the plain ones)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)
