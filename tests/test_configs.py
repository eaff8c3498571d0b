"""Every shipped config is loaded by the code that consumes it, so a typo or a bad value fails CI:
configs/*.yaml by the trainer's loader and checks, accelerate_config.yaml by accelerate's own loader and its
`accelerate launch` argument validation."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from conftest import ROOT

from pipeline.errors import UserError
from train import config as cfgmod

TRAIN_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted(ROOT.glob("accelerate*.yaml")) + sorted((ROOT / "configs").glob("accelerate*.yaml"))


def test_there_are_configs_to_check() -> None:
    assert len(TRAIN_CONFIGS) >= 1 and any(p.name == "demo.yaml" for p in TRAIN_CONFIGS)
    assert (ROOT / "accelerate_config.yaml") in ACCELERATE_CONFIGS


@pytest.mark.parametrize("path", [p for p in TRAIN_CONFIGS if not p.name.startswith("accelerate")],
                         ids=lambda p: p.name)
def test_trainer_config_loads_and_checks(path: Path) -> None:
    values = cfgmod.load_yaml(path)  # unknown keys (typos) raise here
    cfgmod.Config(**values)  # the dataclass itself accepts every key
    config = cfgmod.make_config(argparse.Namespace(config=path))  # what `fit --config` does: types coerced
    assert cfgmod.check(config, require_shards=False) == []


def test_a_typo_in_a_trainer_config_fails(tmp_path: Path) -> None:
    source = next(p for p in TRAIN_CONFIGS if p.name == "demo.yaml").read_text()
    typo = tmp_path / "typo.yaml"
    typo.write_text(source + "\nlearning_rat: 0.1\n")
    with pytest.raises(UserError, match="unknown key 'learning_rat'"):
        cfgmod.load_yaml(typo)
    bad = tmp_path / "bad.yaml"
    bad.write_text(source + "\narch: resnet5\n")
    assert any("resnet5" in p for p in cfgmod.check(cfgmod.make_config(argparse.Namespace(config=bad))))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads(path: Path) -> None:
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    loaded = load_config_from_file(str(path))  # unknown keys and bad enum values raise here
    assert isinstance(loaded, ClusterConfig)
    assert loaded.mixed_precision in cfgmod.PRECISIONS, loaded.mixed_precision
    # What `accelerate launch --config_file PATH -m train fit` resolves before starting any process.
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "train", "fit"])
    args, defaults, _ = _validate_launch_command(args)
    assert args.num_processes >= 1 and args.num_machines >= 1 and 0 <= args.machine_rank < args.num_machines
    assert args.mixed_precision == loaded.mixed_precision


def test_a_typo_in_an_accelerate_config_fails(tmp_path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    typo = tmp_path / "accelerate.yaml"
    typo.write_text((ROOT / "accelerate_config.yaml").read_text() + "\nnum_proceses: 2\n")
    with pytest.raises(ValueError, match="num_proceses"):
        load_config_from_file(str(typo))


def test_gpu_smoke_script_calls_the_benchmarks_with_flags_they_define() -> None:
    """bench/gpu_smoke.sh only runs on a GPU machine: check here that it parses and that every flag it passes
    to bench/train_step.py and bench/loader.py is one those scripts define."""
    import re
    import subprocess

    script = ROOT / "bench" / "gpu_smoke.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text().replace("\\\n", " ")
    for bench in ("train_step.py", "loader.py"):
        (call,) = [line for line in text.splitlines() if f"bench/{bench} " in line and not line.startswith("#")]
        passed = set(re.findall(r"(--[a-z][a-z-]*)", call.split(f"bench/{bench}", 1)[1]))
        defined = set(re.findall(r'add_argument\("(--[a-z-]+)"', (ROOT / "bench" / bench).read_text()))
        assert passed and passed <= defined, (bench, passed - defined)
    assert "train_step img/s:" in text and "loader img/s:" in text
