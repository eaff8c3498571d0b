"""Eval-time settings: flip TTA against a hand computation, the default eval size and its fallback for a model
built for one size, and the one-line refusals of bad eval settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import assert_one_line_error, run_main

from pipeline.errors import UserError
from train import evaltime
from train.model import build_model

VIT = "timm/vit_tiny_patch16_224"  # built for one image size: its position embedding fixes it


def test_flip_tta_is_the_mean_over_the_image_and_its_mirror() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 5, "none", 32).eval()
    images = torch.randn(4, 3, 32, 32)
    mirrored = images[:, :, :, torch.arange(31, -1, -1)]  # column j <- column 31 - j
    seen: list[torch.Tensor] = []
    model.fc.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))  # the penultimate features
    with torch.no_grad():
        plain, flipped = model(images), model(mirrored)
    features, logits = evaltime.forward(model, images, "flip")
    torch.testing.assert_close(logits, (plain + flipped) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(features, (seen[0] + seen[1]) / 2, rtol=0, atol=1e-6)
    assert not torch.allclose(plain, flipped, atol=1e-3)  # the mirror really is another view
    features, logits = evaltime.forward(model, images, "none")
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)
    assert features.shape == (4, 512)


def test_default_eval_size_follows_the_ratio_where_the_model_takes_it() -> None:
    assert evaltime.default_eval_size("resnet18", 40, 1.0) == 40
    assert evaltime.default_eval_size("resnet18", 40, 1.15) == 46
    assert evaltime.default_eval_size(VIT, 224, 1.15) == 224  # 256 would not fit its position embedding
    assert evaltime.eval_size_problem(VIT, 224, 224) is None


def test_an_eval_size_the_model_cannot_take_is_one_line(capsys: pytest.CaptureFixture[str], train_shards: Path,
                                                        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"

    def fit(*args: str) -> object:
        return run_main(capsys, "fit", "--shards", str(train_shards), "--pretrained", "none", "--run-dir",
                        str(run_dir), "--wandb", "disabled", *args)

    assert_one_line_error(fit("--arch", VIT, "--image-size", "32", "--eval-image-size", "48"),
                          "--eval-image-size 48", VIT, "--image-size 32", "leave the option out")
    assert_one_line_error(fit("--arch", VIT, "--image-size", "32", "--eval-image-size", "40"), "multiple of 16")
    assert_one_line_error(fit("--arch", "resnet18", "--eval-image-size", "8"), "--eval-image-size", "[16, 2048]")
    assert_one_line_error(fit("--arch", "resnet18", "--tta", "mirror"), "--tta", "'mirror'", "none, flip")
    assert not run_dir.exists()  # refused before any work
    with pytest.raises(UserError, match="--eval-image-size 48: .* built for --image-size 32"):  # evaluate, predict
        evaltime.with_overrides({"arch": VIT, "image_size": 32, "crop_pct": 0.875}, 48, "")


def test_evaluate_refuses_bad_eval_flags(capsys: pytest.CaptureFixture[str], fitted_run: Path, train_shards: Path,
                                         tmp_path: Path) -> None:
    def evaluate(*args: str) -> object:
        return run_main(capsys, "evaluate", "--checkpoint", str(fitted_run), "--shards", str(train_shards),
                        "--out", str(tmp_path / "out"), *args)

    assert_one_line_error(evaluate("--tta", "mirror"), "--tta", "invalid choice")
    assert_one_line_error(evaluate("--eval-image-size", "4096"), "--eval-image-size", "[16, 2048]")
    assert not (tmp_path / "out").exists()
