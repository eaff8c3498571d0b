"""Optimizer hygiene through every model source: which parameters get no weight decay (norms, biases and the
embeddings each family has, written out here by hand from the models' parameter names), and layer-wise LR
decay (`--lr-scheme geometric`) through each source's groups, per block for a timm ViT. Tiny models, no
weights, no training."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from torch import nn

from train import model as models
from train.optim import lr_multipliers, param_groups

WD = 0.05


def _tv_vit() -> nn.Module:  # torchvision's ViT class at a tiny width (vit_b_16 is 86M parameters)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=12, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=6)


def _tv_swin(v2: bool) -> nn.Module:
    extra = ({"block": torchvision.models.swin_transformer.SwinTransformerBlockV2,
              "downsample_layer": torchvision.models.swin_transformer.PatchMergingV2} if v2 else {})
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                              window_size=[2, 2], num_classes=6, **extra)


def _endswith(*suffixes: str):
    return lambda names: {name for name in names if name.endswith(suffixes)}


# family -> (build, which of the model's parameters with 2+ dimensions get no decay)
FAMILIES = {
    "ours resnet18": (lambda: models.build_model("resnet18", 6, "none", 32), lambda names: set()),
    "tv convnext_tiny": (lambda: models.build_model("convnext_tiny", 6, "none", 32), _endswith(".layer_scale")),
    "tv vit": (_tv_vit, lambda names: {"class_token", "encoder.pos_embedding"}),
    "tv swin": (lambda: _tv_swin(False), _endswith(".relative_position_bias_table")),
    "tv swin_v2": (lambda: _tv_swin(True),
                   lambda names: {n for n in names if n.endswith((".cpb_mlp.0.weight", ".cpb_mlp.2.weight",
                                                                  ".logit_scale"))}),
    "timm resnet10t": (lambda: models.build_model("timm/resnet10t", 6, "none", 48), lambda names: set()),
    "timm vit_tiny": (lambda: models.build_model("timm/vit_tiny_patch16_224", 6, "none", 32),
                      lambda names: {"cls_token", "pos_embed"}),
}


@functools.cache
def built(family: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family][0]()


def names_by_decay(model: nn.Module, scheme: str = "flat", decay: float = 0.5) -> tuple[set[str], set[str]]:
    """(decayed, not decayed) parameter names of the optimizer groups fit builds."""
    groups = param_groups(model, 1e-3, WD, lr_multipliers(scheme, decay, models.group_names(model)))
    name_of = {id(p): name for name, p in model.named_parameters()}
    decayed = {name_of[id(p)] for g in groups if g["weight_decay"] == WD for p in g["params"]}
    exempt = {name_of[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert len(decayed) + len(exempt) == len(name_of)
    return decayed, exempt


@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_decay_on_norms_biases_and_embeddings(family: str) -> None:
    model = built(family)
    shapes = {name: p.ndim for name, p in model.named_parameters()}
    extra = FAMILIES[family][1](set(shapes))
    assert all(shapes[name] > 1 for name in extra)  # not already exempt as 1-D
    if "vit" in family or "swin" in family:
        assert extra
    decayed, exempt = names_by_decay(model)
    assert exempt == {name for name, ndim in shapes.items() if ndim <= 1} | extra
    assert decayed == {name for name, ndim in shapes.items() if ndim > 1} - extra


def test_embeddings_found_through_the_compile_wrapper() -> None:
    """--compile wraps the model (names gain `_orig_mod.`); its embeddings still get no decay."""
    compiled = torch.compile(built("timm vit_tiny"))
    decayed, exempt = names_by_decay(compiled)
    assert {"_orig_mod.cls_token", "_orig_mod.pos_embed"} <= exempt
    assert "_orig_mod.patch_embed.proj.weight" in decayed


def test_a_models_own_no_weight_decay_patterns_are_asked() -> None:
    """Any model with timm's `no_weight_decay()` convention: its names and wildcard patterns are honoured."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Parameter(torch.zeros(1, 4, 4))
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1))
            self.body[1].register_parameter("table", nn.Parameter(torch.zeros(3, 3)))
            self.fc = nn.Linear(4, 2)

        def no_weight_decay(self) -> set[str]:
            return {"query", "*.table"}

    decayed, exempt = names_by_decay(Tokens())
    assert exempt == {"query", "body.1.table", "body.0.bias", "body.1.bias", "fc.bias"}
    assert decayed == {"body.0.weight", "body.1.weight", "fc.weight"}


def lr_of(model: nn.Module, scheme: str, decay: float) -> dict[str, float]:
    groups = param_groups(model, 1.0, WD, lr_multipliers(scheme, decay, models.group_names(model)))
    name_of = {id(p): name for name, p in model.named_parameters()}
    return {name_of[id(p)]: g["lr"] for g in groups for p in g["params"]}


def test_timm_vit_gets_layer_wise_decay_per_block() -> None:
    """timm's ViT groups: the embeddings, each of the 12 blocks, the head; geometric decays per block."""
    lrs = lr_of(built("timm vit_tiny"), "geometric", 0.75)
    assert lrs["head.weight"] == 1.0
    for block in range(12):
        for param in (f"blocks.{block}.attn.qkv.weight", f"blocks.{block}.norm1.bias"):
            assert lrs[param] == pytest.approx(0.75 ** (12 - block), rel=1e-12), param
    assert lrs["norm.weight"] == pytest.approx(0.75)  # the final norm goes with the last block, as in timm
    for param in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        assert lrs[param] == pytest.approx(0.75**13, rel=1e-12)


def test_torchvision_vit_decays_per_stage_of_blocks() -> None:
    """torchvision's ViT is grouped into four stages of consecutive blocks (not one group per block): the
    layer-wise decay steps once per stage."""
    lrs = lr_of(built("tv vit"), "geometric", 0.5)
    for layer in range(12):
        stage = layer // 3 + 1
        assert lrs[f"encoder.layers.encoder_layer_{layer}.mlp.0.weight"] == pytest.approx(0.5 ** (5 - stage))
    assert lrs["class_token"] == lrs["encoder.pos_embedding"] == pytest.approx(0.5**5)
    assert lrs["heads.head.weight"] == lrs["encoder.ln.weight"] == 1.0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_parameter_gets_its_groups_geometric_lr(family: str) -> None:
    """Through every source's groups: the head group's LR is the base LR, each group below it decay times
    the one above, whichever half (decay / no decay) a parameter is in."""
    model = built(family)
    names = models.group_names(model)
    owner = models.assign(model)
    lrs = lr_of(model, "geometric", 0.7)
    for name, lr in lrs.items():
        assert lr == pytest.approx(0.7 ** (len(names) - 1 - names.index(owner[name])), rel=1e-12), name
