"""A run's train stream and the one owner of where it stands: the epoch and the batches of it this process
has taken, the process topology reading it, and the topologies the epoch in progress ran under (its
segments), from which a resumed epoch's chunks follow (train.data.elastic).

A checkpoint stores `state_dict()` as it is and `from_state` reads it back. Its keys are trainer.json's
(older checkpoints lack steps_per_epoch, segments and some topology keys: see elastic.saved_topology)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from train.data import elastic
from train.data.assignment import Chunk
from train.data.loaders import train_loader
from train.data.shards import train_shards
from train.data.stages import Transform
from train.data.topology import Topology

# What from_state needs of a checkpoint (the other keys of state_dict came later; see the module docstring).
REQUIRED_KEYS = ("epoch", "step_in_epoch", "world_size", "workers")


class TrainStream:
    """This process's train batches from (epoch, step_in_epoch) on, under `topology`: iterate it once
    opened; the position advances with every batch taken, and an epoch ends after steps_per_epoch x
    grad_accum of them (its segments end with it: later epochs read their normal streams)."""

    def __init__(self, topology: Topology, steps_per_epoch: int, epoch: int = 0, step_in_epoch: int = 0,
                 segments: list[elastic.Segment] | None = None) -> None:
        self.topology = topology
        self.steps_per_epoch = steps_per_epoch
        self.epoch = epoch
        self.batch_in_epoch = step_in_epoch * topology.grad_accum  # this process's batches of `epoch` taken
        self.segments = list(segments or [])  # empty: the epoch never changed topology
        self._batches: Generator[dict[str, Any], None, None] | None = None

    @property
    def step_in_epoch(self) -> int:
        """Optimizer steps of `epoch` done."""
        return self.batch_in_epoch // self.topology.grad_accum

    def state_dict(self) -> dict[str, Any]:
        """The position and topology, by trainer.json's names (world_size for processes)."""
        t = self.topology
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "world_size": t.processes,
                "workers": t.workers, "steps_per_epoch": self.steps_per_epoch, "batch_size": t.batch_size,
                "grad_accum": t.grad_accum, "shuffle_buffer": t.shuffle_buffer,
                "segments": elastic.as_records(self.segments)}

    @classmethod
    def from_state(cls, state: dict[str, Any], saved: Topology, now: Topology, steps_per_epoch: int) -> TrainStream:
        """The stream of a checkpoint's `state`, written under topology `saved`, resumed under `now`; when
        they differ mid-epoch, the epoch in progress records the change (a segment)."""
        segments = elastic.segments_after_resume(state, saved, now)
        return cls(now, steps_per_epoch, state["epoch"], state["step_in_epoch"],
                   segments if len(segments) > 1 else None)

    def chunks(self, location: str, manifest: dict[str, Any], seed: int) -> list[Chunk] | None:
        """What the streams read of the epoch in progress when it changed topology (None: its normal
        streams)."""
        if not self.step_in_epoch or not self.segments:
            return None
        return elastic.plan(train_shards(location, manifest), seed=seed, epoch=self.epoch,
                            steps_per_epoch=self.steps_per_epoch, segments=self.segments, step=self.step_in_epoch)

    def open(self, location: str, manifest: dict[str, Any], *, transform: Transform, seed: int, rank: int,
             epochs: int) -> TrainStream:
        """Start the loader of `epochs` epochs from here (its workers start once); `close` stops them."""
        t = self.topology
        self._batches = iter(train_loader(
            location, manifest, transform=transform, batch_size=t.batch_size, workers=t.workers, seed=seed,
            epoch=self.epoch, rank=rank, world_size=t.processes, start_batch=self.batch_in_epoch, epochs=epochs,
            shuffle_buffer=t.shuffle_buffer, grad_accum=t.grad_accum, chunks=self.chunks(location, manifest, seed)))
        return self

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._batches is None:
            raise RuntimeError("TrainStream.open first")
        batch = next(self._batches)
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.steps_per_epoch * self.topology.grad_accum:
            self.epoch, self.batch_in_epoch, self.segments = self.epoch + 1, 0, []
        return batch

    def close(self) -> None:
        if self._batches is not None:
            self._batches.close()
