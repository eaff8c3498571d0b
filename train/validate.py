"""Checks of a run configuration before any work: each option's range and choices, read from the registries
that define them (model sources, augmentation presets, optimizers, LR schemes), and the combinations."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from train import names
from train.stopping import parse_signals

if TYPE_CHECKING:
    from train.config import Config

CHOICES = {  # option -> its values, as plain names (train.names): checking them imports no registry
    "augment": names.AUGMENT_PRESETS,
    "optimizer": names.OPTIMIZERS,
    "lr_scheme": names.LR_SCHEMES,
    "precision": names.PRECISIONS,
    "wandb": names.WANDB_MODES,
    "tta": names.TTA_MODES,
}
PRECISIONS, WANDB_MODES = names.PRECISIONS, names.WANDB_MODES


def registry(name: str) -> tuple[str, ...]:
    """The values of option `name`."""
    return CHOICES[name]


def choices() -> dict[str, tuple[str, ...]]:
    """Every option with a fixed set of values, and the values."""
    return dict(CHOICES)


def choice_problem(name: str, value: object) -> str | None:
    """One line naming the choices when `value` is not one of option `name`'s."""
    valid = registry(name)
    if value in valid:
        return None
    return f"--{name.replace('_', '-')}: invalid choice {value!r} (choose from {', '.join(valid)})"


# Ranges of the numeric options: (low, low_inclusive, high, high_inclusive), None for no bound. Every float
# must also be finite (nan and inf are refused, from the command line and from YAML).
MAX_IMAGE_SIZE = 2048
MAX_SEED = 2**32 - 1  # numpy's seed range
RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "image_size": (16, True, MAX_IMAGE_SIZE, True),
    "batch_size": (1, True, None, False),
    "eval_batch_size": (0, True, None, False),  # 0: the train batch size
    "workers": (0, True, None, False),
    "crop_pct": (0, False, 1, True),
    "eval_image_size": (0, True, MAX_IMAGE_SIZE, True),  # 0: the default; else image_size's range
    "eval_size_ratio": (0.5, True, 2.0, True),
    "shuffle_buffer": (1, True, None, False),
    "lr_find_start": (0, False, None, False),
    "lr_find_end": (0, False, None, False),
    "lr_find_steps": (20, True, None, False),  # lr_finder.MIN_STEPS
    "lr_decay": (0, False, 1, True),
    "weight_decay": (0, True, None, False),
    "momentum": (0, True, 1, False),
    "epochs": (1, True, None, False),
    "pct_start": (0, False, 1, False),
    "div_factor": (1, True, None, False),
    "final_div_factor": (1, True, None, False),
    "grad_accum": (1, True, None, False),
    "clip_grad": (0, True, None, False),  # 0: no clipping
    "label_smoothing": (0, True, 1, False),
    "ema_decay": (0, True, 1, False),  # 0: off; ema_decay_problem refuses the gap (0, 0.5) too
    "seed": (0, True, MAX_SEED, True),
    "checkpoint_every": (0, True, None, False),  # 0: epoch ends only
    "keep_checkpoints": (1, True, None, False),
    "log_every": (1, True, None, False),
    "dist_timeout": (1, True, None, False),
    "io_timeout": (0, True, None, False),  # 0: the environment's or the default
    "cache_limit_gb": (0, True, None, False),  # 0: the environment's, else no limit
    "stop_grace": (0, True, None, False),  # 0: no deadline
}


# Options the optimizer multiplies float32 tensors by (the LRs of the sweep too): torch refuses a factor
# above float32's largest number at the first step, so it is refused here. (torch.finfo(torch.float32).max,
# written out: this module does not import torch.)
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_OPTIONS = ("lr", "weight_decay", "lr_find_start", "lr_find_end")


def float32_problem(name: str, value: object) -> str | None:
    """One line when a float32 option's value is finite but above float32's largest number."""
    if name not in FLOAT32_OPTIONS or not isinstance(value, int | float) or value <= FLOAT32_MAX:
        return None
    return (f"{_flag(name)} must be at most {FLOAT32_MAX:.4g} (the largest float32: the optimizer computes "
            f"with it in float32), got {value:g}")


SWEEP_FLAGS = {"lr_find_start": "--lr-find-start/--start-lr", "lr_find_end": "--lr-find-end/--end-lr",
               "lr_find_steps": "--lr-find-steps/--steps"}  # lr-find's own names for them


def _flag(name: str) -> str:
    return SWEEP_FLAGS.get(name) or "--" + name.replace("_", "-")


def _range_problem(name: str, value: float) -> str | None:
    low, low_in, high, high_in = RANGES[name]
    if isinstance(value, float) and not math.isfinite(value):
        return f"{_flag(name)} must be a finite number, got {value}"
    problem = float32_problem(name, value)
    if problem:
        return problem
    too_low = low is not None and (value < low if low_in else value <= low)
    too_high = high is not None and (value > high if high_in else value >= high)
    if not (too_low or too_high):
        return None
    if high is None:
        return f"{_flag(name)} must be {'>=' if low_in else '>'} {_show(low)}, got {_show(value)}"
    interval = f"{'[' if low_in else '('}{_show(low)}, {_show(high)}{']' if high_in else ')'}"
    return f"{_flag(name)} must be in {interval}, got {_show(value)}"


def _show(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


EMA_DECAY_LOW = 0.5  # below it the newest weights would outweigh the whole average: not an average any more


def ema_decay_problem(value: float) -> str | None:
    """--ema-decay is 0 (off) or in [EMA_DECAY_LOW, 1): RANGES has [0, 1) (a decay of 1 would never move from
    the first weights), this the gap above 0."""
    if not 0 < value < EMA_DECAY_LOW:
        return None
    return f"--ema-decay must be 0 (off) or in [{_show(EMA_DECAY_LOW)}, 1), got {_show(value)}"


def eval_size_range_problem(value: int) -> str | None:
    """--eval-image-size: 0 (the default) or a size --image-size could be."""
    low, _, high, _ = RANGES["image_size"]
    if value == 0 or low <= value <= high:
        return None
    return f"--eval-image-size must be 0 (the default) or in [{low}, {high}], got {value}"


def model_problem(config: Config) -> str | None:
    """Whether --arch names a model, the model takes --image-size and, built for it, scores --eval-image-size
    (imports torch and the model sources: run it after `check` and the shard set's manifest, which are quick)."""
    from train.evaltime import eval_size_problem
    from train.model import arch_problem, size_problem

    problem = arch_problem(config.arch) or size_problem(config.arch, config.image_size, config.pretrained)
    if problem or not config.eval_image_size:
        return problem
    return eval_size_problem(config.arch, config.image_size, config.eval_image_size, config.pretrained)


def check(config: Config, require_shards: bool = True) -> list[str]:
    """Problems with a config, as argparse-style messages (empty list: fine); imports nothing heavy. The
    model's own checks are `model_problem`."""
    problems = []
    if require_shards and not config.shards:
        problems.append("--shards is required (a shard set directory or URL)")
    problems += filter(None, (choice_problem(name, getattr(config, name)) for name in CHOICES))
    for name in RANGES:
        problem = _range_problem(name, getattr(config, name))
        if problem:
            problems.append(problem)
    if config.lr != "auto" and not (config.lr > 0 and math.isfinite(config.lr)):  # also refuses nan
        problems.append(f"--lr must be > 0 and finite, got {config.lr}")
    elif float32_problem("lr", config.lr):
        problems.append(float32_problem("lr", config.lr))
    if not _range_problem("eval_image_size", config.eval_image_size):  # 0 or image_size's range
        problems += filter(None, [eval_size_range_problem(config.eval_image_size)])
    if not config.lr_find_start < config.lr_find_end:
        problems.append("the LR sweep needs --start-lr < --end-lr (lr_find_start, lr_find_end), got "
                        f"{config.lr_find_start} and {config.lr_find_end}")
    low, high = config.crop_scale
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high <= 1):
        problems.append(f"--crop-scale needs two numbers 0 < min <= max <= 1, got {low:g} {high:g}")
    problems += filter(None, [ema_decay_problem(config.ema_decay)])
    if config.resume not in ("", "auto"):
        problems.append(f"--resume: only 'auto' is supported, got {config.resume!r}")
    try:
        parse_signals(config.stop_signals)
    except ValueError as e:
        problems.append(f"--stop-signals: {e}")
    if not config.run_dir:
        problems.append("--run-dir must not be empty")
    if not config.wandb_project:
        problems.append("--wandb-project must not be empty")
    return problems


