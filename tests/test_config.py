"""Config: defaults < YAML < command line; types checked once; problems reported argparse-style."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.outputs import output_dir_problem, output_file_problem
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


def test_a_resolved_config_is_frozen(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("lr: 1\nepochs: 3\n")
    config = _parse("--config", str(tmp_path / "c.yaml"), "--grad-accum", "2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 0.5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.grad_accum = 4  # type: ignore[misc]
    changed = dataclasses.replace(config, lr=0.5)  # how a step that decides an option records it
    assert (changed.lr, changed.grad_accum, config.lr) == (0.5, 2, 1.0)


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
    assert any("--batch-size" in p for p in problems)
    assert any("--lr" in p for p in problems) and any("--workers" in p for p in problems)
    assert cfgmod.check(cfgmod.Config(shards="s")) == []
    assert "--arch" in cfgmod.model_problem(config)  # the model's own checks, run once the shard set is read
    assert cfgmod.model_problem(cfgmod.Config(shards="s", image_size=64)) is None


def test_changed_fields_ignore_resumable_options() -> None:
    saved = cfgmod.to_dict(cfgmod.Config(shards="a"))
    assert cfgmod.changed_fields(saved, cfgmod.Config(shards="http://mirror/a", workers=9, wandb="offline")) == []
    assert cfgmod.changed_fields(saved, cfgmod.Config(shards="a", eval_image_size=64, eval_size_ratio=1.15,
                                                     tta="flip")) == []  # eval only
    assert cfgmod.changed_fields(saved, cfgmod.Config(shards="a", lr=0.5, arch="resnet18")) == ["arch", "lr"]
    # the moving average is part of a checkpoint's state: a resume cannot turn it on, off or change it
    assert cfgmod.changed_fields(saved, cfgmod.Config(shards="a", ema_decay=0.99)) == ["ema_decay"]


@pytest.mark.parametrize("argv,fragment", [
    (["--lr", "inf"], "--lr must be > 0 and finite"),
    (["--lr", "nan"], "--lr must be > 0 and finite"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--clip-grad", "inf"], "--clip-grad must be a finite number"),
    (["--lr-find-end", "inf"], "--lr-find-end/--end-lr must be a finite number"),
    (["--log-every", "0"], "--log-every must be >= 1"),
    (["--label-smoothing", "5"], "--label-smoothing must be in [0, 1)"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    (["--div-factor", "0"], "--div-factor must be >= 1"),
    (["--final-div-factor", "-1"], "--final-div-factor must be >= 1"),
    (["--pct-start", "0"], "--pct-start must be in (0, 1)"),
    (["--pct-start", "1"], "--pct-start must be in (0, 1)"),
    (["--shuffle-buffer", "-5"], "--shuffle-buffer must be >= 1"),
    (["--crop-scale", "0.5", "5"], "--crop-scale needs two numbers 0 < min <= max <= 1"),
    (["--crop-scale", "0.9", "0.5"], "--crop-scale needs two numbers 0 < min <= max <= 1"),
    (["--crop-scale", "0", "1"], "--crop-scale needs two numbers 0 < min <= max <= 1"),
    (["--crop-pct", "0"], "--crop-pct must be in (0, 1]"),
    (["--crop-pct", "1.5"], "--crop-pct must be in (0, 1]"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--lr-decay", "0"], "--lr-decay must be in (0, 1]"),
    (["--lr-decay", "2"], "--lr-decay must be in (0, 1]"),
    (["--dist-timeout", "0"], "--dist-timeout must be >= 1"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295]"),
    (["--image-size", "8"], "--image-size must be in [16, 2048]"),
    (["--image-size", "22400"], "--image-size must be in [16, 2048]"),
    (["--eval-batch-size", "-1"], "--eval-batch-size must be >= 0"),
    (["--lr-find-steps", "19"], "--lr-find-steps/--steps must be >= 20"),
    (["--lr-find-start", "0"], "--lr-find-start/--start-lr must be > 0"),
    (["--lr-find-start", "1", "--lr-find-end", "0.1"], "needs --start-lr < --end-lr"),
    (["--run-dir", ""], "--run-dir must not be empty"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1), got 1"),
    (["--ema-decay", "-0.5"], "--ema-decay must be in [0, 1), got -0.5"),
    (["--ema-decay", "nan"], "--ema-decay must be a finite number"),
    (["--ema-decay", "0.3"], "--ema-decay must be 0 (off) or in [0.5, 1), got 0.3"),
    (["--ema-decay", "1e-9"], "--ema-decay must be 0 (off) or in [0.5, 1), got 1e-09"),
    (["--eval-size-ratio", "3"], "--eval-size-ratio must be in [0.5, 2], got 3"),
])
def test_every_option_is_range_checked(argv: list[str], fragment: str) -> None:
    problems = cfgmod.check(_parse("--shards", "s", *argv))
    assert len(problems) == 1 and fragment in problems[0], problems


@pytest.mark.parametrize("text,fragment", [
    ("crop_scale: 5\n", "option crop_scale: expected two numbers [min, max], got 5"),
    ("crop_scale: [0.5, 1, 1]\n", "option crop_scale: expected two numbers"),
    ("crop_scale: [a, 1]\n", "option crop_scale: expected a number, got 'a'"),
    ("epochs: 2.5\n", "option epochs: expected a whole number, got 2.5"),
    ("epochs: true\n", "option epochs: expected a number, got True"),
    ("lr: yes\n", "option lr: expected a number, got True"),
    ("run_dir: 5\n", "option run_dir: expected text, got 5"),
])
def test_yaml_types_are_checked(tmp_path: Path, text: str, fragment: str) -> None:
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(UserError) as error:
        _parse("--config", str(tmp_path / "c.yaml"))
    assert fragment in str(error.value)


@pytest.mark.parametrize("text,fragment", [
    ("lr: .inf\n", "--lr must be > 0 and finite"),
    ("weight_decay: .nan\n", "--weight-decay must be a finite number"),
    ("momentum: inf\n", "--momentum must be a finite number"),
    ("crop_scale: [0.5, .nan]\n", "--crop-scale needs two numbers"),
    ("label_smoothing: 5\n", "--label-smoothing must be in [0, 1)"),
    ("ema_decay: 0.1\n", "--ema-decay must be 0 (off) or in [0.5, 1), got 0.1"),
    ("ema_decay: 0.5\n", None),  # the range's ends: 0.5 and 0 (off) are fine
    ("ema_decay: 0\n", None),
    ("epochs: 3.0\n", None),  # a whole number written as a float is fine
])
def test_yaml_values_get_the_same_checks(tmp_path: Path, text: str, fragment: str | None) -> None:
    (tmp_path / "c.yaml").write_text(text)
    problems = cfgmod.check(_parse("--config", str(tmp_path / "c.yaml"), "--shards", "s"))
    assert problems == [] if fragment is None else (len(problems) == 1 and fragment in problems[0]), problems


def test_output_paths_are_checked_without_creating_anything(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert output_dir_problem(tmp_path / "new" / "run", "--run-dir") is None
    assert "exists and is not a directory" in output_dir_problem(tmp_path / "file", "--run-dir")
    assert "is not a directory" in output_dir_problem(tmp_path / "file" / "run", "--run-dir")
    assert "cannot write in /sys" in output_dir_problem(Path("/sys/cubstream-run"), "--run-dir")
    assert "is a directory" in output_file_problem(tmp_path, "--out")
    assert "not a regular file" in output_file_problem(Path("/dev/full"), "--out")
    assert output_file_problem(tmp_path / "file", "--out") is None  # replacing a file is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no probe or directory left behind


def test_every_numeric_option_has_a_range() -> None:
    """A new numeric option must get its range here too (nan and inf are refused through it)."""
    numeric = {f.name for f in dataclasses.fields(cfgmod.Config)
               if isinstance(f.default, int | float) and not isinstance(f.default, bool)}
    assert numeric - {"lr"} == set(cfgmod.RANGES)


# --- --help: real defaults and the registries' choices ---------------------------------------------------


def _help(capsys, command: str) -> dict[str, str]:
    """Each option of `python -m train COMMAND --help` -> its help text (joined across wrapped lines)."""
    from support import run_main

    result = run_main(capsys, command, "--help")
    assert result.returncode == 0, result.stderr
    options: dict[str, str] = {}
    current = None
    for line in result.stdout.split("options:", 1)[1].splitlines():
        stripped = line.strip()
        if line.startswith("  -"):  # an option; its wrapped help lines are indented further
            current = stripped.split()[0].rstrip(",")
            options[current] = stripped
        elif current and stripped:
            options[current] += " " + stripped
    options.pop("-h")
    return options


@pytest.mark.parametrize("command", ["fit", "lr-find", "evaluate", "predict", "export"])
def test_help_shows_real_defaults(capsys, command: str) -> None:
    options = _help(capsys, command)
    assert options
    for flag, text in options.items():
        assert "(required)" in text or "; required)" in text or "default: " in text, (flag, text)
        assert "default: None" not in text, flag  # the CLI's "not given" is never shown as a default
    if command in ("fit", "lr-find"):
        defaults = cfgmod.Config()
        assert f"default: {defaults.lr})" in options["--lr"] and "default: resnet50)" in options["--arch"]
        assert "default: 0.875)" in options["--crop-pct"] and "default: none)" in options["--config"]
        assert f"default: {defaults.lr_find_steps})" in options["--lr-find-steps"]
        registries = cfgmod.choices()
        for flag, name in (("--augment", "augment"), ("--optimizer", "optimizer"), ("--lr-scheme", "lr_scheme")):
            assert f"choices: {', '.join(registries[name])};" in options[flag], flag
        # thousands of models: --help names each source's syntax and the command that lists them
        assert "choices" not in options["--arch"] and "python -m train models" in options["--arch"]
        assert all(part in options["--arch"] for part in ("resnet18 .. resnet152", "tv/NAME", "timm/NAME"))
        assert registries["optimizer"] == ("adam", "adamw", "sgd")
        assert registries["lr_scheme"] == ("auto", "notebook", "geometric", "flat")
        assert registries["augment"] == ("standard", "notebook", "none")
    if command == "lr-find":
        assert f"default: {cfgmod.Config().lr_find_start})" in options["--start-lr"]


@pytest.mark.parametrize(("flag", "value", "named"), [
    ("--optimizer", "adagrad", "choose from adam, adamw, sgd"),
    ("--lr-scheme", "cosine", "choose from auto, notebook, geometric, flat"),
    ("--augment", "heavy", "choose from standard, notebook, none"),
    ("--arch", "vit_b_61", "did you mean vit_b_16"),
])
def test_unknown_choice_is_one_line_naming_the_choices(capsys, tmp_path: Path, train_shards: Path, flag: str,
                                                       value: str, named: str) -> None:
    from support import assert_one_line_error, run_main

    result = run_main(capsys, "fit", "--shards", str(train_shards), flag, value, "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert_one_line_error(result, flag, repr(value), named)


def test_cli_not_given_keeps_the_yaml(tmp_path: Path) -> None:
    """An option absent from the command line does not override the YAML, even when the YAML sets a value
    equal to another option's default."""
    (tmp_path / "c.yaml").write_text("optimizer: sgd\nchannels_last: false\nlr_find_steps: 7\n")
    parser = argparse.ArgumentParser()
    cfgmod.add_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "c.yaml")])
    assert not hasattr(args, "optimizer")  # not given: absent, not a default
    config = cfgmod.make_config(args)
    assert (config.optimizer, config.channels_last, config.lr_find_steps) == ("sgd", False, 7)
