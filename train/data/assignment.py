"""Who reads what: batch counts per rank, the (seed, epoch) shard order dealt to the train streams, the
batches each worker owns and has already delivered at a resume, and the jobs every worker runs."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.errors import UserError
from pipeline.seeded import seeded_random
from train.data.shards import Shard
from train.data.stages import Transform
from train.data.topology import role_batches
from train.data.work import _EvalJob, _TrainJob

Position = tuple[int, int]  # (index of the shard in the manifest's train list, sample index within that shard)


@dataclass(frozen=True)
class Chunk:
    """What one train stream delivers of an epoch resumed under another topology (train.data.elastic):
    `positions` in reading order (the touched shards in turn, positions ascending), the first `skip` of
    them (after the shuffle) already delivered before the checkpoint; `tag` seeds its shuffle buffer."""

    positions: tuple[Position, ...]
    skip: int
    tag: str


def train_batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches every rank yields per epoch: floor(num_samples / global batch)."""
    batches = num_samples // (batch_size * world_size)
    if batches == 0:
        raise UserError(
            f"the train split has {num_samples} samples, fewer than one global batch "
            f"({batch_size} per process x {world_size} processes): lower --batch-size or use fewer processes"
        )
    return batches


def epoch_batches(num_samples: int, batch_size: int, world_size: int, grad_accum: int = 1) -> int:
    """Batches a rank trains on per epoch: whole optimizer steps of train_batches_per_epoch(...); the
    batches of an incomplete last step are not produced (they would spill into the next epoch)."""
    total = train_batches_per_epoch(num_samples, batch_size, world_size)
    return total - total % grad_accum


def check_topology(batch_size: int, workers: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or workers < 0 or not 0 <= rank < world_size:
        raise ValueError(f"bad loader topology: batch_size={batch_size} workers={workers} "
                         f"rank={rank} world_size={world_size}")


def train_jobs(shards: list[Shard], *, transform: Transform, batch_size: int, workers: int, seed: int,
               epoch: int, rank: int, world_size: int, start_batch: int, epochs: int, total: int,
               shuffle_buffer: int, num_classes: int, chunks: list[Chunk] | None) -> list[list[_TrainJob]]:
    """The jobs of this rank's workers (jobs[w]: worker w's, one per epoch) for `epochs` epochs from batch
    `start_batch` of `epoch` on; `total`: a rank's batches per epoch (`epoch_batches`). See train_loader."""
    num_workers = max(workers, 1)
    jobs: list[list[_TrainJob]] = [[] for _ in range(num_workers)]
    for e in range(epoch, epoch + epochs):
        streams = stream_shards(shards, seed=seed, epoch=e, num_streams=world_size * num_workers)
        for worker in range(num_workers):
            # The DataLoader takes this rank's batches (counted over the whole run from `start_batch`) from
            # its workers in turn; in epoch e worker w thus owns the batches i = role (mod W). In the first
            # epoch the worker that owned batch start_batch goes first.
            role = (worker + start_batch - (e - epoch) * total) % num_workers
            start = start_batch if e == epoch else 0
            consumed, remaining = role_batches(num_workers, role, 0, start), role_batches(num_workers, role, start, total)
            stream = rank * num_workers + role
            job = _TrainJob(
                shards=streams[stream], stream=stream, skip_samples=consumed * batch_size,
                num_batches=remaining, batch_size=batch_size, transform=transform,
                num_classes=num_classes, seed=seed, epoch=e, shuffle_buffer=shuffle_buffer,
            )
            if e == epoch and chunks is not None:
                job = _chunk_job(job, chunks[stream], shards)
            jobs[worker].append(job)
    return jobs


def eval_jobs(mine: list[Shard], workers: int, *, batch_size: int, transform: Transform,
              num_classes: int) -> list[list[_EvalJob]]:
    """One job per worker (one in all without workers): this rank's shards `mine`, worker w every W-th."""
    num_workers = max(workers, 1)
    return [
        [_EvalJob(shards=tuple(mine[w::num_workers]), batch_size=batch_size, transform=transform,
                  num_classes=num_classes)]
        for w in range(num_workers)
    ]


def stream_shards(shards: list[Shard], *, seed: int, epoch: int, num_streams: int) -> list[tuple[Shard, ...]]:
    """The shards of every train stream: one (seed, epoch) order shared by all ranks, dealt round robin.

    With more streams than shards, stream s reads shard s % n (some shards are read by several streams
    per epoch) and a warning says so.
    """
    order = shard_order(shards, seed=seed, epoch=epoch)
    if num_streams <= len(order):
        return [tuple(order[s::num_streams]) for s in range(num_streams)]
    warnings.warn(
        f"{num_streams} streams (processes x workers) but only {len(order)} train shards: streams wrap "
        f"around the shard list and some samples are read more than once per epoch; write smaller shards "
        f"(--shard-samples) or use fewer workers",
        stacklevel=4,  # the caller of train_loader (which calls train_jobs, which calls this)
    )
    return [(order[s % len(order)],) for s in range(num_streams)]


def shard_order(shards: list[Shard], *, seed: int, epoch: int) -> list[Shard]:
    """The (seed, epoch) order of the train shards, the same on every rank."""
    order = list(shards)
    seeded_random("shards", seed, epoch).shuffle(order)
    return order


def chunk_source(shards: list[Shard], positions: Iterable[Position]) -> tuple[tuple[Shard, ...],
                                                                              tuple[frozenset[int], ...]]:
    """The shards a chunk touches, in its order, and the positions it keeps in each."""
    keep: dict[int, set[int]] = {}
    for shard, position in positions:
        keep.setdefault(shard, set()).add(position)
    return tuple(shards[i] for i in keep), tuple(frozenset(kept) for kept in keep.values())


def _chunk_job(job: _TrainJob, chunk: Chunk, shards: list[Shard]) -> _TrainJob:
    """`job` reading `chunk` instead of its stream's shards."""
    if chunk.skip + job.num_batches * job.batch_size != len(chunk.positions):
        raise ValueError(f"chunk of {len(chunk.positions)} samples for a stream that skips {chunk.skip} and "
                         f"delivers {job.num_batches} batches of {job.batch_size}")
    touched, keep = chunk_source(shards, chunk.positions)
    return dataclasses.replace(job, shards=touched, keep=keep, stream=chunk.tag, skip_samples=chunk.skip)
