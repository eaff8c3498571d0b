"""Models for the rest of the trainer, whatever their library: build one by `--arch` name, its input spec, its
classifier head, penultimate features and LR groups. Each question goes to the model's source
(train.archs), found from the name or from the built model."""

from __future__ import annotations

import fnmatch
import functools
from typing import Any

from torch import Tensor, nn

from pipeline.errors import UserError
from train import archs, groups
from train.archs.base import InputSpec, Source, dry_run_problem, smallest_size
from train.groups import Group, unwrap


def resolve(arch: str) -> tuple[Source, str]:
    """The source of `arch` and its name there; one line naming the closest names otherwise."""
    found = archs.find(arch)
    if found is None:
        raise UserError(archs.unknown(arch))
    return found


def arch_problem(arch: str) -> str | None:
    return None if archs.find(arch) else archs.unknown(arch)


def input_spec(arch: str, pretrained: str, crop_pct: float) -> InputSpec:
    source, name = resolve(arch)
    return source.spec(name, pretrained, crop_pct)


@functools.cache  # read at every train step
def preprocessing(arch: str, pretrained: str, crop_pct: float) -> dict[str, Any]:
    """mean, std, crop_pct and interpolation of the eval transform: the pretrained weights' own when the
    source knows them, else ImageNet statistics and `crop_pct`."""
    return input_spec(arch, pretrained, crop_pct).preprocessing()


def size_problem(arch: str, image_size: int, pretrained: str) -> str | None:
    """Why `arch` cannot run at `image_size` (with these weights), or None: a multiple its spec asks for, a
    rule of its source, then one image through the model built on the meta device (no memory, no compute),
    which finds every minimum size (AlexNet, Inception, VGG, ConvNeXt, ...)."""
    source, name = resolve(arch)
    spec = source.spec(name, pretrained, 0.875)
    if image_size % spec.multiple:
        return f"--arch {arch} needs --image-size divisible by {spec.multiple}, got {image_size}"
    problem = source.size_problem(name, image_size, pretrained)
    if problem:
        return problem

    def build(size: int) -> nn.Module:
        return source.fresh(name, 2, size)

    why = dry_run_problem(build, image_size)
    if why is None:
        return None
    works = smallest_size(build, image_size, spec.multiple, spec.input_size)
    hint = f"; try --image-size {works}" if works else ""
    return f"--arch {arch} cannot take --image-size {image_size} ({why}){hint}"


def build_model(arch: str, num_classes: int, pretrained: str = "none", image_size: int = 224) -> nn.Module:
    """`arch` with a `num_classes` head; `pretrained` is "none", "imagenet" (the source's published weights,
    through its library's download and cache), the http(s) URL of a state dict file, or a file or folder.

    Pretrained weights must fit every tensor but the head; their head is used only when it already has
    `num_classes` outputs, otherwise the head keeps its fresh init.
    """
    source, name = resolve(arch)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    problem = size_problem(arch, image_size, pretrained)
    if problem:
        raise UserError(problem)
    return source.build(name, num_classes, pretrained, image_size)


def _source(model: nn.Module) -> Source:
    return archs.source_of(model) or Source()


def head_of(model: nn.Module) -> nn.Module:
    bare = unwrap(model)
    return _source(bare).head(bare)


def forward_with_features(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """(penultimate features (N, D), logits) of one forward pass (evaluate's embeddings)."""
    bare = unwrap(model)
    return _source(bare).features(bare, images)


def groups_of(model: nn.Module) -> list[Group]:
    """The model's LR groups, stem first, head last (empty groups left out)."""
    bare = unwrap(model)
    return [(name, paths) for name, paths in _source(bare).groups(bare) if paths]


def group_names(model: nn.Module) -> list[str]:
    return [name for name, _ in groups_of(model)]


def assign(model: nn.Module) -> dict[str, str]:
    """Parameter name (as `model.named_parameters()` gives it) -> its LR group; ValueError for a parameter that
    no group owns."""
    return groups.owners(model, groups_of(model))


def no_decay_names(model: nn.Module) -> set[str]:
    """Names (as `model.named_parameters()` gives them, wrappers included) of the parameters its source exempts
    from weight decay besides norms and biases: embeddings and per-channel scales (Source.no_weight_decay)."""
    bare = unwrap(model)
    patterns = _source(bare).no_weight_decay(bare)
    return {full for full, _ in model.named_parameters()
            if any(fnmatch.fnmatchcase(groups.bare_name(full), pattern) for pattern in patterns)}
