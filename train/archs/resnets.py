"""Our own ResNet 18/34/50/101/152 (train.resnet, the notebook's): the default `--arch`. Parameter names are
torchvision's, so torchvision's ImageNet weights load; any image size; the notebook's LR groups."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from train.archs import torchvision_zoo
from train.archs.base import InputSpec, Listed, Source
from train.groups import Group
from train.resnet import RESNETS, ResNet


class Resnets(Source):
    name = "ours"
    prefix = ""
    syntax = "resnet18 .. resnet152 (our own, the notebook's)"

    def names(self) -> list[str]:
        return list(RESNETS)

    def knows(self, name: str) -> bool:
        return name in RESNETS

    def fresh(self, name: str, num_classes: int, image_size: int) -> nn.Module:
        block, layers = RESNETS[name]
        return ResNet(block, layers, num_classes=num_classes)

    def state_dict(self, name: str, pretrained: str) -> tuple[Mapping[str, object], str]:
        if pretrained == "imagenet":  # torchvision's file for the same depth
            return torchvision_zoo.imagenet_state_dict(name), f"ImageNet weights for {name}"
        return super().state_dict(name, pretrained)

    def spec(self, name: str, pretrained: str, crop_pct: float) -> InputSpec:
        """ImageNet statistics and the --crop-pct option, with or without weights (the notebook's)."""
        return InputSpec(crop_pct=crop_pct)

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, ResNet)

    def head(self, model: nn.Module) -> nn.Module:
        return model.fc

    def groups(self, model: nn.Module) -> list[Group]:
        return torchvision_zoo.resnet_groups(model)

    def listing(self, matches: Callable[[str], bool]) -> list[Listed]:
        return [Listed(name, 224, torchvision_zoo.weights_status(name), "ours: any --image-size")
                for name in RESNETS if matches(name)]


SOURCE = Resnets()
