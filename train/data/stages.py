"""The stages a worker's samples pass through: the train stream of one epoch (shards cycled, a seeded
shuffle buffer, the resume skip) and decoding + augmenting (train and eval).

A train stream depends on sample counts and seeds only, never on content (`stream_samples`), which is what
lets train.data.elastic replay it on positions instead of samples.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from pipeline.seeded import seeded_random
from pipeline.shardformat import Sample
from pipeline.shardformat.check import CorruptSample, decode_sample, sample_problem
from train.augment import Augment, sample_seed
from train.data.shards import Shard, ShardError

log = logging.getLogger(__name__)

Transform = Callable[[np.ndarray, int], np.ndarray]


def stream_samples(shards: tuple[Shard, ...], keep: tuple[frozenset[int], ...] | None, *, seed: int, epoch: int,
                   stream: int | str, quota: int, shuffle_buffer: int,
                   read: Callable[[Shard], Iterator[Any]]) -> Iterator[Any]:
    """What one train stream delivers in one epoch, in order: the first `quota` items of its shards (read
    endlessly, see `_cycled`; with `keep`, only positions keep[i] of shards[i]) shuffled together in a
    seeded buffer, then the endless rest (read only to replace corrupt samples).

    It depends on sample counts and seeds only, never on content: with `read` giving positions instead of
    samples it replays which samples a stream delivered (train.data.elastic)."""
    if keep is not None:
        read = _only(read, dict(zip(shards, keep, strict=True)))
    cycled = _cycled(shards, seed, epoch, stream, read)
    head = _shuffled(itertools.islice(cycled, quota), min(shuffle_buffer, quota), seeded_random("buffer", seed, epoch, stream))
    return itertools.chain(head, cycled)


def _only(read: Callable[[Shard], Iterator[Any]], keep: dict[Shard, frozenset[int]]) -> Callable[[Shard], Iterator[Any]]:
    """`read` keeping only the given positions of each shard (position = index in the shard as read),
    stopping after the last one."""
    def reader(shard: Shard) -> Iterator[Any]:
        wanted = keep[shard]
        last = max(wanted)
        with contextlib.closing(read(shard)) as items:
            for position, item in enumerate(items):
                if position in wanted:
                    yield item
                    if position == last:
                        return
    return reader


def _cycled(shards: tuple[Shard, ...], seed: int, epoch: int, stream: int | str,
            read: Callable[[Shard], Iterator[Any]]) -> Iterator[Any]:
    """What `read` gives for each of `shards` (samples, or positions), endlessly: the first pass in the
    given order, later passes reshuffled."""
    for cycle in itertools.count():
        order = list(shards)
        if cycle:
            seeded_random("cycle", seed, epoch, stream, cycle).shuffle(order)
        count = 0
        for shard in order:
            for sample in read(shard):
                count += 1
                yield sample
        if count == 0:
            raise ShardError(f"train shards {[s.url for s in shards]} hold no samples; the run stops")


def _shuffled(samples: Iterable[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Shuffle buffer of `size` raw samples; deterministic given the input order and `rng`."""
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def _skipped(samples: Iterable[dict[str, Any]], count: int, num_classes: int) -> Iterator[dict[str, Any]]:
    """Drop the first `count` usable samples (consumed before a resume) without decoding them; corrupt
    ones in between are dropped too (they were reported before the interruption)."""
    samples = iter(samples)
    while count > 0:
        if sample_problem(next(samples), num_classes) is None:
            count -= 1
    yield from samples


def decoded(samples: Iterable[dict[str, Any]], transform: Transform, num_classes: int, seed: int,
            epoch: int, max_bad_run: int | None = None) -> Iterator[Sample | None]:
    """Each raw sample decoded, its image replaced by the augmented HWC uint8 pixels; None for a dropped
    corrupt sample (one warning line), so that the batch stage can count it."""
    bad_run = 0
    for raw in samples:
        key = raw["__key__"]
        aug_seed = sample_seed(seed, epoch, key)
        try:
            if isinstance(transform, Augment):  # decoded at the size its augmentation needs (train.decode)
                sample = decode_sample(raw, num_classes, functools.partial(transform.decode, seed=aug_seed))
                image, source_shape = sample.image
            else:
                sample = decode_sample(raw, num_classes)
                image, source_shape = sample.image, None
        except CorruptSample as e:
            log.warning("dropped corrupt sample %s in shard %s: %s", key, raw["__url__"], e)
            bad_run += 1
            if max_bad_run is not None and bad_run > max_bad_run:
                raise ShardError(f"{bad_run} corrupt samples in a row (last in {raw['__url__']}): "
                                 f"the shard set is broken; check it with `python -m pipeline verify`") from None
            yield None
            continue
        bad_run = 0
        if source_shape is None:
            sample.image = transform(image, aug_seed)
        else:
            sample.image = transform(image, aug_seed, source_shape)
        yield sample
