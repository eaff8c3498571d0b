"""timm models through their adapter: groups from each model's own group_matcher, the head, penultimate
features, exact loading of local checkpoints (file, safetensors, a Hugging Face cache folder), published
weights through timm's hub path from an offline cache, the offline error, and every command on a timm run.
Nothing is downloaded: checkpoints are made with timm itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from support import ONE_THREAD, assert_one_line_error, run_cli, run_main

from pipeline.errors import UserError
from pipeline.manifest import load_manifest
from train import model as models

# One per family the issue names, at the smallest size that exercises it from scratch, and its group names.
STAGES = [f"stage{i}" for i in range(1, 13)]
FAMILIES = {
    "timm/resnet10t": (48, ["stem", *STAGES[:4], "head"]),  # a ResNet-D
    "timm/convnext_atto": (32, ["stem", *STAGES[:4], "head"]),
    "timm/efficientnet_b0": (48, ["stem", *STAGES[:7], "head"]),
    "timm/regnetx_002": (48, ["stem", *STAGES[:4], "head"]),
    "timm/vit_tiny_patch16_224": (32, ["stem", *STAGES, "head"]),  # built for 32 px: a 2 x 2 patch grid
}


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_groups_head_and_features_of_each_family(arch: str) -> None:
    size, expected = FAMILIES[arch]
    model = models.build_model(arch, 6, "none", size).eval()
    assert models.group_names(model) == expected
    owner = models.assign(model)
    assert set(owner) == {name for name, _ in model.named_parameters()}
    assert set(owner.values()) == set(expected)
    head = models.head_of(model)
    assert head is model.get_classifier() and head.out_features == 6
    assert {name for name, group in owner.items() if group == "head"} >= {
        name for name, p in model.named_parameters() if any(p is q for q in head.parameters())}
    stem = [name for name, group in owner.items() if group == "stem"]
    assert stem and all(not name.startswith(("head", "fc", "classifier")) for name in stem)
    with torch.no_grad():  # evaluate's embeddings: timm's pre-logits, which the head turns into the logits
        features, logits = models.forward_with_features(model, torch.randn(2, 3, size, size))
        assert features.shape == (2, head.in_features)
        torch.testing.assert_close(head(features), logits)


def test_a_distilled_deit_has_both_heads_remade(tmp_path: Path) -> None:
    """A DeiT with a distillation head: both classifiers the model's metadata names are the head."""
    torch.manual_seed(0)
    source = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, num_classes=10)
    save_file(source.state_dict(), str(tmp_path / "deit.safetensors"))
    model = models.build_model("timm/deit_tiny_distilled_patch16_224", 6, str(tmp_path / "deit.safetensors"), 32)
    assert model.head.out_features == model.head_dist.out_features == 6
    assert models.group_names(model)[-1] == "head" and len(models.group_names(model)) > 2
    theirs = source.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items() if not k.startswith("head"))


def _checkpoint(arch: str, num_classes: int = 1000, **kwargs: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs).state_dict()


@pytest.mark.parametrize("form", ["safetensors", "pth", "hf_cache_folder"])
def test_local_checkpoint_loads_every_tensor_but_the_head(tmp_path: Path, form: str) -> None:
    state = _checkpoint("convnext_atto")
    if form == "pth":
        path = tmp_path / "convnext_atto.pth"
        torch.save(state, path)
    elif form == "safetensors":
        path = tmp_path / "convnext_atto.safetensors"
        save_file(state, str(path))
    else:  # the Hugging Face hub cache layout: refs/main names the snapshot holding model.safetensors
        path = tmp_path / "models--timm--convnext_atto.d2_in1k"
        (path / "snapshots" / "abc123").mkdir(parents=True)
        (path / "refs").mkdir()
        (path / "refs" / "main").write_text("abc123")
        save_file(state, str(path / "snapshots" / "abc123" / "model.safetensors"))
    model = models.build_model("timm/convnext_atto", 6, str(path), 32)
    own = model.state_dict()
    loaded = [key for key in own if not key.startswith("head.fc.")]
    assert len(loaded) == len(state) - 2 and all(torch.equal(own[key], state[key]) for key in loaded)
    assert own["head.fc.weight"].shape == (6, 320)  # made anew for the data set's classes


def test_a_folder_without_weights_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "models--timm--convnext_atto.d2_in1k" / "snapshots" / "abc").mkdir(parents=True)
    with pytest.raises(UserError, match="holds none of model.safetensors, pytorch_model.bin"):
        models.build_model("timm/convnext_atto", 6, str(tmp_path / "models--timm--convnext_atto.d2_in1k"), 32)


def test_a_vit_checkpoint_loads_at_another_image_size(tmp_path: Path) -> None:
    """timm's own conversion (the model module's checkpoint filter) resamples a ViT's position embedding."""
    state = _checkpoint("vit_tiny_patch16_224", img_size=64)
    save_file(state, str(tmp_path / "vit.safetensors"))
    model = models.build_model("timm/vit_tiny_patch16_224", 6, str(tmp_path / "vit.safetensors"), 32)
    own = model.state_dict()
    assert own["pos_embed"].shape == (1, 5, 192) and state["pos_embed"].shape == (1, 17, 192)
    assert all(torch.equal(own[k], state[k]) for k in own if k != "pos_embed" and not k.startswith("head."))


def test_a_missing_or_misshapen_tensor_is_one_line_naming_it(tmp_path: Path) -> None:
    state = _checkpoint("convnext_atto")
    missing = {k: v for k, v in state.items() if k != "stages.2.blocks.1.conv_dw.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserError, match=r"1 missing keys \[stages\.2\.blocks\.1\.conv_dw\.weight\]"):
        models.build_model("timm/convnext_atto", 6, str(tmp_path / "missing.safetensors"), 32)
    wrong = {**state, "stem.0.weight": torch.zeros(40, 3, 2, 2)}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(UserError, match=r"1 tensors of wrong shape \[stem\.0\.weight \(40, 3, 2, 2\) vs \(40, 3, 4, 4\)\]"):
        models.build_model("timm/convnext_atto", 6, str(tmp_path / "wrong.safetensors"), 32)


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache with the hub in offline mode: nothing can be downloaded."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_published_weights_come_through_timms_hub_cache(offline_hub: Path) -> None:
    """--pretrained imagenet goes through timm's normal download and cache; a cached file stands in for it."""
    state = _checkpoint("convnext_atto")
    snapshot = offline_hub / "models--timm--convnext_atto.d2_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    model = models.build_model("timm/convnext_atto", 6, "imagenet", 32)
    own = model.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in own if not k.startswith("head.fc."))
    assert own["head.fc.weight"].shape == (6, 320)
    spec = models.preprocessing("timm/convnext_atto", "imagenet", 0.5)  # the tag's, not the option's
    assert spec == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 0.875,
                    "interpolation": "bicubic"}


def test_offline_published_weights_say_where_to_put_them(offline_hub: Path) -> None:
    with pytest.raises(UserError) as exc:
        models.build_model("timm/convnext_atto", 6, "imagenet", 32)
    message = str(exc.value)
    assert "\n" not in message and "hf download timm/convnext_atto.d2_in1k" in message
    assert str(offline_hub / "models--timm--convnext_atto.d2_in1k") in message


def test_unknown_timm_names_are_one_line_with_the_closest(tmp_path: Path, train_shards: Path, capsys) -> None:
    base = ("fit", "--shards", str(train_shards), "--run-dir", str(tmp_path / "run"), "--pretrained", "none")
    assert_one_line_error(run_main(capsys, *base, "--arch", "timm/convnext_attto"), "'timm/convnext_attto'",
                          "did you mean timm/convnext_atto", "python -m train models")
    assert_one_line_error(run_main(capsys, *base, "--arch", "timm/convnext_atto.no_such_tag"),
                          "timm/convnext_atto")
    assert_one_line_error(run_main(capsys, *base, "--arch", "convnext_atto"), "did you mean timm/convnext_atto")
    assert not (tmp_path / "run").exists()


def test_models_lists_each_source_with_size_and_weights(capsys) -> None:
    result = run_main(capsys, "models", "convnext_at")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.startswith("  timm/")}
    assert rows["timm/convnext_atto"][:2] == ["224", "download"] and "d2_in1k" in rows["timm/convnext_atto"][-1]
    assert rows["timm/convnext_atto_rms"] == ["224", "none"]  # no published weights: a local file or none
    result = run_main(capsys, "models", "vit_b_1?")
    assert "tv/vit_b_16" in result.stdout and "timm/" not in result.stdout.replace("timm/NAME", "")
    assert_one_line_error(run_main(capsys, "models", "convnxt_atto"), "no model matches", "timm/convnext_atto")


def _step_lrs(run: Path) -> list[dict[str, float]]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["lr"] for r in records if r["kind"] == "step"]


def _fit(train_shards: Path, run: Path, arch: str, size: int, *extra: str):
    return run_cli("train", "fit", "--shards", str(train_shards), "--arch", arch, "--image-size", str(size),
                   "--batch-size", "32", "--workers", "0", "--wandb", "disabled", "--log-every", "1", "--lr", "0.002",
                   "--epochs", "1", "--run-dir", str(run), "--keep-checkpoints", "1", "--ema-decay", "0", "--tta", "none",
                   "--no-plots", *extra, env=ONE_THREAD)  # EMA and TTA: tests of their own (the bf16 resume has both)


@pytest.mark.e2e
@pytest.mark.parametrize("arch", [a for a in FAMILIES if a != "timm/convnext_atto"])
def test_each_family_trains_with_its_groups(arch: str, train_shards: Path, tmp_path: Path) -> None:
    """fit from scratch, in its own process; every step logs the LR of every group, by the notebook scheme."""
    size, expected = FAMILIES[arch]
    result = _fit(train_shards, tmp_path / "run", arch, size, "--pretrained", "none", "--lr-scheme", "notebook")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = _step_lrs(tmp_path / "run")
    assert steps and all(list(lrs) == expected for lrs in steps) and len(expected) > 2
    depth = {name: len(expected) - 1 - i for i, name in enumerate(expected)}
    assert all(lrs[g] / lrs["head"] == pytest.approx(1 / (2 * d) if d else 1.0) for lrs in steps
               for g, d in depth.items())


@pytest.mark.e2e
def test_every_command_on_a_timm_run(train_shards: Path, tmp_path: Path) -> None:
    """ConvNeXt from a local timm checkpoint: fit (geometric groups), lr-find, evaluate (embeddings from the
    pre-logits), predict and export (TorchScript, the format auto picks for it)."""
    weights_file = tmp_path / "convnext_atto.safetensors"
    save_file(_checkpoint("convnext_atto"), str(weights_file))
    run, expected = tmp_path / "run", FAMILIES["timm/convnext_atto"][1]
    result = _fit(train_shards, run, "timm/convnext_atto", 32, "--pretrained", str(weights_file),
                  "--lr-scheme", "geometric", "--lr-decay", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = _step_lrs(run)
    assert steps and all(list(lrs) == expected for lrs in steps)
    assert all(lrs["stem"] / lrs["head"] == pytest.approx(0.5 ** 5) for lrs in steps)
    meta = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["arch"] == "timm/convnext_atto" and meta["interpolation"] == "bicubic"  # the tag's spec

    result = run_cli("train", "lr-find", "--shards", str(train_shards), "--arch", "timm/convnext_atto",
                     "--pretrained", "none", "--image-size", "32", "--batch-size", "8", "--workers", "0",
                     "--out", str(tmp_path / "lr"), "--steps", "20", "--end-lr", "1", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    values = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert len(values["lrs"]) <= 20 and values["lrs"][0] <= values["suggested_lr"] < values["lrs"][-1]

    result = run_cli("train", "evaluate", "--checkpoint", str(run), "--shards", str(train_shards), "--workers", "0",
                     "--batch-size", "32", "--out", str(tmp_path / "eval"), "--no-plots", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    test_samples = load_manifest(str(train_shards))["splits"]["test"]["num_samples"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_samples"] == test_samples
    assert (tmp_path / "eval" / "predictions.csv").read_text().count("\n") == test_samples + 1

    images = sorted((train_shards.parent / "CUB_200_2011" / "images").rglob("*.jpg"))[:2]
    result = run_cli("train", "predict", "--checkpoint", str(run), "--json", *map(str, images), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == list(map(str, images)) and all(len(x["top5"]) == 5 for x in lines)

    result = run_cli("train", "export", "--checkpoint", str(run), "--out", str(tmp_path / "model.pt"), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(torchscript)" in result.stdout and "max abs logit difference" in result.stdout
    assert (tmp_path / "model.pt").stat().st_size > 0
