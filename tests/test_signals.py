"""`fit` stopped by a signal: every process stops at the same optimizer step, writes a complete mid-epoch
checkpoint there, prints one line and exits 75; `--resume auto` then ends exactly where an uninterrupted run
ends. DataLoader workers ignore the stop signals (a terminal's Ctrl-C or a scheduler's SIGTERM reaches the
whole process group). A second signal exits at once with 128 + its number, without a checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import procs
import pytest
from conftest import FIT_ARGS
from safetensors.torch import load_file
from support import free_port, launch_env, max_ema_difference, run_cli, run_main
from test_distributed import rank_process

RUN_TIMEOUT_S = 180
# One epoch, mid-epoch stops possible (14 steps of 8 images); --workers 2: workers see the group's signal; an
# EMA of the weights, whose state the stop checkpoint carries too.
ARGS = (*FIT_ARGS, "--epochs", "1", "--workers", "2", "--ema-decay", "0.9", "--tta", "flip")
LINE = re.compile(r"^stopped by (SIG\w+) at step (\d+) \(epoch 1\): checkpoint (\S+) written; "
                  r"rerun with --resume auto to continue$", re.MULTILINE)


def fit_command(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "train", "fit", "--shards", str(shards), *ARGS, "--run-dir", str(run_dir), *extra]


def wait_for_step(run_dir: Path, proc: object) -> None:
    """Until metrics.jsonl holds a step record (the run is inside its first epoch)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and '"kind": "step"' in metrics.read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"no step record in {metrics} (exit status {proc.poll()})")


def final_weights(run_dir: Path) -> dict:
    newest = max(run_dir.glob("checkpoints/step-*"))
    return load_file(str(newest / "model.safetensors"))


def assert_stop_checkpoint(output: str, run_dir: Path, signame: str) -> int:
    """The one line, naming a complete checkpoint at a step that is not an epoch end; returns the step."""
    found = LINE.findall(output)
    assert len(found) == 1, output[-3000:]
    name, step, where = found[0]
    assert name == signame
    state = json.loads((Path(where) / "trainer.json").read_text())
    assert Path(where) == run_dir / "checkpoints" / f"step-{int(step):08d}"
    assert state["global_step"] == state["step_in_epoch"] == int(step)
    assert 0 < state["step_in_epoch"] < state["steps_per_epoch"], state
    assert len(state["partial"]) == 4 and state["partial"][0] > 0  # the epoch's train sums so far
    assert not (run_dir / "results.json").exists()
    return int(step)


@pytest.fixture(scope="module")
def reference(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run with the same options."""
    tmp = tmp_path_factory.mktemp("signals-ref")
    result = run_cli(*fit_command(train_shards, tmp / "run")[1:], env=launch_env(tmp), timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run"


@pytest.mark.timeout(3 * RUN_TIMEOUT_S)
def test_sigterm_to_process_group_stops_at_checkpoint_then_resume_matches(
        train_shards: Path, reference: Path, tmp_path: Path) -> None:
    """SIGTERM to the whole process group (fit and its 2 workers), as a scheduler sends it."""
    run_dir, env = tmp_path / "run", launch_env(tmp_path)
    started = time.monotonic()
    with procs.group(tmp_path / "logs") as group:
        proc = group.start_warm("fit", fit_command(train_shards, run_dir)[1:], env)
        wait_for_step(run_dir, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        assert group.finish(RUN_TIMEOUT_S) == [75], group.output("fit")[-3000:]
        output = group.output("fit")
    assert "Traceback" not in output and "error" not in output, output[-3000:]
    step = assert_stop_checkpoint(output, run_dir, "SIGTERM")
    stopped = time.monotonic()

    resumed = run_cli(*fit_command(train_shards, run_dir, "--resume", "auto")[1:], env=env, timeout=RUN_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from step-{step:08d}" in resumed.stdout
    ours, theirs = final_weights(run_dir), final_weights(reference)
    assert ours.keys() == theirs.keys() and len(ours) > 50
    diff = max((ours[k].double() - theirs[k].double()).abs().max().item() for k in ours)
    assert diff <= 1e-6, diff
    assert max_ema_difference(max(run_dir.glob("checkpoints/step-*")),
                              max(reference.glob("checkpoints/step-*"))) <= 1e-6
    print(f"stopped {stopped - started:.1f} s after start at step {step}; max abs weight difference {diff:.3g}")


@pytest.mark.timeout(2 * RUN_TIMEOUT_S)
def test_sigusr1_to_one_rank_stops_both_at_the_same_step(train_shards: Path, tmp_path: Path) -> None:
    """2 processes: only rank 1 gets the signal; the all-reduced flag stops both at the same step, and the
    run resumes to its end."""
    run_dir, env = tmp_path / "run", launch_env(tmp_path)
    command = fit_command(train_shards, run_dir, "--batch-size", "4")
    with procs.group(tmp_path / "logs") as group:
        launcher = group.start("launch", [*procs.launch_args(2, free_port()), *command], env)
        wait_for_step(run_dir, launcher)
        rank_process(launcher.pid, 1).send_signal(signal.SIGUSR1)
        codes = group.finish(RUN_TIMEOUT_S)
        output = group.output("launch")
    assert codes != [0], output[-3000:]
    assert_stop_checkpoint(output, run_dir, "SIGUSR1")
    assert re.search(r"exitcode\s*:\s*75", output), output[-3000:]  # what torchrun reports of the ranks

    with procs.group(tmp_path / "resume-logs") as group:
        group.start("launch", [*procs.launch_args(2, free_port()), *command, "--resume", "auto"], env)
        assert group.finish(RUN_TIMEOUT_S) == [0], group.output("launch")[-3000:]
    assert (run_dir / "results.json").is_file()


@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_second_signal_exits_at_once_without_checkpoint(train_shards: Path, tmp_path: Path) -> None:
    """Two stop signals before the next step (the process is held stopped while both arrive): status
    128 + the second one's number, one error line, no stop checkpoint."""
    run_dir = tmp_path / "run"
    with procs.group(tmp_path / "logs") as group:
        proc = group.start_warm("fit", fit_command(train_shards, run_dir, "--workers", "0")[1:],
                                 launch_env(tmp_path))
        wait_for_step(run_dir, proc)
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(signal.SIGUSR1)  # handled first (lower number): the stop request
        proc.send_signal(signal.SIGTERM)  # the second signal
        proc.send_signal(signal.SIGCONT)
        assert group.finish(RUN_TIMEOUT_S) == [128 + signal.SIGTERM], group.output("fit")[-3000:]
        output = group.output("fit")
    assert not LINE.search(output)
    errors = re.findall(r"error: [^\r\n]*", output)  # after the progress bar's last \r
    assert errors == ["error: second stop signal (SIGTERM); exiting without a stop checkpoint (the last complete "
                      "checkpoint stays)"], output[-3000:]
    assert not list(run_dir.glob("checkpoints/step-*"))


def test_stop_signals_checked_at_parse_time(capsys: pytest.CaptureFixture[str], train_shards: Path,
                                            tmp_path: Path) -> None:
    for value, problem in (("TERM,BOGUS", "--stop-signals: 'BOGUS' is not a signal that can be caught"),
                           ("KILL", "--stop-signals: 'KILL' is not a signal that can be caught")):
        result = run_main(capsys, "fit", "--shards", str(train_shards), "--run-dir", str(tmp_path / "r"),
                          "--stop-signals", value)
        assert result.returncode == 2 and result.stderr.startswith(f"error: {problem}"), result.stderr
    result = run_main(capsys, "fit", "--shards", str(train_shards), "--run-dir", str(tmp_path / "r"),
                      "--stop-grace", "-1")
    assert result.returncode == 2 and "--stop-grace must be >= 0, got -1" in result.stderr, result.stderr
