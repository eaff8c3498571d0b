"""The loaders: `train_loader` and `eval_loader` build their workers' jobs (train.data.assignment) and run them in
one DataLoader; `Batches` iterates it, hands the workers' ring buffers back and keeps a worker's ShardError
to its one line."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.errors import UserError
from train.data.assignment import Chunk, check_topology, epoch_batches, eval_jobs, train_jobs
from train.data.batching import RING_SLOTS, Batch, _released, _Ring
from train.data.shards import ShardError, shard_error_message, split_shards
from train.data.stages import Transform
from train.data.work import _EvalJob, _TrainJob


def train_loader(
    location: str,
    manifest: dict[str, Any],
    *,
    transform: Transform,
    batch_size: int,
    workers: int,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    start_batch: int = 0,
    epochs: int = 1,
    shuffle_buffer: int = 1000,
    grad_accum: int = 1,
    chunks: list[Chunk] | None = None,
) -> Batches:
    """The train batches of `epochs` epochs on one rank, from batch `start_batch` of `epoch` on: exactly
    epochs * epoch_batches(...) - start_batch, epoch after epoch, told apart by count.

    One loader for a whole run keeps its worker processes and lets their prefetching run on across epoch
    ends (no start-up per epoch); its batches are those of one loader per epoch.
    `start_batch`: batches this rank already consumed in `epoch`. `chunks` (one per stream of this topology,
    stream = rank * max(workers, 1) + role; from train.data.elastic): what the streams read in `epoch` when
    it was begun under another topology; without them, the streams of `epoch` are its normal ones.
    """
    check_topology(batch_size, workers, rank, world_size)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    total = epoch_batches(manifest["splits"]["train"]["num_samples"], batch_size, world_size, grad_accum)
    if not 0 <= start_batch <= total:
        raise UserError(f"cannot resume at batch {start_batch}: an epoch has {total} batches per process")
    shards = split_shards(location, manifest, "train")
    jobs = train_jobs(shards, transform=transform, batch_size=batch_size, workers=workers, seed=seed,
                      epoch=epoch, rank=rank, world_size=world_size, start_batch=start_batch, epochs=epochs,
                      total=total, shuffle_buffer=shuffle_buffer, num_classes=len(manifest["classes"]),
                      chunks=chunks)
    return Batches(_data_loader(jobs, workers), epochs * total - start_batch)


def eval_loader(
    location: str,
    manifest: dict[str, Any],
    split: str,
    *,
    transform: Transform,
    batch_size: int,
    workers: int,
    rank: int,
    world_size: int,
) -> Batches:
    """Every sample of `split` exactly once over all ranks and workers; no padding, last batch may be short.

    Rank r reads shards r::world_size, its worker w every W-th of those. Ranks may get different batch
    counts, or none: sum metrics per rank and all-reduce them afterwards, no per-batch collectives.
    `len()` is the batch count if no sample is corrupt. A corrupt sample after a worker's last batch is
    not reported in "bad": count dropped samples as num_samples - samples seen.
    """
    check_topology(batch_size, workers, rank, world_size)
    mine = split_shards(location, manifest, split)[rank::world_size]
    workers = min(workers, len(mine))  # no idle worker processes
    jobs = eval_jobs(mine, workers, batch_size=batch_size, transform=transform,
                     num_classes=len(manifest["classes"]))
    expected = sum(-(-sum(s.num_samples for s in job.shards) // batch_size) for [job] in jobs)
    return Batches(_data_loader(jobs, workers), expected)


class Batches:
    """The batches of one loader; each iteration restarts the same stream. A ShardError raised in a
    DataLoader worker comes out with its one-line message (not the worker's traceback).

    Hands the workers' ring buffers back (see `_Ring`): a slot is free again once no tensor in this
    process refers to its memory, so a batch kept by the consumer (or a view of it) is never overwritten.
    `ring_misses` counts the batches that came in fresh shared memory because no buffer was free.
    """

    def __init__(self, loader: DataLoader, num_batches: int) -> None:
        self.loader = loader
        self.num_batches = num_batches
        self.ring_misses = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        free = self.loader.dataset.new_ring()  # for the workers this iteration starts (and their buffers)
        held: list[tuple[int, StorageWeakRef]] = []  # slots whose memory this process may still use
        try:
            for batch in self.loader:
                held = [(slot, ref) for slot, ref in held if not _released(free, slot, ref)]
                slot = batch.pop("slot")
                if slot >= 0 and self.loader.pin_memory:
                    free[slot] = 1  # the pin-memory thread copied the batch and dropped the shared buffer
                elif slot >= 0:
                    held.append((slot, StorageWeakRef(batch["image"].untyped_storage())))
                elif free is not None:
                    self.ring_misses += 1
                yield batch
        except ShardError as e:
            raise ShardError(shard_error_message(e)) from None


def _data_loader(jobs: list[list[_TrainJob]] | list[list[_EvalJob]], workers: int) -> DataLoader:
    from train.stopping import ignore_in_worker

    return DataLoader(_WorkerJobs(jobs, workers), batch_size=None, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_in_worker)


class _WorkerJobs(IterableDataset):
    """DataLoader worker i runs the jobs jobs[i] (jobs[0] in the main process when workers=0) with ring
    slots i * RING_SLOTS ... (i + 1) * RING_SLOTS - 1 of the shared `free` flags (none without workers)."""

    def __init__(self, jobs: list[list[_TrainJob]] | list[list[_EvalJob]], workers: int) -> None:
        super().__init__()
        self.jobs = jobs
        self.workers = workers
        self.free: torch.Tensor | None = None

    def new_ring(self) -> torch.Tensor | None:
        """Fresh `free` flags (all set), shared with the workers forked after this call."""
        self.free = torch.ones(self.workers * RING_SLOTS, dtype=torch.uint8).share_memory_() if self.workers else None
        return self.free

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, ring = (0, None) if info is None else (info.id, _Ring(self.free, info.id * RING_SLOTS))
        return itertools.chain.from_iterable(job.batches(ring) for job in self.jobs[worker])
