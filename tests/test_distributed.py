"""`fit` in several processes on CPU (gloo), launched with `accelerate launch --multi_gpu` and
ACCELERATE_USE_CPU (procs.launch_args): 2 processes on one machine, and two launches as two "nodes" on
127.0.0.1, whose rank 1 is killed mid-run and which `--resume auto` then brings to the end (one test for both,
to stay within the CPU budget of the suite). What DDP adds (gradient averaging across processes) is checked
exactly on fit's own train step: 2 processes against 1 process with gradient accumulation.

The shard set is made awkward on purpose: 3 train shards for 2 processes x 2 workers = 4 streams (more
streams than shards, so streams wrap around), 3 test shards of 25, 25 and 19 samples (rank 0 reads two,
rank 1 one; 69 test samples, odd), and a single valid shard (rank 1 has no valid data at all).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import procs
import psutil
import pytest
import torch
from conftest import synth_set
from safetensors.torch import load_file
from support import ROOT, free_port, launch_env, max_ema_difference, run_cli

from pipeline.manifest import load_manifest
from pipeline.plan import BuildOptions

pytestmark = pytest.mark.multiprocess

DIST_SYNTH = {"classes": 6, "per_class": 23, "seed": 1}
DIST_OPTIONS = BuildOptions(resize_short=40, shard_samples=25, valid_fraction=0.2)
BATCH = 8  # per process; the 1-process reference uses 2 x BATCH
EPOCHS = 3
STEPS_PER_EPOCH = 57 // (2 * BATCH)  # 3
ARGS = ("--arch", "resnet18", "--pretrained", "none", "--image-size", "32", "--workers", "2", "--lr", "0.003",
        "--lr-scheme", "flat", "--epochs", str(EPOCHS), "--wandb", "disabled", "--log-every", "1",
        "--crop-scale", "0.6", "1.0", "--ema-decay", "0.9", "--tta", "flip", "--no-plots")
TOP1_TOLERANCE, LOSS_TOLERANCE = 0.25, 0.75
RUN_TIMEOUT_S = 240
DIST_TIMEOUT_S = 60  # --dist-timeout of the killed run: the bound for a peer that hangs instead of dying
FAILURE_BOUND_S = DIST_TIMEOUT_S + 15  # measured here: ~7 s after a SIGKILL (gloo sees the connection reset)


@pytest.fixture(scope="module")
def dist_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = synth_set(tmp_path_factory, DIST_SYNTH, DIST_OPTIONS)
    splits = load_manifest(str(out))["splits"]
    shape = {name: [s["num_samples"] for s in split["shards"]] for name, split in splits.items()}
    assert shape == {"train": [25, 25, 7], "valid": [12], "test": [25, 25, 19]}, shape  # what the tests assume
    return out


def fit_command(shards: Path, run_dir: Path, batch_size: int, *extra: str) -> list[str]:
    return ["-m", "train", "fit", "--shards", str(shards), *ARGS, "--batch-size", str(batch_size),
            "--run-dir", str(run_dir), *extra]


def run_fit(shards: Path, tmp: Path, name: str, processes: int, nodes: int = 1, *extra: str) -> Path:
    """One `fit` to completion: plain python (1 process), one launch (N processes) or N launches (nodes)."""
    run_dir = tmp / name
    batch = 2 * BATCH // processes
    env = launch_env(tmp)
    if processes == 1:
        result = run_cli(*fit_command(shards, run_dir, batch, *extra)[1:], env=env, timeout=RUN_TIMEOUT_S)
        assert result.returncode == 0, result.stderr[-3000:]
        (run_dir / "output.log").write_text(result.stdout + result.stderr)
        return run_dir
    with procs.group(tmp / f"{name}-logs") as group:
        port = free_port()
        for rank in range(nodes):
            launch = procs.launch_args(processes, port, num_machines=nodes, machine_rank=rank)
            group.start(f"node{rank}", [*launch, *fit_command(shards, run_dir, batch, *extra)], env)
        codes = group.finish(RUN_TIMEOUT_S)
        assert codes == [0] * len(codes), "\n".join(group.output(n)[-3000:] for n in group.names)
        (run_dir / "output.log").write_text(group.output(group.names[0]))
    return run_dir


@pytest.fixture(scope="module")
def one_process(dist_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_fit(dist_shards, tmp_path_factory.mktemp("runs"), "one", processes=1)


@pytest.fixture(scope="module")
def two_processes(dist_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_fit(dist_shards, tmp_path_factory.mktemp("runs"), "two", processes=2)


def records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def results(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def assert_distributed_run(run_dir: Path, shards: Path, resumed_at: int = 0) -> None:
    """Every rank ran the same batches per epoch; every valid/test sample counted exactly once.
    `resumed_at`: the step a resume started from (its epoch's record counts only the batches after it)."""
    manifest = load_manifest(str(shards))
    epochs = records(run_dir, "epoch")
    expected = [STEPS_PER_EPOCH] * EPOCHS
    expected[resumed_at // STEPS_PER_EPOCH] -= resumed_at % STEPS_PER_EPOCH
    assert [e["train"]["rank_batches"] for e in epochs] == [[n, n] for n in expected]
    assert [r["step"] for r in records(run_dir, "step")] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert all(e["valid"]["num_samples"] == manifest["splits"]["valid"]["num_samples"] for e in epochs)
    result = results(run_dir)
    assert result["test"]["num_samples"] == manifest["splits"]["test"]["num_samples"] == 69
    assert result["valid"]["num_samples"] == 12
    assert "4 streams (processes x workers) but only 3 train shards" in (run_dir / "output.log").read_text()


@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)
def test_two_processes_on_one_machine(dist_shards: Path, one_process: Path, two_processes: Path) -> None:
    """A whole `fit` in 2 processes against 1 at the same global batch (16). The test metrics cannot agree
    exactly: the samples grouped into a global batch differ (4 streams of 8 against 2 of 16, each stream
    shuffling its own shards) and BatchNorm sees 8 instead of 16 images per process. Tolerance: |top1
    difference| <= 0.25 and |loss difference| <= 0.75, the spread measured between 4 seeds of the 1-process run
    itself on this set (top-1 0.25..0.51, loss 1.36..2.07 after these 9 steps). The exact check of the same
    computation is test_two_processes_train_step_equals_one_with_grad_accum."""
    assert_distributed_run(two_processes, dist_shards)
    one, two = results(one_process)["test"], results(two_processes)["test"]
    assert one["num_samples"] == two["num_samples"]
    assert abs(one["top1"] - two["top1"]) <= TOP1_TOLERANCE, (one, two)
    assert abs(one["loss"] - two["loss"]) <= LOSS_TOLERANCE, (one, two)


@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)
def test_lr_of_every_step_identical_for_1_and_2_processes(one_process: Path, two_processes: Path) -> None:
    one = [(r["step"], r["lr"]) for r in records(one_process, "step")]
    two = [(r["step"], r["lr"]) for r in records(two_processes, "step")]
    assert len(one) == EPOCHS * STEPS_PER_EPOCH and len(one[0][1]) == 6  # every step, every param group
    assert one == two


def assert_same_run(a: Path, b: Path) -> None:
    steps_a, steps_b = records(a, "step"), records(b, "step")
    assert [r["step"] for r in steps_a] == [r["step"] for r in steps_b]
    assert [r["loss"] for r in steps_a] == pytest.approx([r["loss"] for r in steps_b], rel=1e-6, abs=1e-6)
    epochs_a, epochs_b = records(a, "epoch"), records(b, "epoch")  # train totals of a resumed epoch included
    for ea, eb in zip(epochs_a, epochs_b, strict=True):
        (na, other_a), (nb, other_b) = _fields(ea), _fields(eb)
        assert other_a == other_b
        assert na == pytest.approx(nb, rel=1e-6, abs=1e-6)
    ra, rb = results(a), results(b)
    assert ra["best_epoch"] == rb["best_epoch"]
    for split in ("test", "valid"):
        assert ra[split]["num_samples"] == rb[split]["num_samples"]
        for key in ("top1", "top5", "loss"):
            assert ra[split][key] == pytest.approx(rb[split][key], rel=1e-6, abs=1e-6), (split, key, ra, rb)


def _fields(record: dict, prefix: str = "") -> tuple[dict[str, float], dict[str, object]]:
    """A metrics record's numbers and its other values by dotted key, without the per-rank batch counts (a
    resumed epoch counts only the batches run since the resume)."""
    numbers: dict[str, float] = {}
    other: dict[str, object] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            inner_numbers, inner_other = _fields(value, f"{prefix}{key}.")
            numbers.update(inner_numbers)
            other.update(inner_other)
        elif key == "rank_batches":
            continue
        elif isinstance(value, int | float) and not isinstance(value, bool):
            numbers[f"{prefix}{key}"] = value
        else:
            other[f"{prefix}{key}"] = value
    return numbers, other


def rank_process(launcher: int, rank: int) -> psutil.Process:
    """The rank process a launcher started (a direct child; its DataLoader workers are grandchildren)."""
    for child in psutil.Process(launcher).children():
        if child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"no rank {rank} under launcher {launcher}")


@pytest.mark.timeout(3 * RUN_TIMEOUT_S + FAILURE_BOUND_S)
def test_two_nodes_rank_killed_then_resume_auto(dist_shards: Path, two_processes: Path, tmp_path: Path) -> None:
    """Node 1's rank dies (SIGKILL): node 0, which only knows it through gloo, exits with one error line
    within FAILURE_BOUND_S; the same two launches with --resume auto continue from the last checkpoint and
    end exactly where an uninterrupted 2-process run ends, the EMA of the weights included."""
    run_dir = tmp_path / "run"
    extra = ("--checkpoint-every", "2", "--dist-timeout", str(DIST_TIMEOUT_S))
    command = fit_command(dist_shards, run_dir, BATCH, *extra)
    env = launch_env(tmp_path)
    checkpoint = run_dir / "checkpoints" / "step-00000002" / "trainer.json"
    with procs.group(tmp_path / "killed-logs") as group:
        port = free_port()
        nodes = [group.start(f"node{rank}", [*procs.launch_args(2, port, 2, rank), *command], env)
                 for rank in (0, 1)]
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not checkpoint.exists() and time.monotonic() < deadline and all(n.poll() is None for n in nodes):
            time.sleep(0.05)
        assert checkpoint.exists(), group.output("node0")[-3000:]
        rank_process(nodes[1].pid, 1).send_signal(signal.SIGKILL)
        killed = time.monotonic()
        codes = group.finish(FAILURE_BOUND_S)
        elapsed = time.monotonic() - killed
        node0 = group.output("node0")
    assert codes[0] != 0 and codes[1] != 0, codes
    assert elapsed <= FAILURE_BOUND_S
    print(f"both launchers exited {elapsed:.1f} s after rank 1 was killed")
    lost = [line for line in node0.splitlines() if line.startswith("error: process 0 of 2 lost another process")]
    assert lost and "--resume auto" in lost[0], node0[-3000:]
    assert not (run_dir / "results.json").exists()

    resumed_at = json.loads(checkpoint.read_text())["global_step"]
    assert max(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoints/step-*")) == resumed_at

    with procs.group(tmp_path / "resume-logs") as group:  # the same two commands, plus --resume auto
        port = free_port()
        for rank in (0, 1):
            group.start(f"node{rank}", [*procs.launch_args(2, port, 2, rank), *command, "--resume", "auto"], env)
        assert group.finish(RUN_TIMEOUT_S) == [0, 0], group.output("node0")[-3000:] + group.output("node1")[-2000:]
        assert f"from step-{resumed_at:08d}" in group.output("node0")
        assert "test (best epoch" in group.output("node0")
        assert "test (best epoch" not in group.output("node1")  # the main process alone prints, not each node's
        (run_dir / "output.log").write_text(group.output("node0"))
    assert_distributed_run(run_dir, dist_shards, resumed_at=resumed_at)
    assert_same_run(run_dir, two_processes)
    assert all("valid_ema" in e for e in records(run_dir, "epoch"))  # compared by assert_same_run
    final = f"step-{EPOCHS * STEPS_PER_EPOCH:08d}"
    assert max_ema_difference(run_dir / "checkpoints" / final, two_processes / "checkpoints" / final) <= 1e-6


STEP_ARGS = ("--arch", "resnet18", "--pretrained", "none", "--image-size", "32", "--batch-size", "4", "--lr", "0.003",
             "--lr-scheme", "flat", "--wandb", "disabled", "--steps", "3", "--ema-decay", "0.9")


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_two_processes_train_step_equals_one_with_grad_accum(tmp_path: Path) -> None:
    """fit's model, optimizer and train step (tests/train_step_ranks.py) on the same seeded global batches:
    2 processes x 4 images against 1 process x 4 images x --grad-accum 2 over the same two halves. BatchNorm
    sees the same 4 images in both, and DDP's averaged gradient equals the accumulated one, so after three
    optimizer steps every parameter agrees to float precision, on both ranks; so do the parameters of fit's
    EMA of the weights, and the two ranks hold exactly the same EMA, BatchNorm statistics included (each
    rank's own statistics differ: it normalised its own half-batch)."""
    script = str(ROOT / "tests" / "train_step_ranks.py")
    env = launch_env(tmp_path)
    with procs.group(tmp_path / "logs") as group:
        group.start_warm("one", [script, "--out", str(tmp_path / "one"), *STEP_ARGS, "--grad-accum", "2"], env)
        group.start("two", [*procs.launch_args(2, free_port()), script, "--out", str(tmp_path / "two"), *STEP_ARGS],
                    env)
        codes = group.finish(RUN_TIMEOUT_S)
        assert codes == [0, 0], "\n".join(group.output(n)[-3000:] for n in group.names)
    one, rank0, rank1 = (json.loads(p.read_text()) for p in
                         (tmp_path / "one" / "rank0.json", tmp_path / "two" / "rank0.json", tmp_path / "two" / "rank1.json"))
    assert [r["world"] for r in (one, rank0, rank1)] == [1, 2, 2]
    assert [r["optimizer_steps"] for r in (one, rank0, rank1)] == [3, 3, 3]
    interleaved = [loss for pair in zip(rank0["losses"], rank1["losses"], strict=True) for loss in pair]
    assert one["losses"] == pytest.approx(interleaved, abs=1e-5)  # the same half-batches, in the same order
    assert one["max_update"] > 1e-3  # three Adam steps at 0.003 moved the weights: the comparison means something

    weights = [load_file(str(tmp_path / run / f"rank{r}.safetensors")) for run, r in (("one", 0), ("two", 0),
                                                                                    ("two", 1))]
    assert weights[0].keys() == weights[1].keys() == weights[2].keys() and len(weights[0]) > 50
    for other in weights[1:]:
        diff = max((weights[0][k] - other[k]).abs().max().item() for k in weights[0])
        assert diff <= 1e-5, diff

    averaged = [load_file(str(tmp_path / run / f"rank{r}-ema.safetensors")) for run, r in (("one", 0), ("two", 0),
                                                                                          ("two", 1))]
    assert all(torch.equal(averaged[1][k], averaged[2][k]) for k in averaged[1])  # every rank the same EMA
    assert max((averaged[0][k] - averaged[1][k]).abs().max().item() for k in weights[0]) <= 1e-5
    assert max((averaged[1][k] - weights[1][k]).abs().max().item() for k in weights[0]) > 1e-4  # an average
    assert any("running_mean" in k for k in averaged[1])
