"""Config: defaults < YAML < command line; types checked once; problems reported argparse-style."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pipeline.errors import UserError
from train import config as cfgmod


def _parse(*argv: str) -> cfgmod.Config:
    parser = argparse.ArgumentParser()
    cfgmod.add_arguments(parser)
    return cfgmod.make_config(parser.parse_args(argv))


def test_precedence_defaults_yaml_cli(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("arch: resnet18\nlr: 1\nbatch-size: 16\nchannels_last: false\n")
    config = _parse("--config", str(tmp_path / "c.yaml"), "--batch-size", "8", "--crop-scale", "0.5", "1")
    assert config.arch == "resnet18"  # YAML over default
    assert config.batch_size == 8  # command line over YAML
    assert config.lr == 1.0 and isinstance(config.lr, float)  # YAML int coerced
    assert config.channels_last is False and config.crop_scale == [0.5, 1.0]
    assert config.epochs == cfgmod.Config().epochs  # untouched default


def test_yaml_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("epochs: ten\n")
    with pytest.raises(UserError, match="option epochs: expected a number"):
        _parse("--config", str(tmp_path / "bad.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(UserError, match="expected a mapping"):
        _parse("--config", str(tmp_path / "list.yaml"))
    with pytest.raises(UserError, match="no such file|No such file"):
        _parse("--config", str(tmp_path / "missing.yaml"))


def test_check_lists_every_problem() -> None:
    config = cfgmod.Config(shards="s", arch="vgg", batch_size=0, lr=-1.0, workers=-1)
    problems = cfgmod.check(config)
    assert any("--arch" in p for p in problems) and any("--batch-size" in p for p in problems)
    assert any("--lr" in p for p in problems) and any("--workers" in p for p in problems)
    assert cfgmod.check(cfgmod.Config(shards="s")) == []


def test_changed_fields_ignore_resumable_options() -> None:
    saved = cfgmod.to_dict(cfgmod.Config(shards="a"))
    assert cfgmod.changed_fields(saved, cfgmod.Config(shards="http://mirror/a", workers=9, wandb="offline")) == []
    assert cfgmod.changed_fields(saved, cfgmod.Config(shards="a", lr=0.5, arch="resnet18")) == ["arch", "lr"]
