"""Discriminative LR groups: the stem, the stages in depth order, the head. The model sources
(train.archs) say which modules form each group; this module holds the splits several sources share and
the assignment of every parameter to exactly one group.

A group is a name and the module paths (or parameter names) it owns.
"""

from __future__ import annotations

from torch import nn

Group = tuple[str, tuple[str, ...]]  # (group name, module-path prefixes or parameter names)
WRAPPERS = ("module.", "_orig_mod.")  # prefixes added by DDP and torch.compile
RESNET_GROUPS = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")  # the notebook's names


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP ("module") and torch.compile ("_orig_mod") wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def bare_name(name: str) -> str:
    """A parameter or module name without the DDP and torch.compile wrappers' prefixes."""
    while name.startswith(WRAPPERS):
        name = name.split(".", 1)[1]
    return name


def head_name(model: nn.Module) -> str:
    """The classifier head: the last nn.Linear of the model (torchvision's `fc`, `classifier[-1]`,
    `heads.head`, ...); its input is the penultimate feature vector."""
    names = [name for name, module in unwrap(model).named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier head")
    return names[-1]


def downsamples(module: nn.Module) -> bool:
    """Whether a block lowers the resolution (a strided convolution or pooling inside it)."""
    for inner in module.modules():
        stride = getattr(inner, "stride", 1) if isinstance(inner, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d) else 1
        if max(stride if isinstance(stride, tuple) else (stride,)) > 1:
            return True
    return False


def features_groups(model: nn.Module) -> list[Group]:
    """A model with a `features` sequence (ConvNeXt, EfficientNet, MobileNet, DenseNet, VGG, ...): its first
    block is the stem; the other blocks form a new stage wherever one lowers the resolution; the rest
    (pooling, classifier) is the head."""
    blocks = list(model.features.named_children())
    stages: list[list[str]] = []
    for name, block in blocks[1:]:
        if not stages or downsamples(block):
            stages.append([])
        stages[-1].append(f"features.{name}")
    named = [(f"stage{i}", tuple(paths)) for i, paths in enumerate(stages, start=1)]
    rest = tuple(name for name, _ in model.named_children() if name != "features")
    return [("stem", (f"features.{blocks[0][0]}",)), *named, ("head", rest)]


def children_groups(model: nn.Module, head: str) -> list[Group]:
    """Top-level children in order: the first is the stem, the one holding the module `head` is the head (with
    everything after it), the others stages. Top-level parameters join the stem."""
    children = [name for name, _ in model.named_children()]
    cut = children.index(head.split(".", 1)[0])
    own = tuple(name for name, _ in model.named_parameters(recurse=False))
    stem = (*own, children[0]) if cut > 0 else own
    stages = [(f"stage{i}", (name,)) for i, name in enumerate(children[1:cut], start=1)]
    return [("stem", stem), *stages, ("head", tuple(children[cut:]))]


def owners(model: nn.Module, found: list[Group]) -> dict[str, str]:
    """Parameter name (as `model.named_parameters()` gives it, wrappers included) -> its group in `found`;
    ValueError for a parameter no group owns (a split that misses part of a model)."""
    owner = {path: name for name, paths in found for path in paths}
    result = {}
    for full, _ in model.named_parameters():
        path = bare_name(full)
        while path not in owner and "." in path:
            path = path.rsplit(".", 1)[0]
        if path not in owner:
            raise ValueError(f"parameter {full!r} of {type(unwrap(model)).__name__} belongs to no LR group")
        result[full] = owner[path]
    return result
