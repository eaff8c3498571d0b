"""Eval-time settings: the image size valid / test / evaluate / predict score at, and test-time augmentation
(TTA). Both cost eval time only; training never sees them.

The eval size defaults to --eval-size-ratio x the train size, rounded to a size the model takes; a model that
cannot score another size than the one it was built for (a ViT's fixed position embedding) falls back to the
train size. A checkpoint's meta.json records the eval size and TTA a run used, so `evaluate` and `predict`
without flags score as `fit` did, and `settings` is what results.json, metrics.json and W&B record with each
number.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.errors import UserError
from train import augment
from train.archs.base import dry_run_problem
from train.model import forward_with_features, resolve
from train.validate import eval_size_range_problem

# The views of a batch each TTA mode scores (`--tta`); NCHW batches, so dim 3 is the width.
TTA_VIEWS: dict[str, Callable[[Tensor], list[Tensor]]] = {
    "none": lambda images: [images],
    "flip": lambda images: [images, images.flip(3)],  # the image and its horizontal mirror
}


@functools.cache  # asked at every best-model save and by every process
def eval_size_problem(arch: str, image_size: int, eval_size: int, pretrained: str = "none") -> str | None:
    """Why `arch`, built for `image_size` (its weights, a ViT's position embedding), cannot score `eval_size`
    images, or None: the size range, the multiple the model's spec asks for, then one image through the model
    built for `image_size` on the meta device (no memory, no compute)."""
    problem = eval_size_range_problem(eval_size)
    if problem or eval_size == image_size:
        return problem
    source, name = resolve(arch)
    multiple = source.spec(name, pretrained, 0.875).multiple
    if eval_size % multiple:
        return f"--eval-image-size {eval_size}: --arch {arch} needs a multiple of {multiple}"
    why = dry_run_problem(lambda _size: source.fresh(name, 2, image_size), eval_size)
    if why is None:
        return None
    return (f"--eval-image-size {eval_size}: --arch {arch} built for --image-size {image_size} cannot take it "
            f"({why}); leave the option out to score at {image_size}")


def default_eval_size(arch: str, image_size: int, ratio: float, pretrained: str = "none") -> int:
    """`ratio` x `image_size`, rounded to the model's multiple; `image_size` when the model cannot score that
    size."""
    source, name = resolve(arch)
    multiple = source.spec(name, pretrained, 0.875).multiple
    size = max(multiple, round(image_size * ratio / multiple) * multiple)
    return size if eval_size_problem(arch, image_size, size, pretrained) is None else image_size


def eval_image_size(arch: str, image_size: int, requested: int, ratio: float, pretrained: str = "none") -> int:
    """The eval size of a run: `requested` (checked before any work), or the default when it is 0."""
    return requested or default_eval_size(arch, image_size, ratio, pretrained)


@torch.no_grad()
def forward(model: nn.Module, images: Tensor, tta: str) -> tuple[Tensor, Tensor]:
    """(penultimate features, logits) of a normalised batch under test-time augmentation `tta`: the mean of
    each over the mode's views (for "none", the plain forward pass).

    Logits are averaged, not probabilities: the result stays logits, so the loss, top-1/top-5, the report's
    confidences and predict's softmax use it unchanged; for the usual linear head, the mean of the logits is
    exactly the head applied to the mean of the features, which is why the embeddings are the mean of the
    views' features too. Each sample's output depends on that sample alone, so scoring stays exact across
    processes. The views run one after the other (not as one doubled batch): the eval batch's memory stays
    what it is without TTA."""
    outputs = [forward_with_features(model, view) for view in TTA_VIEWS[tta](images)]
    if len(outputs) == 1:
        return outputs[0]
    features = torch.stack([f.float() for f, _ in outputs]).mean(dim=0)
    logits = torch.stack([o.float() for _, o in outputs]).mean(dim=0)
    return features, logits


def with_overrides(meta: dict[str, Any], eval_size: int, tta: str) -> dict[str, Any]:
    """A checkpoint's meta with the eval size and TTA asked for on the command line (0 and "": the recorded
    ones); one line, before any work, for a size the model cannot take."""
    meta = dict(meta)
    if eval_size:
        problem = eval_size_problem(meta["arch"], meta["image_size"], eval_size)
        if problem:
            raise UserError(problem)
        meta["eval_image_size"] = eval_size
    meta["tta"] = tta or meta.get("tta", "none")
    size = augment.eval_size(meta)
    meta["eval_transform"] = {"resize_short": round(size / meta["crop_pct"]), "center_crop": size}
    return meta


def settings(meta: dict[str, Any]) -> dict[str, Any]:
    """How a number was obtained: the eval crop, the short side resized to before it, crop_pct, the resize
    filter, the TTA mode and which weights were scored (trained "raw" or averaged "ema", as the checkpoint says)."""
    size = augment.eval_size(meta)
    return {"image_size": size, "resize_short": round(size / meta["crop_pct"]), "crop_pct": meta["crop_pct"],
            "interpolation": meta.get("interpolation", "bilinear"), "tta": meta.get("tta", "none"),
            "weights": meta.get("weights", "raw")}


def describe(recorded: dict[str, Any]) -> str:
    """`settings` in a few words, for the line a score is printed on: "eval 48 px, tta flip"."""
    return f"eval {recorded['image_size']} px, tta {recorded['tta']}"
