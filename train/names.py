"""The values of every option with a fixed set of choices, and the --arch syntax of each model source, as
plain names: the command line checks them and `--help` shows them without importing the registries that
define them (the augmentation presets, optimizers, LR schemes, TTA modes, export formats and model sources import
torch, which takes seconds). tests/test_cli.py checks that each list equals its registry."""

from __future__ import annotations

AUGMENT_PRESETS = ("standard", "notebook", "none")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEMES = ("auto", "notebook", "geometric", "flat")
PRECISIONS = ("auto", "no", "fp16", "bf16")
WANDB_MODES = ("auto", "online", "offline", "disabled")
TTA_MODES = ("none", "flip")
EXPORT_FORMATS = ("auto", "torchscript", "onnx")
ARCH_SYNTAX = ("resnet18 .. resnet152 (our own, the notebook's)",
               "tv/NAME or a bare torchvision classification model name (convnext_tiny, vit_b_16, ...)",
               "timm/NAME or timm/NAME.TAG (timm's models; tags choose the pretrained weights)")
