"""Architectures as plug-ins: each torchvision family trains (fit), finds an LR, evaluates, predicts and exports;
its discriminative groups are the stem, the stages in depth order and the head, with every parameter in
exactly one group; the report's embeddings are its head's input (checked in-process: the report's plots have
tests of their own)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support import ONE_THREAD, assert_one_line_error, run_cli, run_main
from torch import nn

from pipeline.errors import UserError
from pipeline.manifest import load_manifest
from train import model as models
from train.model import assign, group_names, groups_of

# Each family's smallest size that exercises it (ConvNeXt needs 32 px; a ViT a multiple of its patch: one
# patch keeps ViT-B/16, 86M parameters, cheap), and
# its groups, written out by hand from torchvision's module trees.
ARCHS = {
    "convnext_tiny": (32, ["stem", "stage1", "stage2", "stage3", "stage4", "head"]),
    "efficientnet_b0": (32, ["stem", "stage1", "stage2", "stage3", "stage4", "stage5", "head"]),
    "mobilenet_v3_large": (32, ["stem", "stage1", "stage2", "stage3", "stage4", "stage5", "head"]),
    "vit_b_16": (16, ["stem", "stage1", "stage2", "stage3", "stage4", "head"]),
    "regnet_y_800mf": (32, ["stem", "stage1", "stage2", "stage3", "stage4", "head"]),
}
# The head's parameters and one known member of the first and the last stage, per family.
MEMBERS = {
    "convnext_tiny": ("classifier.2.weight", "features.1.0.block.0.weight", "features.7.2.block.0.weight"),
    "efficientnet_b0": ("classifier.1.weight", "features.1.0.block.0.0.weight", "features.8.0.weight"),
    "mobilenet_v3_large": ("classifier.3.weight", "features.1.block.0.0.weight", "features.16.0.weight"),
    "vit_b_16": ("heads.head.weight", "encoder.layers.encoder_layer_0.ln_1.weight",
                 "encoder.layers.encoder_layer_11.mlp.3.weight"),
    "regnet_y_800mf": ("fc.weight", "trunk_output.block1.block1-0.proj.0.weight",
                       "trunk_output.block4.block4-0.proj.0.weight"),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_groups_of_each_family(arch: str) -> None:
    """Groups in depth order, head last; every parameter in exactly one group (no training)."""
    size, expected = ARCHS[arch]
    model = models.build_model(arch, 6, "none", size)
    assert group_names(model) == expected
    owner = assign(model)
    assert set(owner) == {name for name, _ in model.named_parameters()}  # each parameter once (a dict)
    assert set(owner.values()) == set(expected)  # no empty group
    head, first, last = MEMBERS[arch]
    assert owner[head] == expected[-1] and owner[first] == "stage1" and owner[last] == expected[-2]
    assert models.head_of(model).out_features == 6 and model.get_submodule(head.rsplit(".", 1)[0]) is \
        models.head_of(model)
    paths = [path for _, paths in groups_of(model) for path in paths]
    assert len(paths) == len(set(paths))
    head_module = models.head_of(model)
    with torch.no_grad():  # evaluate's embeddings: the head's input, whatever the family
        features, logits = models.forward_with_features(model.eval(), torch.randn(2, 3, size, size))
        assert features.shape == (2, head_module.in_features)
        torch.testing.assert_close(head_module(features), logits)


def test_generic_fallback_uses_top_level_children() -> None:
    model = nn.Sequential()
    model.add_module("embed", nn.Conv2d(3, 4, 3))
    model.add_module("body", nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()))
    model.add_module("pool", nn.Flatten())
    model.add_module("out", nn.Linear(4, 2))
    assert groups_of(model) == [("stem", ("embed",)), ("stage1", ("body",)), ("stage2", ("pool",)),
                                ("head", ("out",))]
    assert set(assign(model).values()) == {"stem", "stage1", "head"}  # "pool" holds no parameter


@pytest.mark.parametrize(("arch", "size", "works"), [
    ("alexnet", 32, 63), ("vgg11", 16, 32), ("convnext_tiny", 24, 32),
    ("timm/convnext_atto", 16, 32), ("timm/crossvit_tiny_240", 64, 240),
])
def test_a_size_too_small_for_the_model_is_found_before_any_work(arch: str, size: int, works: int) -> None:
    """A dry run on the meta device finds what the first forward pass would raise, and a size that works."""
    problem = models.size_problem(arch, size, "none")
    assert problem.startswith(f"--arch {arch} cannot take --image-size {size} (") and "\n" not in problem
    assert problem.endswith(f"; try --image-size {works}")
    assert models.size_problem(arch, works, "none") is None


def test_size_rules_are_one_line() -> None:
    assert models.size_problem("resnet18", 16, "none") is None  # ours: any size
    assert models.size_problem("regnet_y_800mf", 32, "none") is None  # built on the CPU: no meta init
    assert models.size_problem("vit_b_16", 40, "none") == "--arch vit_b_16 needs --image-size divisible by 16, got 40"
    assert models.size_problem("vit_b_16", 32, "imagenet") == \
        "--arch vit_b_16 with --pretrained imagenet needs --image-size 224, got 32"
    assert models.size_problem("convnext_tiny", 40, "imagenet") is None
    with pytest.raises(UserError, match="divisible by 16"):
        models.build_model("vit_b_16", 6, "none", 40)


def test_preprocessing_comes_from_the_weights() -> None:
    """torchvision's weights bring their own statistics, eval crop and resize filter (EfficientNet-V2-L: 0.5 /
    0.5, bicubic; from scratch: bilinear)."""
    assert models.preprocessing("efficientnet_v2_l", "imagenet", 0.875) == \
        {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 480 / 480, "interpolation": "bicubic"}
    assert models.preprocessing("efficientnet_b0", "imagenet", 0.875)["interpolation"] == "bicubic"
    assert models.preprocessing("efficientnet_b0", "none", 0.875)["interpolation"] == "bilinear"
    assert models.preprocessing("convnext_tiny", "imagenet", 0.875)["crop_pct"] == 224 / 236
    assert models.preprocessing("resnet50", "imagenet", 0.8)["crop_pct"] == 0.8  # ours: the option
    assert models.preprocessing("convnext_tiny", "none", 0.8)["mean"] == [0.485, 0.456, 0.406]


def test_run_meta_records_the_weights_eval_transform(train_shards: Path) -> None:
    """What predict / evaluate / export read back: ConvNeXt-T's ImageNet weights resize to 236 for 224."""
    from train.config import Config
    from train.evaluation import eval_transform, model_meta, norm_stats

    config = Config(arch="convnext_tiny", pretrained="imagenet", image_size=224, crop_pct=0.5)
    meta = model_meta(config, load_manifest(str(train_shards)))
    assert meta["eval_transform"] == {"resize_short": 236, "center_crop": 224}
    assert meta["crop_pct"] == 224 / 236 and meta["mean"] == [0.485, 0.456, 0.406]
    assert norm_stats(config) == (meta["mean"], meta["std"])
    assert eval_transform(config)(np.zeros((236, 300, 3), np.uint8), 0).shape == (224, 224, 3)
    config = dataclasses.replace(config, eval_image_size=256, tta="flip")  # scored larger than trained: the weights' ratio kept
    meta = model_meta(config, load_manifest(str(train_shards)))
    assert meta["eval_transform"] == {"resize_short": 270, "center_crop": 256} and meta["image_size"] == 224
    assert (meta["eval_image_size"], meta["tta"]) == (256, "flip")
    assert eval_transform(config)(np.zeros((270, 300, 3), np.uint8), 0).shape == (256, 256, 3)


def test_torchvision_imagenet_weights_load_from_the_hub_cache(tmp_path: Path, monkeypatch) -> None:
    """--pretrained imagenet on a torchvision arch goes through its weights API and torch hub's cache (a
    local file stands in for the download); the backbone is loaded, the head is new."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torchvision

    weights = torchvision.models.get_model_weights("mobilenet_v3_large").DEFAULT
    torch.manual_seed(3)
    state = torchvision.models.mobilenet_v3_large().state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1])
    model = models.build_model("mobilenet_v3_large", 6, "imagenet", 224)
    own = model.state_dict()
    assert all(torch.equal(own[key], state[key]) for key in own if not key.startswith("classifier.3."))
    assert own["classifier.3.weight"].shape == (6, 1280)


def _step_lrs(run: Path) -> list[dict[str, float]]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["lr"] for r in records if r["kind"] == "step"]


@pytest.mark.e2e
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_command_runs(arch: str, train_shards: Path, tmp_path: Path, capsys) -> None:
    """fit (1 epoch, from scratch), lr-find and evaluate as a user runs them, predict and export in-process, for
    each family."""
    size, expected = ARCHS[arch]
    run, common = tmp_path / "run", ("--shards", str(train_shards), "--arch", arch, "--pretrained", "none",
                                     "--image-size", str(size), "--batch-size", "32", "--workers", "0",
                                     "--wandb", "disabled", "--log-every", "1", "--lr", "0.002",
                                     "--lr-scheme", "notebook", "--optimizer", "sgd", "--momentum", "0")
    # (Plain SGD: no optimizer state, so ViT-B/16's 86M parameters step and checkpoint ~3x faster than with
    # AdamW's; optimizers, EMA, TTA and the report's plots have tests of their own.)
    result = run_cli("train", "fit", *common, "--epochs", "1", "--run-dir", str(run), "--keep-checkpoints", "1",
                     "--ema-decay", "0", "--tta", "none", "--no-plots", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    steps = _step_lrs(run)
    depth = {name: len(expected) - 1 - i for i, name in enumerate(expected)}  # the notebook scheme by hand
    assert steps and all(list(lrs) == expected for lrs in steps)
    assert all(lrs[g] / lrs["head"] == pytest.approx(1 / (2 * d) if d else 1.0) for lrs in steps
               for g, d in depth.items())
    test_samples = load_manifest(str(train_shards))["splits"]["test"]["num_samples"]
    assert json.loads((run / "results.json").read_text())["test"]["num_samples"] == test_samples

    result = run_cli("train", "lr-find", *common, "--out", str(tmp_path / "lr"), "--steps", "20", "--end-lr", "1",
                     "--batch-size", "8", env=ONE_THREAD)
    if result.returncode:  # from scratch on 6 tiny classes, the 20 noisy steps may never fall below the first loss
        assert_one_line_error(result, "lr-find: the smoothed loss never fell over the")
    else:
        values = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
        assert len(values["lrs"]) <= 20 and values["lrs"][0] <= values["suggested_lr"] < values["lrs"][-1]

    result = run_cli("train", "evaluate", "--checkpoint", str(run), "--shards", str(train_shards), "--workers", "0",
                     "--batch-size", "32", "--out", str(tmp_path / "eval"), "--no-plots", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_samples"] == test_samples
    assert (tmp_path / "eval" / "predictions.csv").read_text().count("\n") == test_samples + 1

    images = sorted((train_shards.parent / "CUB_200_2011" / "images").rglob("*.jpg"))[:2]
    result = run_main(capsys, "predict", "--checkpoint", str(run), "--json", *map(str, images))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == list(map(str, images)) and all(len(x["top5"]) == 5 for x in lines)

    result = run_main(capsys, "export", "--checkpoint", str(run), "--format", "torchscript", "--out",
                      str(tmp_path / "model.pt"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "max abs logit difference" in result.stdout


def test_bad_arch_and_size_are_one_line_before_any_work(train_shards: Path, tmp_path: Path, capsys) -> None:
    base = ("fit", "--shards", str(train_shards), "--run-dir", str(tmp_path / "run"), "--pretrained", "none")
    assert_one_line_error(run_main(capsys, *base, "--arch", "convnext_tinyy"), "--arch", "convnext_tiny",
                          "python -m train fit --help")
    assert_one_line_error(run_main(capsys, *base, "--arch", "vit_b_16", "--image-size", "40"),
                          "divisible by 16")
    assert_one_line_error(run_main(capsys, *base, "--arch", "alexnet", "--image-size", "32"),
                          "--arch alexnet cannot take --image-size 32", "try --image-size 63")
    assert_one_line_error(run_main(capsys, "lr-find", *base[1:], "--arch", "timm/convnext_atto", "--image-size", "16",
                                   "--out", str(tmp_path / "lr")), "try --image-size 32")
    assert not (tmp_path / "run").exists() and not (tmp_path / "lr").exists()
