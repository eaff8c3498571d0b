"""The process topology of a run (processes x DataLoader workers x batch size x gradient accumulation x
shuffle buffer: how it reads an epoch) and the one rule for which batches each of a rank's streams delivers.

Not to be confused with a dataset layout (a source's file tree, pipeline.sources): a topology is about
processes, never about files."""

from __future__ import annotations

from dataclasses import dataclass

# Saved in trainer.json with world_size and workers (the checkpoint keys keep their older names).
TOPOLOGY_KEYS = ("batch_size", "grad_accum", "shuffle_buffer")


@dataclass(frozen=True)
class Topology:
    """How one run reads an epoch: processes x streams per process, each stream's batches."""

    processes: int
    workers: int  # DataLoader workers per process; 0 reads in the process itself: one stream
    batch_size: int
    grad_accum: int
    shuffle_buffer: int

    @property
    def streams(self) -> int:
        """Streams per process."""
        return max(self.workers, 1)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.processes


def role_batches(streams: int, role: int, start: int, end: int) -> int:
    """How many of a rank's batches start, start + 1, ..., end - 1 the stream with this role delivers: the
    DataLoader takes the rank's batch i from its stream i % streams, so a role owns i = role (mod streams)."""
    return len(range(role, end, streams)) - len(range(role, start, streams))
