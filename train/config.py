"""Run configuration: one dataclass; defaults < YAML file < command line (every option has a YAML key).

The command line is built from the dataclass: an option not given is absent from the parsed namespace (so it
does not override the YAML), and `--help` shows each option's real default and its choices."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError, one_line
from train import names
from train.stopping import DEFAULT_SIGNALS
from train.validate import CHOICES, PRECISIONS, RANGES, WANDB_MODES, check, choices, model_problem, registry  # noqa: F401


@dataclass(frozen=True)  # a step that decides an option (lr-find's LR, a resume's --grad-accum) makes a new one
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
    eval_image_size: int = 0  # 0: eval_size_ratio x image_size, or image_size where the model needs it
    eval_size_ratio: float = 1.0
    tta: str = "flip"
    shuffle_buffer: int = 1000
    # model
    arch: str = "resnet50"
    pretrained: str = "imagenet"  # imagenet | none | PATH | URL
    # optimisation (the recipe bench/recipe.py measured; configs/notebook.yaml is the notebook's)
    optimizer: str = "adamw"
    lr: float | str = 1e-3  # "auto": `fit` runs lr-find first and records the LR it chose
    lr_find_start: float = 1e-7  # the LR range test's sweep (lr-find, and fit with lr auto)
    lr_find_end: float = 10.0
    lr_find_steps: int = 100
    lr_scheme: str = "auto"
    lr_decay: float = 0.5  # for lr_scheme geometric
    weight_decay: float = 0.05
    momentum: float = 0.9
    epochs: int = 10
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    grad_accum: int = 1
    clip_grad: float = 0.0  # 0: no clipping
    label_smoothing: float = 0.1
    ema_decay: float = 0.9998  # 0: no moving average of the weights (train/ema.py)
    # runtime
    precision: str = "auto"  # auto: what `accelerate launch` was configured with, else no
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    run_dir: str = "runs/default"
    resume: str = ""  # "auto": continue from the newest complete checkpoint
    force: bool = False  # resume with another epochs or shard set (FORCE_CHANGES)
    checkpoint_every: int = 0  # optimizer steps; 0: only at epoch ends
    keep_checkpoints: int = 2
    log_every: int = 10
    plots: bool = True  # the test report's PNGs at the end of fit
    wandb: str = "auto"  # auto: online with an API key, else offline
    wandb_project: str = "cubstream"
    dist_timeout: int = 120  # seconds a process waits for a dead peer before failing
    io_timeout: float = 0.0  # seconds a shard read may make no progress (0: $CUBSTREAM_IO_TIMEOUT, else 60)
    cache_dir: str = ""  # local copies of remote shards ("": $CUBSTREAM_CACHE_DIR, else none)
    cache_limit_gb: float = 0.0  # 0: $CUBSTREAM_CACHE_LIMIT_GB, else no limit
    stop_signals: str = DEFAULT_SIGNALS  # fit stops at a checkpoint on these (empty: none)
    stop_grace: float = 120.0  # seconds after a stop signal to write the checkpoint (0: no deadline)


# Options that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"resume", "force", "workers", "wandb", "log_every", "run_dir", "shards", "checkpoint_every",
                     "keep_checkpoints", "dist_timeout", "lr_find_start", "lr_find_end", "lr_find_steps",
                     "io_timeout", "stop_signals", "stop_grace", "cache_dir", "cache_limit_gb",
                     "eval_image_size", "eval_size_ratio", "tta", "plots"}  # how valid / test score, not what trains
# What --force lets a resumed run change besides the shard set: the one-cycle schedule is rebuilt for the new
# length, continuous at the resumed step. Everything else (LR, optimizer, model, batch...) lives in the
# checkpoint's state or defines its steps, so a change could not be followed exactly and is refused.
FORCE_CHANGES = {"epochs"}

HELP = {
    "shards": "shard set: a directory or http(s) base URL holding manifest.json, or 'pipe:COMMAND' printing "
              "the file named by {} (e.g. 'pipe:aws s3 cp s3://BUCKET/PREFIX/{} -')",
    "config": "YAML file of options (keys = option names with _); the command line overrides it",
    "batch_size": "per process", "workers": "data loader processes per training process", "augment": "train augmentation preset",
    "arch": "the model: ",  # + each model source's syntax (HelpFormatter)
    "image_size": "train and eval crop size in pixels (checked against the model before any work: a ViT needs a "
                  "multiple of its patch size, some models a minimum)",
    "crop_pct": "eval crop / resize of the short side (pretrained weights of other models than ours bring "
                "theirs)",
    "eval_image_size": "crop size in pixels of valid, test and the checkpoint's evaluate / predict / export; the "
                       "short side is resized to size / crop_pct first (0: --image-size x --eval-size-ratio, "
                       "rounded to a size the model takes; --image-size for a model that scores no other, e.g. a "
                       "ViT)",
    "eval_size_ratio": "the default eval crop size as a multiple of --image-size (a random-resized crop shows "
                       "objects larger than a center crop does, which a larger eval crop can make up for; at "
                       "small sizes it measured worse, so 1.0 by default)",
    "plots": "draw the test report's PNGs at the end of fit (confusion matrix, most-incorrect images, embeddings "
             "by PCA and t-SNE, which takes minutes of CPU on a large test split while the GPUs wait); "
             "--no-plots writes metrics.json and predictions.csv only, and `python -m train evaluate` draws them",
    "tta": "test-time augmentation of valid, test, evaluate and predict: flip also scores each image's "
           "horizontal mirror and averages the two logits (costs one more forward pass per image)",
    "pretrained": "imagenet (the model's published weights, through its library's download and cache: torch hub or "
                  "Hugging Face; their mean/std, eval resize/crop and interpolation with it) | none | PATH (a .pth, "
                  ".bin or .safetensors state dict, or a Hugging Face model folder) | http(s) URL of a state dict "
                  "(downloaded once into the torch hub cache); the head is made anew for the shard set's classes",
    "lr": "peak LR of the head group (fc for a ResNet); the other groups get lr_scheme's multipliers (auto: run "
          "lr-find first)",
    "lr_scheme": "discriminative LRs over stem, stages, head: notebook (head 1, then /2, /4, /6 ...: a ResNet's "
                 "layer4 /2 .. stem /10), geometric (lr_decay per group below the head), flat (one LR), auto "
                 "(notebook with pretrained weights, flat from scratch)",
    "lr_decay": "per-group LR factor of lr_scheme geometric",
    "momentum": "sgd's initial momentum (Nesterov); the one-cycle schedule then cycles it 0.95 -> 0.85 -> 0.95 "
                "(adam's beta1 too); 0: plain SGD, no momentum at any step",
    "pct_start": "the warm-up: share of the optimizer steps over which the one-cycle LR rises from peak / "
                 "div_factor to its peak, before annealing",
    "weight_decay": "L2 in the gradient with adam and sgd, decoupled with adamw; never on norms, biases and "
                    "embeddings (position embeddings, class tokens)",
    "ema_decay": "keep an exponential moving average of the weights (parameters and BatchNorm statistics), "
                 "updated after every optimizer step with a decay warming up as 1 - step^(-2/3) to at most this "
                 "value (0: off; else in [0.5, 1)); each epoch validates both the trained and the averaged "
                 "weights, and the best checkpoint keeps the one with the lower valid loss",
    "precision": "mixed precision (auto: from the accelerate launch config, else no)", "resume": "auto: continue from the newest complete checkpoint",
    "force": "resume with another --epochs (the LR schedule is rebuilt, continuous at the resumed step) or "
             "another shard set with the same classes", "compile": "torch.compile the model",
    "checkpoint_every": "save every N optimizer steps (0: each epoch end only)",
    "wandb": "auto = online when an API key is configured, else offline",
    "io_timeout": "seconds a remote shard read may make no progress before the run stops with an error "
                  "(0: $CUBSTREAM_IO_TIMEOUT, else 60)",
    "cache_dir": "directory keeping a local copy of each remote (http(s), pipe:) shard, fetched once, checked "
                 "against the manifest's sha256 and read from disk afterwards; shared safely by every process "
                 "and run on the node; local shard sets are never copied (empty: $CUBSTREAM_CACHE_DIR, else "
                 "no cache)",
    "cache_limit_gb": "evict the least recently used cached shards not in use beyond this many GB (0: "
                      "$CUBSTREAM_CACHE_LIMIT_GB, else no limit)",
    "stop_signals": "comma-separated signals on which fit stops cleanly (empty: none): every process stops at "
                    "the same optimizer step, writes a checkpoint there and exits with status 75; rerun with "
                    "--resume auto to continue. A second signal, or --stop-grace running out, exits at once "
                    "without that checkpoint, with status 128+N (N: the signal's number, e.g. 143 for TERM)",
    "stop_grace": "seconds after a stop signal to write its checkpoint before exiting without it (0: no limit)",
}


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its choices and its real default (the Config default for run options,
    whose parsed default is "not given"); required options say so."""

    def _get_help_string(self, action: argparse.Action) -> str:
        extra = []
        if action.dest in CHOICE_OPTIONS:
            extra.append("choices: " + ", ".join(registry(action.dest)))
        if action.required:
            extra.append("required")
        elif action.option_strings and action.default is not argparse.SUPPRESS and action.nargs != 0:
            extra.append(f"default: {_shown(action.default)}")
        elif action.dest in DEFAULTS and action.default is argparse.SUPPRESS:
            extra.append(f"default: {_shown(DEFAULTS[action.dest])}")
        elif action.nargs == 0 and action.option_strings and action.dest != "help":
            extra.append("default: off")
        text = action.help or ""
        if action.dest == "arch":
            text += "; ".join(names.ARCH_SYNTAX) + "; `python -m train models [PATTERN]` lists them"
        return f"{text} ({'; '.join(extra).replace('%', '%%')})".lstrip() if extra else text


CHOICE_OPTIONS = tuple(CHOICES)  # options with a fixed set of values
DEFAULTS = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in fields(Config)}


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return repr(value) if value == "" else str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per Config field; an option not given stays out of the namespace (argparse.SUPPRESS), so
    only what the user typed overrides the YAML."""
    parser.add_argument("--config", type=Path, help=HELP["config"])
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = type(DEFAULTS[f.name])
        common = {"default": argparse.SUPPRESS, "help": HELP.get(f.name, f.name.replace("_", " "))}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif kind is list:
            parser.add_argument(flag, type=float, nargs=2, metavar=("MIN", "MAX"), **common)
        elif f.name == "lr":
            parser.add_argument(flag, type=parse_lr, **common)
        else:
            parser.add_argument(flag, type=kind, **common)


def parse_lr(text: str) -> float | str:
    """--lr: a number, or "auto"."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({one_line(e)})") from None
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
        if hasattr(args, f.name):  # given on the command line
            values[f.name] = getattr(args, f.name)
    try:
        config = Config(**values)
    except TypeError as e:
        raise UserError(f"bad configuration: {e}") from None
    return _coerce(config)


def _coerce(config: Config) -> Config:
    """YAML gives ints for floats (1 for 1.0) and strings for numbers (1e-3): check types once, here. A whole
    number is required where the option counts something (2.5 epochs is refused, not truncated)."""
    fixed: dict[str, Any] = {}
    for f in fields(Config):
        value, default = getattr(config, f.name), f.default
        if f.name == "lr" and value == "auto":
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise UserError(f"option {f.name}: expected true/false, got {value!r}")
        elif isinstance(default, int):
            fixed[f.name] = _whole_number(f.name, value)
        elif isinstance(default, float):
            fixed[f.name] = _number(f.name, value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise UserError(f"option {f.name}: expected text, got {value!r}")
    scale = config.crop_scale
    if not isinstance(scale, list | tuple) or len(scale) != 2:
        raise UserError(f"option crop_scale: expected two numbers [min, max], got {scale!r}")
    return dataclasses.replace(config, **fixed, crop_scale=[_number("crop_scale", v) for v in scale])


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise UserError(f"option {name}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"option {name}: expected a number, got {value!r}") from None


def _whole_number(name: str, value: Any) -> int:
    number = value if isinstance(value, int) and not isinstance(value, bool) else _number(name, value)
    if isinstance(number, float) and not number.is_integer():
        raise UserError(f"option {name}: expected a whole number, got {value!r}")
    return int(number)


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save(config: Config, path: Path) -> None:
    from pipeline.files import write_atomic

    write_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False).encode())


def changed_fields(old: dict[str, Any], new: Config) -> list[str]:
    """Fields that differ between a saved config and this one, ignoring those a resume may change."""
    current = to_dict(new)
    return sorted(k for k in current if k not in RESUMABLE_CHANGES and old.get(k) != current[k])
