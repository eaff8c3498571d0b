"""torchvision's classification models (`--arch tv/NAME`, or the bare NAME): built by name, with their
ImageNet weights through torchvision's weights API and the torch hub cache, and their weights' metadata
(mean, std, resize/crop, interpolation) as the input spec. torchvision is imported on first use: it takes
~1.3 s (it pulls in torch._dynamo), which a command with one of our ResNets never needs."""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from pipeline.errors import UserError, one_line
from train import groups, weights
from train.archs.base import InputSpec, Listed, Source
from train.groups import Group

# Families left out, with the reason.
UNSUPPORTED = {"squeezenet": "its classifier is a convolution, not an nn.Linear head"}
# Constructor arguments per family (name prefix): the input size for fixed-size models, no auxiliary heads.
CONSTRUCTOR: dict[str, Callable[[int], dict[str, Any]]] = {
    "vit_": lambda size: {"image_size": size},
    "maxvit_": lambda size: {"input_size": (size, size)},
    "googlenet": lambda size: {"aux_logits": False, "init_weights": True},
    "inception_": lambda size: {"aux_logits": False, "init_weights": True},
}
SIZED = ("vit_", "maxvit_")  # built for one image size: ImageNet weights need exactly theirs
# What gets no weight decay besides norms and biases, which torchvision's models do not name themselves (no
# `no_weight_decay()`): ViT's class token and position embedding, Swin's and MaxViT's relative position tables,
# Swin V2's continuous position bias MLP and attention logit scale (what timm's versions of the same models
# exclude), and ConvNeXt's per-channel layer scale (a 1-D vector in timm, so exempt there; (C, 1, 1) here).
NO_WEIGHT_DECAY = ("class_token", "encoder.pos_embedding", "*.relative_position_bias_table", "*.cpb_mlp.*",
                   "*.logit_scale", "*.layer_scale")


def _prefix(name: str, table: dict[str, Any] | tuple[str, ...]) -> str | None:
    return next((prefix for prefix in table if name.startswith(prefix)), None)


def resnet_groups(model: nn.Module) -> list[Group]:
    """ResNet / ResNeXt / Wide ResNet (ours too): the notebook's own names."""
    return [("stem", ("conv1", "bn1")), *((name, (name,)) for name in groups.RESNET_GROUPS[1:])]


def _regnet(model: nn.Module) -> list[Group]:
    stages = [(f"stage{i}", (f"trunk_output.{name}",))
              for i, (name, _) in enumerate(model.trunk_output.named_children(), start=1)]
    return [("stem", ("stem",)), *stages, ("head", ("fc",))]


def _vit(model: nn.Module, stages: int = 4) -> list[Group]:
    """ViT: patch projection, class token and position embedding are the stem; the encoder layers form
    `stages` consecutive stages of equal size (as a ResNet's four); the final norm and the heads the head."""
    layers = [f"encoder.layers.{name}" for name, _ in model.encoder.layers.named_children()]
    size = -(-len(layers) // stages)
    chunks = [tuple(layers[i:i + size]) for i in range(0, len(layers), size)]
    named = [(f"stage{i}", chunk) for i, chunk in enumerate(chunks, start=1)]
    return [("stem", ("conv_proj", "class_token", "encoder.pos_embedding")), *named,
            ("head", ("encoder.ln", "heads"))]


def tv_models() -> Any:
    """torchvision.models, imported on first use."""
    import torchvision.models

    return torchvision.models


@functools.cache
def families() -> dict[type, Callable[[nn.Module], list[Group]]]:
    """How to find stem / stages / head, by the model's class; other models with a `features` sequence split
    like a CNN's (groups.features_groups), anything else by its top-level children."""
    models = tv_models()
    return {
        models.ResNet: resnet_groups,
        models.ConvNeXt: groups.features_groups,
        models.EfficientNet: groups.features_groups,
        models.MobileNetV2: groups.features_groups,
        models.MobileNetV3: groups.features_groups,
        models.VisionTransformer: _vit,
        models.RegNet: _regnet,
    }


def imagenet_state_dict(name: str) -> Mapping[str, object]:
    """torchvision's default ImageNet weights, from torch hub's cache or downloaded into it."""
    found = tv_models().get_model_weights(name).DEFAULT
    cache_file = weights.hub_cache_file(found.url)
    was_cached = os.path.exists(cache_file)
    try:
        with weights.stall_timeout():
            return found.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as exc:  # no network (URLError), bad hash, unreadable file
        if was_cached:
            raise UserError(
                f"cached ImageNet weights {cache_file} are unreadable ({one_line(exc, typed=True)}); "
                f"delete that file to download it again, or pass --pretrained PATH"
            ) from exc
        raise UserError(
            f"cannot download ImageNet weights for {name} from {found.url} ({one_line(exc, typed=True)}); "
            f"put that file at {cache_file}, or pass --pretrained PATH"
        ) from exc


def weights_status(name: str) -> str:
    """"cached" or "download" for the default ImageNet weights of `name` (see base.Listed)."""
    url = tv_models().get_model_weights(name).DEFAULT.url
    return "cached" if os.path.exists(weights.hub_cache_file(url)) else "download"


class Torchvision(Source):
    name = "torchvision"
    prefix = "tv/"
    syntax = "tv/NAME or a bare torchvision classification model name (convnext_tiny, vit_b_16, ...)"

    def names(self) -> list[str]:
        return list(_names())

    def knows(self, name: str) -> bool:
        return name in _names()

    def fresh(self, name: str, num_classes: int, image_size: int) -> nn.Module:
        family = _prefix(name, CONSTRUCTOR)
        kwargs = CONSTRUCTOR[family](image_size) if family else {}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=UserWarning)  # e.g. googlenet's init notice
                model = tv_models().get_model(name, weights=None, **kwargs)
        except (AssertionError, ValueError, RuntimeError) as e:
            raise UserError(f"--arch {name} cannot be built for --image-size {image_size}: {e}") from None
        replace_head(model, num_classes)
        return model

    def state_dict(self, name: str, pretrained: str) -> tuple[Mapping[str, object], str]:
        if pretrained == "imagenet":
            return imagenet_state_dict(name), f"ImageNet weights for {name}"
        return super().state_dict(name, pretrained)

    def spec(self, name: str, pretrained: str, crop_pct: float) -> InputSpec:
        """ImageNet weights bring their own statistics, crop ratio (crop size / resize size) and interpolation;
        otherwise ImageNet statistics and `crop_pct`."""
        patch = re.fullmatch(r"vit_\w_(\d+)", name)
        multiple, fixed = int(patch[1]) if patch else 1, bool(_prefix(name, SIZED))
        transforms = tv_models().get_model_weights(name).DEFAULT.transforms()
        native = transforms.crop_size[0]
        if pretrained != "imagenet":
            return InputSpec(crop_pct=crop_pct, input_size=native, multiple=multiple, fixed=fixed)
        return InputSpec(mean=tuple(transforms.mean), std=tuple(transforms.std),
                         crop_pct=transforms.crop_size[0] / transforms.resize_size[0],
                         interpolation=transforms.interpolation.value, input_size=native, multiple=multiple,
                         fixed=fixed)

    def size_problem(self, name: str, image_size: int, pretrained: str) -> str | None:
        if pretrained == "imagenet" and _prefix(name, SIZED):
            size = tv_models().get_model_weights(name).DEFAULT.transforms().crop_size[0]
            if image_size != size:
                return f"--arch {name} with --pretrained imagenet needs --image-size {size}, got {image_size}"
        return None

    def owns(self, model: nn.Module) -> bool:
        return type(model).__module__.startswith("torchvision.")

    def groups(self, model: nn.Module) -> list[Group]:
        family = families().get(type(model))
        if family is None and isinstance(getattr(model, "features", None), nn.Sequential):
            family = groups.features_groups
        return family(model) if family else super().groups(model)

    def no_weight_decay(self, model: nn.Module) -> tuple[str, ...]:
        return NO_WEIGHT_DECAY

    def listing(self, matches: Callable[[str], bool]) -> list[Listed]:
        rows = []
        for name in _names():
            if matches(name) or matches(self.prefix + name):
                spec = self.spec(name, "imagenet", 0.875)
                note = "built for --image-size; ImageNet weights at 224 only" if spec.fixed else ""
                rows.append(Listed(self.prefix + name, spec.input_size, weights_status(name), note))
        return rows


@functools.cache
def _names() -> tuple[str, ...]:
    """torchvision's classification models, less the unsupported families."""
    return tuple(name for name in tv_models().list_models(module=tv_models())
                 if not name.startswith(tuple(UNSUPPORTED)))


def replace_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """Put a fresh `num_classes` nn.Linear where the classifier head is (same inputs and bias)."""
    name = groups.head_name(model)
    old = model.get_submodule(name)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return new


SOURCE = Torchvision()
