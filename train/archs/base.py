"""What every model source answers, and the parts most sources share.

A source is one library of models (our ResNets, torchvision, timm), chosen by a prefix of `--arch`. It builds a
model for a number of classes, says how the model expects its input (`InputSpec`), finds the classifier head,
computes penultimate features, loads pretrained weights and splits the model into LR groups. `Source` holds
the defaults (the last nn.Linear is the head, features are read at its input, weights come from a file or a
URL and must fit every tensor but the head); a source overrides what its library does otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.errors import one_line
from train import groups, weights
from train.augment import IMAGENET_MEAN, IMAGENET_STD
from train.groups import Group
from train.validate import MAX_IMAGE_SIZE


@dataclass(frozen=True)
class InputSpec:
    """How a model expects its input: normalisation, the eval transform (resize the short side to
    size / crop_pct with `interpolation`, centre crop), its native size, and the sizes it can run at
    (a multiple of `multiple`; `fixed`: its pretrained weights only at `input_size`)."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    input_size: int = 224
    multiple: int = 1
    fixed: bool = False

    def preprocessing(self) -> dict[str, Any]:
        """What a run records in meta.json and applies at eval time."""
        return {"mean": list(self.mean), "std": list(self.std), "crop_pct": self.crop_pct,
                "interpolation": self.interpolation}


@dataclass(frozen=True)
class Listed:
    """One row of `python -m train models`: the --arch name, native input size, where ImageNet weights come
    from ("cached": here already; "download": fetched on first use; "none": no published weights, so
    --pretrained needs a local file), and a note."""

    arch: str
    input_size: int
    weights: str
    note: str = ""


class Source:
    """A model library. Subclasses set `name`, `prefix` (`--arch PREFIX/NAME`), `syntax` (for --help) and
    implement `names`, `knows`, `fresh`, `spec` and `owns`; the rest has defaults."""

    name = ""
    prefix = ""
    syntax = ""

    def names(self) -> list[str]:
        """Every model name this source offers (without the prefix), for listings and suggestions."""
        raise NotImplementedError

    def knows(self, name: str) -> bool:
        raise NotImplementedError

    def fresh(self, name: str, num_classes: int, image_size: int) -> nn.Module:
        """The model with a `num_classes` head, randomly initialised, built for `image_size`."""
        raise NotImplementedError

    def spec(self, name: str, pretrained: str, crop_pct: float) -> InputSpec:
        raise NotImplementedError

    def owns(self, model: nn.Module) -> bool:
        """Whether `model` (unwrapped) is one of this source's."""
        raise NotImplementedError

    def listing(self, matches: Callable[[str], bool]) -> list[Listed]:
        raise NotImplementedError

    def size_problem(self, name: str, image_size: int, pretrained: str) -> str | None:
        """A rule the source knows without building the model (weights made for one size)."""
        return None

    def build(self, name: str, num_classes: int, pretrained: str, image_size: int) -> nn.Module:
        """`fresh`, then the pretrained weights (not "none"): every tensor but the head must fit."""
        model = self.fresh(name, num_classes, image_size)
        if pretrained != "none":
            state_dict, where = self.state_dict(name, pretrained)
            state_dict = self.adapt(model, state_dict)
            weights.load_pretrained(model, state_dict, self.prefix + name, where, self.head_keys(model))
        return model

    def state_dict(self, name: str, pretrained: str) -> tuple[Mapping[str, object], str]:
        """The weights `pretrained` names (an http(s) URL or a file or folder) and how to name them."""
        if pretrained == "imagenet":
            raise NotImplementedError
        return weights.state_dict_from(pretrained)

    def adapt(self, model: nn.Module, state_dict: Mapping[str, object]) -> Mapping[str, object]:
        """A weights file in the library's own older formats, converted to the model's keys (default: as is)."""
        return state_dict

    def head(self, model: nn.Module) -> nn.Module:
        """The classifier head: by default the last nn.Linear."""
        return model.get_submodule(groups.head_name(model))

    def head_keys(self, model: nn.Module) -> tuple[str, ...]:
        """The state dict keys of the head (replaced for the data set's classes when weights load)."""
        head = self.head(model)
        prefixes = tuple(name + "." for name, module in model.named_modules() if module is head)
        return tuple(key for key in model.state_dict() if key.startswith(prefixes))

    def features(self, model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
        """(penultimate features (N, D), logits) in one forward pass: the head's input, read by a hook."""
        seen: list[Tensor] = []
        handle = self.head(model).register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
        try:
            logits = model(images)
        finally:
            handle.remove()
        return seen[-1].flatten(1), logits

    def groups(self, model: nn.Module) -> list[Group]:
        """Stem, stages in depth order, head: by default the top-level children (groups.children_groups)."""
        return groups.children_groups(model, groups.head_name(model))

    def no_weight_decay(self, model: nn.Module) -> tuple[str, ...]:
        """The parameters that get no weight decay besides norms and biases (every 1-D parameter): embeddings
        (position embeddings, class tokens, relative position tables) and per-channel scales, as fnmatch
        patterns over `model.named_parameters()` names. By default what the model's own `no_weight_decay()`
        names (timm's convention, matched as timm's optimizer factory matches it), else none."""
        named = getattr(model, "no_weight_decay", None)
        return tuple(sorted(named())) if callable(named) else ()


def dry_run_problem(build: Callable[[int], nn.Module], size: int) -> str | None:
    """Why a model cannot take a `size` x `size` image, found by running one image through it on the meta
    device (shapes only: no memory, no compute); None when it runs. The model is built there too, or on the
    CPU when its constructor reads tensor values (torchvision's RegNet), which the meta device has none of."""
    try:
        try:
            with torch.device("meta"):
                model = build(size)
        except Exception:  # any error of a constructor that needs values: it is built for real below
            model = build(size)
        model = model.to("meta").eval()
        with torch.device("meta"):
            model(torch.empty(1, 3, size, size))
    except Exception as e:  # whatever the model raises at this size (RuntimeError, ValueError, AssertionError...)
        return one_line(e)
    return None


def smallest_size(build: Callable[[int], nn.Module], above: int, multiple: int, native: int) -> int | None:
    """The smallest size above `above` (a multiple of `multiple`) the model runs at, by bisection (models
    that need a minimum size run at every larger one), or its native size when nothing larger runs."""
    low, high = above // multiple, MAX_IMAGE_SIZE // multiple  # in units of `multiple`; low fails
    if dry_run_problem(build, high * multiple) is not None:
        return native if native > above and dry_run_problem(build, native) is None else None
    while high - low > 1:
        middle = (low + high) // 2
        if dry_run_problem(build, middle * multiple) is None:
            high = middle
        else:
            low = middle
    return high * multiple
