"""Discriminative LR groups for any architecture: the stem, the stages in depth order, the head.

One table (`FAMILIES`) says how to find them per model family, keyed by the model's class; anything else
falls back to its top-level children in order (the first is the stem, the one holding the classifier head
is the head, the others are stages). A group is a name and the module paths it owns; every parameter
belongs to exactly one group.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

Group = tuple[str, tuple[str, ...]]  # (group name, module-path prefixes)
WRAPPERS = ("module.", "_orig_mod.")  # prefixes added by DDP and torch.compile


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP ("module") and torch.compile ("_orig_mod") wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def head_name(model: nn.Module) -> str:
    """The classifier head: the last nn.Linear of the model (torchvision's `fc`, `classifier[-1]`,
    `heads.head`, ...); its input is the penultimate feature vector."""
    names = [name for name, module in unwrap(model).named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier head")
    return names[-1]


RESNET_GROUPS = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")


def _resnet(model: nn.Module) -> list[Group]:
    """Ours and torchvision's ResNet / ResNeXt / Wide ResNet: the notebook's own names."""
    return [("stem", ("conv1", "bn1")), *((name, (name,)) for name in RESNET_GROUPS[1:])]


def _regnet(model: nn.Module) -> list[Group]:
    stages = [(f"stage{i}", (f"trunk_output.{name}",))
              for i, (name, _) in enumerate(model.trunk_output.named_children(), start=1)]
    return [("stem", ("stem",)), *stages, ("head", ("fc",))]


def _downsamples(module: nn.Module) -> bool:
    """Whether a block lowers the resolution (a strided convolution or pooling inside it)."""
    for inner in module.modules():
        stride = getattr(inner, "stride", 1) if isinstance(inner, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d) else 1
        if max(stride if isinstance(stride, tuple) else (stride,)) > 1:
            return True
    return False


def _features(model: nn.Module) -> list[Group]:
    """ConvNeXt, EfficientNet, MobileNet (and any model with a `features` sequence): its first block is the stem; the other blocks form a new stage
    wherever one lowers the resolution; the rest (pooling, classifier) is the head."""
    blocks = list(model.features.named_children())
    stages: list[list[str]] = []
    for name, block in blocks[1:]:
        if not stages or _downsamples(block):
            stages.append([])
        stages[-1].append(f"features.{name}")
    named = [(f"stage{i}", tuple(paths)) for i, paths in enumerate(stages, start=1)]
    rest = tuple(name for name, _ in model.named_children() if name != "features")
    return [("stem", (f"features.{blocks[0][0]}",)), *named, ("head", rest)]


def _vit(model: nn.Module, stages: int = 4) -> list[Group]:
    """ViT: patch projection, class token and position embedding are the stem; the encoder layers form
    `stages` consecutive stages of equal size (as a ResNet's four); the final norm and the heads the head."""
    layers = [f"encoder.layers.{name}" for name, _ in model.encoder.layers.named_children()]
    size = -(-len(layers) // stages)
    chunks = [tuple(layers[i:i + size]) for i in range(0, len(layers), size)]
    named = [(f"stage{i}", chunk) for i, chunk in enumerate(chunks, start=1)]
    return [("stem", ("conv_proj", "class_token", "encoder.pos_embedding")), *named,
            ("head", ("encoder.ln", "heads"))]


def _generic(model: nn.Module) -> list[Group]:
    """Top-level children in order: the first is the stem, the one holding the head is the head (with
    everything after it), the others stages. Top-level parameters join the stem."""
    children = [name for name, _ in model.named_children()]
    head_top = head_name(model).split(".", 1)[0]
    cut = children.index(head_top)
    own = tuple(name for name, _ in model.named_parameters(recurse=False))
    stem = (*own, children[0]) if cut > 0 else own
    stages = [(f"stage{i}", (name,)) for i, name in enumerate(children[1:cut], start=1)]
    return [("stem", stem), *stages, ("head", tuple(children[cut:]))]


# How to find stem / stages / head, by the model's class name (ours is "ResNet" too).
FAMILIES: dict[str, Callable[[nn.Module], list[Group]]] = {
    "ResNet": _resnet,
    "ConvNeXt": _features,
    "EfficientNet": _features,
    "MobileNetV2": _features,
    "MobileNetV3": _features,
    "VisionTransformer": _vit,
    "RegNet": _regnet,
}


def groups_of(model: nn.Module) -> list[Group]:
    """The model's groups, stem first, head last (empty groups left out)."""
    bare = unwrap(model)
    family = FAMILIES.get(type(bare).__name__)
    if family is None:  # any other model with a `features` sequence (DenseNet, VGG, ...) splits like a CNN's
        family = _features if isinstance(getattr(bare, "features", None), nn.Sequential) else _generic
    groups = family(bare)
    return [(name, paths) for name, paths in groups if paths]


def group_names(model: nn.Module) -> list[str]:
    return [name for name, _ in groups_of(model)]


def assign(model: nn.Module) -> dict[str, str]:
    """Parameter name (as `model.named_parameters()` gives it) -> its group; ValueError for a parameter that
    no group owns (a table entry that misses part of a model)."""
    owners = {path: name for name, paths in groups_of(model) for path in paths}
    found = {}
    for full, _ in model.named_parameters():
        name = full
        while name.startswith(WRAPPERS):
            name = name.split(".", 1)[1]
        path = name
        while path not in owners and "." in path:
            path = path.rsplit(".", 1)[0]
        if path not in owners:
            raise ValueError(f"parameter {full!r} of {type(unwrap(model)).__name__} belongs to no LR group")
        found[full] = owners[path]
    return found
