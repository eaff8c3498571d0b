"""Stopping a multi-process `fit` through its launcher, 2 CPU processes each time:

- `python -m train.launch`: USR1 sent to the launcher's process group (which holds the launcher alone: torchrun
  starts the training processes in sessions of their own) reaches both, once; they stop at one step with a
  checkpoint and the launcher exits with their status, 75, and with 2 for a bad option: the statuses the
  Kubernetes Job's podFailurePolicy acts on. `accelerate launch` exits 138 and 1 there.
- A plain `accelerate launch` that dies of USR1: its processes see it and stop with a checkpoint instead of
  training on to the end."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import procs
import psutil
import pytest
import yaml
from support import ROOT, free_port, launch_env
from test_signals import RUN_TIMEOUT_S, assert_stop_checkpoint, fit_command, wait_for_step

K8S_TRAIN = ROOT / "examples" / "k8s" / "train-job.yaml"
WRAPPER = [sys.executable, "-m", "train.launch"]


def failure_policy() -> dict[str, list[int]]:
    """The train Job's podFailurePolicy: action -> the exit codes of its container that take it."""
    job = [doc for doc in yaml.safe_load_all(K8S_TRAIN.read_text()) if doc and doc["kind"] == "Job"][0]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    actions: dict[str, list[int]] = {}
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            assert rule["onExitCodes"]["containerName"] == container["name"]
            assert rule["onExitCodes"]["operator"] == "In"
            actions.setdefault(rule["action"], []).extend(rule["onExitCodes"]["values"])
    assert container["command"][:3] == ["python", "-m", "train.launch"], container["command"]
    return actions


def launch_args(port: int) -> list[str]:
    """The options of `accelerate launch` for 2 CPU processes (what follows `accelerate launch`)."""
    return procs.launch_args(2, port)[len(procs.LAUNCH):]


def test_exit_status_is_what_a_shell_reports() -> None:
    from train.launch import exit_status

    assert [exit_status(code) for code in (0, 2, 75, -signal.SIGKILL, -signal.SIGTERM)] == [0, 2, 75, 137, 143]


@pytest.mark.multiprocess
@pytest.mark.timeout(3 * RUN_TIMEOUT_S)
def test_launch_passes_usr1_to_every_process_and_exits_with_their_status(train_shards: Path,
                                                                          tmp_path: Path) -> None:
    policy = failure_policy()
    run_dir, env = tmp_path / "run", launch_env(tmp_path)
    command = fit_command(train_shards, run_dir, "--batch-size", "4")
    with procs.group(tmp_path / "logs") as group:
        launcher = group.start("launch", [*WRAPPER, *launch_args(free_port()), *command], env)
        wait_for_step(run_dir, launcher)
        ranks = psutil.Process(launcher.pid).children()
        assert len(ranks) == 2 and all(os.getsid(r.pid) != os.getsid(launcher.pid) for r in ranks), ranks
        os.killpg(launcher.pid, signal.SIGUSR1)
        assert group.finish(RUN_TIMEOUT_S) == [75], group.output("launch")[-3000:]
        output = group.output("launch")
        assert not group.tagged()  # nothing of the run left behind (DataLoader workers included)
    assert_stop_checkpoint(output, run_dir, "SIGUSR1")
    assert "second stop signal" not in output and "Traceback" not in output, output[-3000:]
    assert 75 in policy["Ignore"]  # a stop is retried without using up backoffLimit

    bad = {  # a bad option of fit's, under torchrun and under one process (exec'd), and of the launcher's
        "fit": ([*launch_args(free_port()), *command, "--bogus"], "error: unrecognized arguments: --bogus"),
        "one": (["--num_processes", "1", *command, "--bogus"], "error: unrecognized arguments: --bogus"),
        "launcher": (["--multi_gpu", "--num_processes", "1", *command], "error: You need to use at least 2 processes"),
    }
    with procs.group(tmp_path / "bad-logs") as group:
        for name, (args, _) in bad.items():
            group.start(name, [*WRAPPER, *args], env)
        codes = group.finish(RUN_TIMEOUT_S)
        outputs = {name: group.output(name) for name in bad}
    assert codes == [2, 2, 2], outputs
    for name, (_, line) in bad.items():
        assert line in outputs[name] and "Traceback" not in outputs[name], outputs[name]
    assert policy["FailJob"] == [2]  # a bad option fails the Job at once


@pytest.mark.multiprocess
@pytest.mark.timeout(2 * RUN_TIMEOUT_S)
def test_processes_of_a_launcher_killed_by_usr1_stop_with_a_checkpoint(train_shards: Path, tmp_path: Path) -> None:
    """USR1 to a plain `accelerate launch`'s group kills it (torchrun does not handle USR1); its processes,
    in sessions of their own, do not get the signal, but see their launcher gone and stop as on SIGTERM,
    their first stop signal: one step, a complete checkpoint, no second signal."""
    run_dir, env = tmp_path / "run", launch_env(tmp_path)
    with procs.group(tmp_path / "logs") as group:
        launcher = group.start("launch", [*procs.launch_args(2, free_port()),
                                          *fit_command(train_shards, run_dir, "--batch-size", "4")], env)
        wait_for_step(run_dir, launcher)
        ranks = psutil.Process(launcher.pid).children()
        assert len(ranks) == 2, ranks
        os.killpg(launcher.pid, signal.SIGUSR1)
        assert group.finish(RUN_TIMEOUT_S) == [-signal.SIGUSR1]
        _, alive = psutil.wait_procs(ranks, timeout=RUN_TIMEOUT_S)
        assert not alive, group.output("launch")[-3000:]
        output = group.output("launch")
    assert_stop_checkpoint(output, run_dir, "SIGTERM")
    assert "second stop signal" not in output and "Traceback" not in output, output[-3000:]
