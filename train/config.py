"""Run configuration: one dataclass; defaults < YAML file < command line (every option has a YAML key)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError

ARCH_CHOICES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
PRECISIONS = ("auto", "no", "fp16", "bf16")
OPTIMIZER_CHOICES = ("adam", "adamw", "sgd")
AUGMENT_CHOICES = ("standard", "notebook", "none")
LR_SCHEMES = ("notebook", "geometric", "flat")
WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class Config:
    # data
    shards: str = ""
    image_size: int = 224
    batch_size: int = 64  # per process
    eval_batch_size: int = 0  # 0: same as batch_size
    workers: int = 4
    augment: str = "standard"
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])
    crop_pct: float = 0.875
    shuffle_buffer: int = 1000
    # model
    arch: str = "resnet50"
    pretrained: str = "imagenet"  # imagenet | none | PATH
    # optimisation (the notebook's recipe by default)
    optimizer: str = "adam"
    lr: float | str = 1e-3  # "auto": `fit` runs lr-find first and records the LR it chose
    lr_find_start: float = 1e-7  # the LR range test's sweep (lr-find, and fit with lr auto)
    lr_find_end: float = 10.0
    lr_find_steps: int = 100
    lr_scheme: str = "notebook"
    lr_decay: float = 0.5  # for lr_scheme geometric
    weight_decay: float = 0.0
    momentum: float = 0.9
    epochs: int = 10
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    grad_accum: int = 1
    clip_grad: float = 0.0  # 0: no clipping
    label_smoothing: float = 0.0
    # runtime
    precision: str = "auto"  # auto: what `accelerate launch` was configured with, else no
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    run_dir: str = "runs/default"
    resume: str = ""  # "auto": continue from the newest complete checkpoint
    force: bool = False  # resume even if config or shard set changed
    checkpoint_every: int = 0  # optimizer steps; 0: only at epoch ends
    keep_checkpoints: int = 2
    log_every: int = 10
    wandb: str = "auto"  # auto: online with an API key, else offline
    wandb_project: str = "cubstream"
    dist_timeout: int = 120  # seconds a process waits for a dead peer before failing


# Options that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"resume", "force", "workers", "wandb", "log_every", "run_dir", "shards", "checkpoint_every",
                     "keep_checkpoints", "dist_timeout", "lr_find_start", "lr_find_end", "lr_find_steps"}

HELP = {
    "shards": "shard set: a directory or http(s) base URL holding manifest.json, or 'pipe:COMMAND' printing "
              "the file named by {} (e.g. 'pipe:aws s3 cp s3://BUCKET/PREFIX/{} -')",
    "config": "YAML file of options (keys = option names with _); the command line overrides it",
    "batch_size": "per process", "workers": "data loader processes per training process",
    "augment": "train augmentation preset", "pretrained": "imagenet | none | PATH to torchvision weights",
    "lr": "peak LR of the fc group; other groups get lr_scheme's multipliers (auto: run lr-find first)",
    "lr_scheme": "discriminative LRs: notebook (stem /10 .. layer4 /2), geometric (lr_decay per group), flat",
    "precision": "mixed precision (auto: from the accelerate launch config, else no)", "resume": "auto: continue from the newest complete checkpoint",
    "force": "resume even if the config or the shard set differ", "compile": "torch.compile the model",
    "checkpoint_every": "save every N optimizer steps (0: each epoch end only)",
    "wandb": "auto = online when an API key is configured, else offline",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per Config field, default None so that only what the user typed overrides the YAML."""
    parser.add_argument("--config", type=Path, help=HELP["config"])
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default) if f.default is not dataclasses.MISSING else list
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP.get(f.name))
        elif kind is list:
            parser.add_argument(flag, type=float, nargs=2, default=None, help=HELP.get(f.name))
        elif f.name == "lr":
            parser.add_argument(flag, type=parse_lr, default=None, help=HELP.get(f.name))
        else:
            parser.add_argument(flag, type=kind, default=None, help=HELP.get(f.name))


def parse_lr(text: str) -> float | str:
    """--lr: a number, or "auto"."""
    return "auto" if text == "auto" else float(text)


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option: value")
    known = {f.name for f in fields(Config)}
    for key in data:
        if key.replace("-", "_") not in known:
            raise UserError(f"--config {path}: unknown key {key!r}")
    return {key.replace("-", "_"): value for key, value in data.items()}


def make_config(args: argparse.Namespace) -> Config:
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    for f in fields(Config):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    try:
        config = Config(**values)
    except TypeError as e:
        raise UserError(f"bad configuration: {e}") from None
    return _coerce(config)


def _coerce(config: Config) -> Config:
    """YAML gives ints for floats (1 for 1.0) and strings for numbers (1e-3): check types once, here."""
    for f in fields(Config):
        value, default = getattr(config, f.name), f.default
        if f.name == "lr" and value == "auto":
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise UserError(f"option {f.name}: expected true/false, got {value!r}")
        elif isinstance(default, float | int):
            try:
                setattr(config, f.name, type(default)(value))
            except (TypeError, ValueError):
                raise UserError(f"option {f.name}: expected a number, got {value!r}") from None
    return config


def check(config: Config, require_shards: bool = True) -> list[str]:
    """Problems with a config, as argparse-style messages (empty list: fine)."""
    problems = []
    if require_shards and not config.shards:
        problems.append("--shards is required (a shard set directory or URL)")
    for name, choices in (("arch", ARCH_CHOICES), ("precision", PRECISIONS), ("optimizer", OPTIMIZER_CHOICES),
                          ("augment", AUGMENT_CHOICES), ("lr_scheme", LR_SCHEMES), ("wandb", WANDB_MODES)):
        if getattr(config, name) not in choices:
            problems.append(f"--{name.replace('_', '-')}: invalid choice {getattr(config, name)!r} "
                            f"(choose from {', '.join(choices)})")
    for name in ("batch_size", "epochs", "image_size", "grad_accum", "keep_checkpoints"):
        if getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    for name in ("eval_batch_size", "workers", "checkpoint_every", "weight_decay", "clip_grad"):
        if getattr(config, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    if config.lr != "auto" and not config.lr > 0:  # also refuses nan
        problems.append(f"--lr must be > 0, got {config.lr}")
    if not 0 < config.lr_find_start < config.lr_find_end or config.lr_find_steps < 2:
        problems.append("the LR sweep needs 0 < --start-lr < --end-lr and --steps >= 2 (lr_find_start, "
                        f"lr_find_end, lr_find_steps), got {config.lr_find_start}, {config.lr_find_end}, "
                        f"{config.lr_find_steps}")
    if config.resume not in ("", "auto"):
        problems.append(f"--resume: only 'auto' is supported, got {config.resume!r}")
    return problems


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save(config: Config, path: Path) -> None:
    from pipeline.manifest import write_atomic

    write_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False).encode())


def changed_fields(old: dict[str, Any], new: Config) -> list[str]:
    """Fields that differ between a saved config and this one, ignoring those a resume may change."""
    current = to_dict(new)
    return sorted(k for k in current if k not in RESUMABLE_CHANGES and old.get(k) != current[k])
