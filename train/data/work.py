"""What one DataLoader worker runs: a train or eval job (its shards and counts, from train.data.assignment) and
the chain of stages it assembles into batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from train.data.batching import Batch, _batched, _Ring
from train.data.shards import Shard, read_shard
from train.data.stages import Transform, _skipped, decoded, stream_samples

# A train stream gives up after this many corrupt samples in a row beyond one pass over its shards
# (plus headroom for the shuffle buffer): a worker whose every sample is corrupt would otherwise loop forever.
BAD_RUN_BUFFER_FACTOR = 20


@dataclass(frozen=True)
class _TrainJob:
    shards: tuple[Shard, ...]
    stream: int | str  # seeds the shuffle buffer and later passes: the stream's number, or a chunk's tag
    skip_samples: int
    num_batches: int
    batch_size: int
    transform: Transform
    num_classes: int
    seed: int
    epoch: int
    shuffle_buffer: int
    keep: tuple[frozenset[int], ...] | None = None  # a chunk's positions in each of `shards` (None: all)

    def batches(self, ring: _Ring | None) -> Iterator[Batch]:
        if self.num_batches == 0:
            return iter(())
        # Shuffle exactly the samples this worker uses in the whole epoch (the same for a resumed worker),
        # so nothing is read (or downloaded) only to fill a buffer; the endless rest of the stream is read
        # only to replace corrupt samples.
        quota = self.skip_samples + self.num_batches * self.batch_size
        buffer = min(self.shuffle_buffer, quota)
        stream = stream_samples(self.shards, self.keep, seed=self.seed, epoch=self.epoch, stream=self.stream,
                                quota=quota, shuffle_buffer=self.shuffle_buffer, read=read_shard)
        samples = _skipped(stream, self.skip_samples, self.num_classes)
        one_pass = sum(s.num_samples for s in self.shards) if self.keep is None else sum(map(len, self.keep))
        max_bad_run = one_pass + BAD_RUN_BUFFER_FACTOR * buffer
        items = decoded(samples, self.transform, self.num_classes, self.seed, self.epoch, max_bad_run)
        return _batched(items, self.batch_size, ring, limit=self.num_batches)


@dataclass(frozen=True)
class _EvalJob:
    shards: tuple[Shard, ...]
    batch_size: int
    transform: Transform
    num_classes: int

    def batches(self, ring: _Ring | None) -> Iterator[Batch]:
        samples = (sample for shard in self.shards for sample in read_shard(shard))
        items = decoded(samples, self.transform, self.num_classes, seed=0, epoch=0)
        return _batched(items, self.batch_size, ring)
