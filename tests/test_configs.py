"""Every shipped config is loaded by the code that consumes it, so a typo or a bad value fails CI:
configs/*.yaml by the trainer's loader and checks, accelerate_config.yaml by `accelerate launch` itself (the
processes it starts report what they were given)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import procs
import pytest
import yaml
from support import ROOT, free_port, launch_env

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
    assert cfgmod.check(config, require_shards=False) == [] and cfgmod.model_problem(config) is None


def test_a_typo_in_a_trainer_config_fails(tmp_path: Path) -> None:
    source = next(p for p in TRAIN_CONFIGS if p.name == "demo.yaml").read_text()
    typo = tmp_path / "typo.yaml"
    typo.write_text(source + "\nlearning_rat: 0.1\n")
    with pytest.raises(UserError, match="unknown key 'learning_rat'"):
        cfgmod.load_yaml(typo)
    bad = tmp_path / "bad.yaml"
    bad.write_text(source + "\narch: resnet5\n")
    assert "resnet5" in cfgmod.model_problem(cfgmod.make_config(argparse.Namespace(config=bad)))


def accelerate_launch(config: Path, tmp: Path, launcher: Sequence[str] = (procs.ACCELERATE, "launch")
                      ) -> tuple[int, str, list[dict[str, str]]]:
    """`accelerate launch --config_file CONFIG tests/launched_env.py`, as a user runs it (only the port is
    chosen here, so that tests running at once do not collide): (exit status, output, what each rank got)."""
    out = tmp / "launched"
    out.mkdir(parents=True, exist_ok=True)
    command = [*launcher, "--config_file", str(config), "--main_process_port", str(free_port()),
               str(ROOT / "tests" / "launched_env.py"), str(out)]
    with procs.group(tmp / "logs") as group:
        group.start("launch", command, launch_env(tmp))
        (code,) = group.finish(timeout=120)
        output = group.output("launch")
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"), key=lambda p: int(p.stem[4:]))]
    return code, output, ranks


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_launches(path: Path, tmp_path: Path) -> None:
    """The launcher reads the file (unknown keys and bad values fail there) and starts the processes it
    describes, each told the world size and the mixed precision the trainer's `--precision auto` takes."""
    values = yaml.safe_load(path.read_text())
    code, output, ranks = accelerate_launch(path, tmp_path)
    assert code == 0, output[-3000:]
    processes = values["num_processes"] // values.get("num_machines", 1)
    assert [r["RANK"] for r in ranks] == [str(i) for i in range(processes)], output[-3000:]
    assert {r["WORLD_SIZE"] for r in ranks} == {str(values["num_processes"])}
    assert {r["ACCELERATE_MIXED_PRECISION"] for r in ranks} == {values["mixed_precision"]}
    assert values["mixed_precision"] in cfgmod.PRECISIONS


@pytest.mark.parametrize(("change", "named"), [("\nnum_proceses: 2\n", "num_proceses"),
                                                ("\nmixed_precision: bf17\n", "bf17")],
                         ids=["unknown-key", "bad-value"])
def test_a_typo_in_an_accelerate_config_fails(tmp_path: Path, change: str, named: str) -> None:
    bad = tmp_path / "accelerate.yaml"
    bad.write_text((ROOT / "accelerate_config.yaml").read_text().replace("\nmixed_precision: bf16\n", "\n")
                   + change)
    code, output, ranks = accelerate_launch(bad, tmp_path, procs.LAUNCH)  # the same config reading
    assert code != 0 and named in output and ranks == [], output[-3000:]


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
