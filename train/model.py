"""Architectures as plug-ins: our own ResNets (train.resnet, the notebook's) or any torchvision classification
model, by name, with a fresh `num_classes` head and optional pretrained weights (train.weights).

The head is found generically (the last nn.Linear, see train.groups) and replaced; the penultimate features
(its input) are read with a hook on it, so evaluate's embeddings work for every architecture.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable
from typing import Any

import torchvision
from torch import Tensor, nn

from pipeline.errors import UserError
from train import weights
from train.groups import head_name, unwrap
from train.resnet import RESNETS, ResNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision families left out of the choices, with the reason.
UNSUPPORTED = {"squeezenet": "its classifier is a convolution, not an nn.Linear head"}
# Constructor arguments per family (name prefix): the input size for fixed-size models, no auxiliary heads.
CONSTRUCTOR: dict[str, Callable[[int], dict[str, Any]]] = {
    "vit_": lambda size: {"image_size": size},
    "maxvit_": lambda size: {"input_size": (size, size)},
    "googlenet": lambda size: {"aux_logits": False, "init_weights": True},
    "inception_": lambda size: {"aux_logits": False, "init_weights": True},
}
SIZED = ("vit_", "maxvit_")  # built for one image size: ImageNet weights need exactly theirs


@functools.cache
def arch_names() -> tuple[str, ...]:
    """Every --arch choice: our ResNets, then torchvision's classification models (ours win on a name)."""
    theirs = torchvision.models.list_models(module=torchvision.models)
    return (*RESNETS, *(name for name in theirs if name not in RESNETS and not name.startswith(tuple(UNSUPPORTED))))


def check_arch(arch: str) -> None:
    from train.validate import choice_problem

    problem = choice_problem("arch", arch)
    if problem:
        raise UserError(problem)


def _prefix(arch: str, table: dict[str, Any] | tuple[str, ...]) -> str | None:
    return next((prefix for prefix in table if arch.startswith(prefix)), None)


def size_problem(arch: str, image_size: int, pretrained: str) -> str | None:
    """Why `arch` cannot run at `image_size` (with these weights), or None: ViTs need a multiple of their
    patch size, and a fixed-size model's ImageNet weights exactly their own size."""
    patch = re.fullmatch(r"vit_\w_(\d+)", arch)
    if patch and image_size % int(patch[1]):
        return f"--arch {arch} needs --image-size divisible by {patch[1]}, got {image_size}"
    if pretrained == "imagenet" and arch not in RESNETS and _prefix(arch, SIZED):
        size = torchvision.models.get_model_weights(arch).DEFAULT.transforms().crop_size[0]
        if image_size != size:
            return f"--arch {arch} with --pretrained imagenet needs --image-size {size}, got {image_size}"
    return None


@functools.cache  # read at every train step
def preprocessing(arch: str, pretrained: str, crop_pct: float) -> dict[str, Any]:
    """mean, std and crop_pct of the eval transform: torchvision's ImageNet weights bring their own (from
    their transforms: crop_pct = crop size / resize size); otherwise ImageNet statistics and `crop_pct`."""
    if pretrained != "imagenet" or arch in RESNETS:
        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "crop_pct": crop_pct}
    transforms = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    return {"mean": list(transforms.mean), "std": list(transforms.std),
            "crop_pct": transforms.crop_size[0] / transforms.resize_size[0]}


def build_model(arch: str, num_classes: int, pretrained: str = "none", image_size: int = 224) -> nn.Module:
    """`arch` with a `num_classes` head; `pretrained` is "none", "imagenet" (torchvision's weights API and
    cache), the http(s) URL of a state dict file, or a state dict file path.

    Pretrained weights must fit the backbone exactly; their head is used only when it already has
    `num_classes` outputs, otherwise the head keeps its fresh init.
    """
    check_arch(arch)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    problem = size_problem(arch, image_size, pretrained)
    if problem:
        raise UserError(problem)
    if arch in RESNETS:
        block, layers = RESNETS[arch]
        model: nn.Module = ResNet(block, layers, num_classes=num_classes)
    else:
        model = _torchvision_model(arch, image_size)
        replace_head(model, num_classes)
    if pretrained != "none":
        state_dict, source = weights.state_dict_from(pretrained, arch)
        head = head_name(model)
        head_keys = tuple(key for key in model.state_dict() if key.startswith(head + "."))
        weights.load_pretrained(model, state_dict, arch, source, head_keys)
    return model


def _torchvision_model(arch: str, image_size: int) -> nn.Module:
    family = _prefix(arch, CONSTRUCTOR)
    kwargs = CONSTRUCTOR[family](image_size) if family else {}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)  # e.g. googlenet's init notice
            return torchvision.models.get_model(arch, weights=None, **kwargs)
    except (AssertionError, ValueError, RuntimeError) as e:
        raise UserError(f"--arch {arch} cannot be built for --image-size {image_size}: {e}") from None


def replace_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """Put a fresh `num_classes` nn.Linear where the classifier head is (same inputs and bias)."""
    name = head_name(model)
    old = model.get_submodule(name)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return new


def head_of(model: nn.Module) -> nn.Linear:
    bare = unwrap(model)
    return bare.get_submodule(head_name(bare))


def forward_with_features(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """(penultimate features (N, D), logits): one forward pass, the features read at the head's input."""
    seen: list[Tensor] = []
    handle = head_of(model).register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        logits = model(images)
    finally:
        handle.remove()
    return seen[-1].flatten(1), logits
