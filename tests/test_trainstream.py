"""The train stream's resume state (TrainStream.state_dict / from_state), the role rule of the process
topology, and trainer.json's keys: a state saved mid-epoch and loaded gives exactly the batches the
uninterrupted stream had still to give, under the same topology or another one with the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data import shards, tiny_transform  # noqa: F401 (shards: the module's hand-written shard set)

from pipeline.manifest import load_manifest
from train import lifecycle
from train.data import elastic
from train.data.topology import Topology, role_batches
from train.data.trainstream import TrainStream
from train.lifecycle import TRAINER_KEYS, Progress
from train.metrics import Totals

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

# the keys trainer.json has always held; checkpoints written before keep resuming, so none may go or change
TRAINER_JSON_KEYS = {"epoch", "step_in_epoch", "global_step", "best_loss", "best_epoch", "best_valid", "partial",
                     "partial_bad", "world_size", "workers", "steps_per_epoch", "batch_size", "grad_accum",
                     "shuffle_buffer", "segments"}
STEPS = 5  # 35 train samples: 11 batches of 3 -> 5 steps of 2, or 5 batches of 6 -> 5 steps of 1


def opened(root: Path, stream: TrainStream, epochs: int, rank: int = 0) -> TrainStream:
    location = str(root)
    return stream.open(location, load_manifest(location), transform=tiny_transform, seed=3, rank=rank, epochs=epochs)


def keys(stream: TrainStream, batches: int | None = None) -> list[str]:
    taken = []
    for batch in stream:
        taken.extend(batch["key"])
        if batches is not None and len(taken) == batches * len(batch["key"]):
            break
    return taken


def saved(stream: TrainStream) -> dict:
    """The stream's state as a checkpoint gives it back (through JSON), the stream closed."""
    state = json.loads(json.dumps(stream.state_dict()))
    stream.close()
    return state


def test_a_state_saved_mid_epoch_resumes_exactly_the_remaining_batches(shards: Path) -> None:  # noqa: F811
    topology = Topology(processes=1, workers=2, batch_size=3, grad_accum=2, shuffle_buffer=8)
    whole = keys(opened(shards, TrainStream(topology, STEPS), epochs=2))
    assert len(whole) == 2 * STEPS * 2 * 3

    cut = opened(shards, TrainStream(topology, STEPS), epochs=2)
    first = keys(cut, batches=6)  # 3 optimizer steps of epoch 0
    state = saved(cut)
    assert (state["epoch"], state["step_in_epoch"], state["segments"]) == (0, 3, [])
    assert (state["world_size"], state["workers"], state["batch_size"], state["grad_accum"]) == (1, 2, 3, 2)
    resumed = TrainStream.from_state(state, topology, topology, STEPS)
    assert (resumed.epoch, resumed.step_in_epoch, resumed.segments) == (0, 3, [])
    rest = opened(shards, resumed, epochs=2)
    assert first + keys(rest) == whole  # the rest of epoch 0, then epoch 1, batch for batch
    assert rest.state_dict()["epoch"] == 2 and rest.step_in_epoch == 0  # the epoch rolls over with its last batch


def test_a_state_resumed_under_another_topology_gives_the_unseen_samples(shards: Path) -> None:  # noqa: F811
    """2 workers x batch 3 x 2 accumulated -> no workers x batch 6: the same global batch of 6."""
    before = Topology(processes=1, workers=2, batch_size=3, grad_accum=2, shuffle_buffer=8)
    after = Topology(processes=1, workers=0, batch_size=6, grad_accum=1, shuffle_buffer=8)
    cut = opened(shards, TrainStream(before, STEPS), epochs=1)
    first = keys(cut, batches=6)
    state = saved(cut)

    resumed = TrainStream.from_state(state, before, after, STEPS)
    again = resumed.state_dict()  # what a checkpoint of the resumed run, before its first step, would hold
    assert [record["layout"] for record in again["segments"]] == [
        {"processes": 1, "workers": 2, "batch_size": 3, "grad_accum": 2, "shuffle_buffer": 8},
        {"processes": 1, "workers": 0, "batch_size": 6, "grad_accum": 1, "shuffle_buffer": 8}]
    assert [record["from_step"] for record in again["segments"]] == [0, 3]
    rest = keys(opened(shards, resumed, epochs=1))
    assert len(rest) == len(set(rest)) == (STEPS - 3) * 6 and not set(rest) & set(first)

    # the resumed run resuming itself (same topology) reads the same chunks from the same place
    itself = TrainStream.from_state(json.loads(json.dumps(again)), after, after, STEPS)
    assert itself.state_dict() == again
    assert keys(opened(shards, itself, epochs=1)) == rest


@pytest.mark.parametrize("streams", [1, 2, 3, 4])
def test_role_batches_counts_the_rank_batches_a_stream_owns(streams: int) -> None:
    for role in range(streams):
        for start in range(0, 9):
            for end in range(start, 12):
                owned = sum(1 for i in range(start, end) if i % streams == role)
                assert role_batches(streams, role, start, end) == owned


def test_trainer_json_keeps_its_keys() -> None:
    stream = TrainStream(Topology(processes=2, workers=1, batch_size=4, grad_accum=1, shuffle_buffer=0), STEPS, 1, 2)
    state = lifecycle.trainer_state(Progress(global_step=7), stream, Totals())
    assert set(state) == TRAINER_JSON_KEYS and set(TRAINER_KEYS) <= TRAINER_JSON_KEYS
    assert (state["epoch"], state["step_in_epoch"], state["global_step"], state["world_size"]) == (1, 2, 7, 2)
    assert Progress.from_state(state) == Progress(global_step=7)


def test_an_older_trainer_json_resumes_with_the_saved_config_filling_in() -> None:
    """A checkpoint from before steps_per_epoch, segments and the batch keys were saved: the run's saved
    config (which such a run could not change) gives its topology."""
    old = {"epoch": 2, "step_in_epoch": 3, "global_step": 13, "best_loss": 0.5, "best_epoch": 2, "best_valid": {},
           "partial": [1.0, 2.0, 3.0, 4.0], "partial_bad": 1, "world_size": 2, "workers": 1}
    assert set(TRAINER_KEYS) <= set(old)
    saved_topology = elastic.saved_topology(old, {"batch_size": 4, "grad_accum": 2, "shuffle_buffer": 16})
    assert saved_topology == Topology(processes=2, workers=1, batch_size=4, grad_accum=2, shuffle_buffer=16)
    stream = TrainStream.from_state(old, saved_topology, saved_topology, STEPS)
    assert (stream.epoch, stream.step_in_epoch, stream.batch_in_epoch, stream.segments) == (2, 3, 6, [])
    totals = Totals()
    totals.load_state_dict(old)
    assert totals.sums.tolist() == old["partial"] and int(totals.bad) == 1
    assert Progress.from_state(old) == Progress(global_step=13, best_loss=0.5, best_epoch=2)
