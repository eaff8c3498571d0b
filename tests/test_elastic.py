"""Elastic resume: a checkpoint written mid-epoch by P processes x W workers resumes under another layout with
the same global batch. The rest of the epoch trains on exactly the samples it had not seen, each once; the
LR schedule goes on at the same optimizer step; later epochs read the new layout's normal streams.

Cheap checks run in-process: the position replay (train.data.elastic) on hand-made shard counts, the replay
against the real loader's batches, and the refusal when no --grad-accum keeps the global batch. One slow test
chains real runs: 2 processes x 2 workers -> 1 process x 1 worker -> 2 x 2, each cut mid-epoch."""

from __future__ import annotations

import itertools
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import procs
import pytest
import torch
from conftest import FIT_ARGS, synth_set
from support import assert_one_line_error, free_port, launch_env, run_main, wait_for
from test_data import tiny_transform

from pipeline.manifest import load_manifest
from pipeline.plan import BuildOptions
from train import data, keylog
from train.data.elastic import Segment, delivered, keep_global_batch, plan
from train.data.topology import Topology
from train.optim import build_scheduler

ELASTIC_SYNTH = {"classes": 4, "per_class": 26, "seed": 1}
ELASTIC_OPTIONS = BuildOptions(resize_short=40, shard_samples=12, valid_fraction=0.1)
TRAIN_SIZES = [12, 12, 12, 12]  # equal shards: no stream of these layouts reads a sample twice per epoch
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def elastic_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = synth_set(tmp_path_factory, ELASTIC_SYNTH, ELASTIC_OPTIONS)
    sizes = [s["num_samples"] for s in load_manifest(str(out))["splits"]["train"]["shards"]]
    assert sizes == TRAIN_SIZES, sizes  # what the tests assume
    return out


def topology(processes: int, workers: int, batch: int, accum: int, buffer: int = 7) -> Topology:
    return Topology(processes, workers, batch, accum, buffer)


def counted(sizes: list[int]) -> list[data.Shard]:
    return [data.Shard(f"shard-{i}", n) for i, n in enumerate(sizes)]


def quotas(new: Topology, steps: int, step: int) -> list[int]:
    """Samples each stream of `new` delivers from optimizer step `step` to the epoch's end."""
    per_rank = range(step * new.grad_accum, steps * new.grad_accum)
    return [sum(1 for i in per_rank if i % new.streams == stream % new.streams) * new.batch_size
            for stream in range(new.processes * new.streams)]


# (train shard sizes, old layout, new layout, step of the change, whether an old stream may read a sample twice)
PLANS = [
    (TRAIN_SIZES, topology(2, 2, 4, 1), topology(1, 0, 4, 2), 2, False),
    (TRAIN_SIZES, topology(1, 1, 8, 1), topology(2, 2, 2, 2), 3, False),
    ([12, 12, 12, 12, 4], topology(1, 3, 2, 2), topology(2, 1, 2, 1), 5, True),  # 3 streams, one cycles its shard
    ([7, 3, 11, 5, 9], topology(3, 2, 2, 2), topology(2, 0, 3, 2), 1, True),  # 6 streams > 5 shards: wrap around
]


@pytest.mark.parametrize(("sizes", "old", "new", "step", "repeats"), PLANS)
def test_replayed_and_remaining_positions_partition_the_epoch(sizes: list[int], old: Topology, new: Topology,
                                                               step: int, repeats: bool) -> None:
    shards, seed, epoch = counted(sizes), 3, 1
    assert old.global_batch == new.global_batch
    steps = sum(sizes) // old.global_batch
    consumed = [p for stream in delivered(shards, seed, epoch, steps, Segment(old, 0), set(), step) for p in stream]
    assert len(consumed) == step * old.global_batch
    if not repeats:
        assert len(set(consumed)) == len(consumed)
    chunks = plan(shards, seed=seed, epoch=epoch, steps_per_epoch=steps, segments=[Segment(old, 0),
                  Segment(new, step)], step=step)
    assert [len(c.positions) for c in chunks] == quotas(new, steps, step)
    assert [c.skip for c in chunks] == [0] * len(chunks)
    remaining = [p for c in chunks for p in c.positions]
    assert len(remaining) == (steps - step) * new.global_batch == len(set(remaining))  # each once
    assert not set(remaining) & set(consumed)
    assert all(0 <= i < len(sizes) and 0 <= p < sizes[i] for i, p in remaining)


def test_three_layouts_in_one_epoch_and_a_layout_resuming_itself() -> None:
    """2x2 -> 1x0 at step 2 -> 4x1 at step 4: each segment's chunks come from what no earlier one delivered.
    The 1x0 segment resumed by 1x0 again at step 3 reads the same chunks, skipping what it delivered."""
    shards, steps = counted(TRAIN_SIZES), 6
    a, b, c = topology(2, 2, 4, 1), topology(1, 0, 4, 2), topology(4, 1, 2, 1)
    seen: set = set()
    for segment, end in ((Segment(a, 0), 2), (Segment(b, 2), 4)):
        part = [p for s in delivered(shards, 0, 0, steps, segment, seen, end) for p in s]
        assert len(part) == len(set(part)) == 2 * 8 and not set(part) & seen
        seen |= set(part)
    last = plan(shards, seed=0, epoch=0, steps_per_epoch=steps, segments=[Segment(a, 0), Segment(b, 2),
                Segment(c, 4)], step=4)
    rest = [p for chunk in last for p in chunk.positions]
    assert len(rest) == len(set(rest)) == 2 * 8 and not set(rest) & seen
    assert len(seen | set(rest)) == sum(TRAIN_SIZES)  # 48 = 6 steps x 8: the whole epoch, each sample once

    fresh = plan(shards, seed=0, epoch=0, steps_per_epoch=steps, segments=[Segment(a, 0), Segment(b, 2)], step=2)
    again = plan(shards, seed=0, epoch=0, steps_per_epoch=steps, segments=[Segment(a, 0), Segment(b, 2)], step=3)
    assert [ch.positions for ch in again] == [ch.positions for ch in fresh]
    assert [ch.skip for ch in again] == [8]  # one optimizer step of 2 batches of 4


def shard_keys(location: Path) -> list[list[str]]:
    """Sample keys of every train shard, in the order they are read."""
    out = []
    for shard in load_manifest(str(location))["splits"]["train"]["shards"]:
        with tarfile.open(location / shard["name"]) as tar:
            out.append(list(dict.fromkeys(name.split(".")[0] for name in tar.getnames())))
    return out


def loader_keys(location: Path, rank: int, world: int, workers: int, batch: int, accum: int, count: int,
                **extra: object) -> list[str]:
    manifest = load_manifest(str(location))
    batches = data.train_loader(str(location), manifest, transform=tiny_transform, batch_size=batch, workers=workers,
                                seed=2, epoch=1, rank=rank, world_size=world, shuffle_buffer=7, grad_accum=accum,
                                **extra)
    stream = iter(batches)
    keys = [key for b in itertools.islice(stream, count) for key in b["key"]]
    stream.close()
    return keys


def test_replay_matches_the_loader_and_chunks_load_exactly_the_rest(elastic_shards: Path) -> None:
    """The positions the replay says 2 processes x 2 workers delivered in 3 steps are the keys their real
    loaders gave; a 1-process loader given the chunks then yields exactly the other keys of the epoch."""
    keys = shard_keys(elastic_shards)
    old, new, steps, step = topology(2, 2, 4, 1), topology(1, 0, 4, 2), 6, 3  # worker 0 delivered 2 batches, 1 one
    real = sorted(k for rank in (0, 1) for k in loader_keys(elastic_shards, rank, 2, 2, 4, 1, step))
    replayed = delivered(data.train_shards(str(elastic_shards), load_manifest(str(elastic_shards))), 2, 1, steps,
                         Segment(old, 0), set(), step)
    assert real == sorted(keys[i][p] for stream in replayed for i, p in stream)

    chunks = plan(data.train_shards(str(elastic_shards), load_manifest(str(elastic_shards))), seed=2, epoch=1,
                  steps_per_epoch=steps, segments=[Segment(old, 0), Segment(new, step)], step=step)
    rest = loader_keys(elastic_shards, 0, 1, 0, 4, 2, 100, start_batch=step * 2, chunks=chunks)
    assert len(rest) == len(set(rest)) == (steps - step) * 8
    assert sorted(rest) == sorted(keys[i][p] for c in chunks for i, p in c.positions)
    assert not set(rest) & set(real)


def test_global_batch_kept_or_refused(capsys: pytest.CaptureFixture[str], fitted_run: Path, train_shards: Path,
                                      tmp_path: Path) -> None:
    """fitted_run: 1 process x batch 8. A batch size that divides the global batch gets its --grad-accum; one
    that does not is refused with one line naming settings that work, and nothing is written."""
    saved = topology(2, 2, 4, 2)  # global batch 16
    assert keep_global_batch(saved, 2, 4, 2, "step-1") == (2, None)
    accum, line = keep_global_batch(saved, 1, 4, 1, "step-00000003")
    assert (accum, line) == (4, "resuming the 2x2 topology (processes x workers) of step-00000003 as 1 process(es): "
                                "--grad-accum 4 keeps the global batch of 16")
    with pytest.raises(Exception, match="use a number of processes that divides 16"):
        keep_global_batch(saved, 3, 4, 1, "step-1")

    run_dir = Path(shutil.copytree(fitted_run, tmp_path / "run"))
    kept = ["config.yaml", "run.json", "metrics.jsonl", "results.json", *map(str, run_dir.glob("checkpoints/*/*.json"))]
    before = {name: (run_dir / name).read_bytes() for name in kept}
    result = run_main(capsys, "fit", "--shards", str(train_shards), *FIT_ARGS, "--run-dir", str(run_dir),
                      "--resume", "auto", "--batch-size", "3")
    name = sorted((run_dir / "checkpoints").glob("step-*"))[-1].name
    assert_one_line_error(result, f"cannot resume {name} with --batch-size 3 x 1 process(es): its global batch is 8 "
                                  "(--batch-size 8 x --grad-accum 1 x 1 process(es)), which must stay the same; use e.g. "
                                  "--batch-size 2 --grad-accum 4")
    assert {name: (run_dir / name).read_bytes() for name in kept} == before


# ---------------------------------------------------------------- real runs


CHAIN_ARGS = (*FIT_ARGS, "--epochs", "3", "--batch-size", "5", "--keep-checkpoints", "100", "--checkpoint-every", "2",
              "--ema-decay", "0.9", "--tta", "flip")  # the EMA's state goes from 2 processes to 1 and back
STEPS_PER_EPOCH = 48 // 10  # global batch 10 (5 x 2 processes, or 5 x --grad-accum 2): 8 samples dropped


def cut_at(group: procs.Group, run_dir: Path, step: int, proc: object) -> None:
    """Wait for the checkpoint of `step`, kill the run (wherever it got to), and remove the checkpoints it
    wrote after that step: as if it had been killed right after writing it."""
    wanted = run_dir / "checkpoints" / f"step-{step:08d}" / "trainer.json"
    wait_for(lambda: wanted.exists() or proc.poll() is not None, RUN_TIMEOUT_S, f"checkpoint {wanted.parent.name}")
    assert wanted.exists(), group.output(group.names[-1])[-3000:]
    group.kill()
    for newer in (run_dir / "checkpoints").glob("step-*"):
        if int(newer.name.split("-")[1]) > step:
            shutil.rmtree(newer)
    state = json.loads(wanted.read_text())
    assert 0 < state["step_in_epoch"] < state["steps_per_epoch"] == STEPS_PER_EPOCH, state


def recorded(path: Path, last_step: int | None = None) -> list[dict]:
    """Key records of every rank of one run, up to `last_step` (what a killed run trained past its checkpoint
    is trained again by the resumed one)."""
    lines = [json.loads(line) for f in sorted(path.parent.glob(f"{path.name}.rank*.jsonl"))
             for line in f.read_text().splitlines()]
    return [r for r in lines if last_step is None or r["step"] <= last_step]


@pytest.mark.multiprocess
@pytest.mark.timeout(4 * RUN_TIMEOUT_S)
def test_two_by_two_to_one_by_one_and_back(elastic_shards: Path, tmp_path: Path) -> None:
    run_dir, keys = tmp_path / "run", tmp_path / "keys"
    command = ["-m", "train", "fit", "--shards", str(elastic_shards), *CHAIN_ARGS, "--run-dir", str(run_dir)]
    env = launch_env(tmp_path)
    with procs.group(tmp_path / "a-logs") as group:  # 2 processes x 2 workers, cut at step 2 of epoch 1
        launcher = group.start("a", [*procs.launch_args(2, free_port()), *command, "--workers", "2"],
                               {**env, keylog.ENV: f"{keys}-a"})
        cut_at(group, run_dir, 2, launcher)
    with procs.group(tmp_path / "b-logs") as group:  # 1 process x 1 worker from there, cut at step 2 of epoch 2
        proc = group.start_warm("b", [*command[1:], "--workers", "1", "--resume", "auto"],
                                 {**env, keylog.ENV: f"{keys}-b"})
        cut_at(group, run_dir, 6, proc)
        assert ("resuming the 2x2 topology (processes x workers) of step-00000002 as 1 process(es): --grad-accum 2 "
                "keeps the global batch of 10") in group.output("b")
    with procs.group(tmp_path / "c-logs") as group:  # 2 x 2 again, to the end
        group.start("c", [*procs.launch_args(2, free_port()), *command, "--workers", "2", "--resume", "auto"],
                    {**env, keylog.ENV: f"{keys}-c"})
        assert group.finish(RUN_TIMEOUT_S) == [0], group.output("c")[-3000:]
        assert "from step-00000006" in group.output("c") and "keeps the global batch" not in group.output("c")

    trained = [*recorded(tmp_path / "keys-a", 2), *recorded(tmp_path / "keys-b", 6), *recorded(tmp_path / "keys-c")]
    all_keys = {k for shard in shard_keys(elastic_shards) for k in shard}
    for epoch in (1, 2, 3):
        seen = Counter(k for r in trained if r["epoch"] == epoch for k in r["keys"])
        assert max(seen.values()) == 1 and set(seen) <= all_keys, epoch  # no sample twice in an epoch
        assert sum(seen.values()) == STEPS_PER_EPOCH * 10, epoch
    ranks = {(r["epoch"], r["step"]): set() for r in trained}
    for r in trained:
        ranks[(r["epoch"], r["step"])].add(r["rank"])
    assert [sorted(ranks[e, s]) for e, s in sorted(ranks)] == [[0, 1]] * 2 + [[0]] * 4 + [[0, 1]] * 6

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    total = 3 * STEPS_PER_EPOCH
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.003)
    scheduler = build_scheduler(optimizer, total)
    expected = []
    for _ in range(total):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [r["step"] for r in steps] == list(range(1, total + 1))
    assert [r["lr"]["fc"] for r in steps] == pytest.approx(expected, rel=1e-12)  # resumed steps 3 and 7 included
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [e["train"]["rank_batches"] for e in epochs] == [[4], [2, 2], [4, 4]]  # batches since each resume
    assert json.loads((run_dir / "results.json").read_text())["test"]["num_samples"] == 52
