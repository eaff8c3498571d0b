"""Decoded samples -> uint8 batches, stacked into each DataLoader worker's reusable shared-memory buffers
(`_Ring`), and the main process's half of that protocol (`_released`: a buffer is handed back only once no
tensor refers to it)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import default_collate

from pipeline.shardformat import Sample

Batch = dict[str, Any]

# Shared-memory batch buffers per DataLoader worker: two batches in flight (the DataLoader's prefetch_factor),
# the one just received, the one the consumer still holds, and the one it dropped (handed back when the next
# batch arrives). A consumer that keeps more only makes workers fall back to fresh shared memory.
RING_SLOTS = 5


class _Ring:
    """The reusable shared-memory image buffers of one DataLoader worker.

    torch moves every batch a worker returns into new shared memory: creating and faulting in a fresh
    segment for every batch (9.6 MB at 64 x 224 x 224 x 3) is a sizeable share of a worker's work
    (bench/micro.py measures it, see bench/README.md). Instead a worker stacks each batch into one of its
    RING_SLOTS buffers, shared once; torch sends a tensor that is already shared as a handle, without
    copying. The worker takes a slot only while its `free` flag is set, and only `Batches` (main process)
    sets it again, once the batch's memory is unreferenced there. With no free slot the batch goes into
    fresh shared memory as before: a worker never waits on the consumer.
    """

    def __init__(self, free: torch.Tensor, first: int) -> None:
        self.free = free
        self.slots = range(first, first + RING_SLOTS)
        self.buffers: dict[int, torch.Tensor] = {}

    def stack(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(images stacked into [B, H, W, C], its slot), or (a fresh shared batch, -1)."""
        shape = (len(images), *images[0].shape)
        for slot in self.slots:
            if not self.free[slot]:
                continue
            if slot not in self.buffers:
                self.buffers[slot] = torch.empty(shape, dtype=torch.uint8).share_memory_()
            buffer = self.buffers[slot]
            if buffer.shape[1:] != shape[1:] or len(buffer) < len(images):
                break  # another image size (not within one loader) or a bigger batch: no reuse
            self.free[slot] = 0
            return torch.stack(images, out=buffer[:len(images)]), slot
        return default_collate(images), -1


def _released(free: torch.Tensor, slot: int, ref: StorageWeakRef) -> bool:
    """Mark `slot` free for its worker once nothing in this process refers to its memory."""
    if not ref.expired():
        return False
    free[slot] = 1
    return True


def _batched(items: Iterable[Sample | None], batch_size: int, ring: _Ring | None,
             limit: int | None = None) -> Iterator[Batch]:
    """Full batches (at most `limit`), then the short remainder if the input ends first (eval)."""
    keys: list[str] = []
    images: list[np.ndarray] = []
    labels: list[int] = []
    bad = 0
    produced = 0
    for item in items:
        if item is None:
            bad += 1
            continue
        keys.append(item.key)
        images.append(item.image)
        labels.append(item.label)
        if len(keys) == batch_size:
            yield _batch(keys, images, labels, bad, ring)
            keys, images, labels, bad = [], [], [], 0
            produced += 1
            if produced == limit:
                return
    if keys:
        yield _batch(keys, images, labels, bad, ring)


def _batch(keys: list[str], images: list[np.ndarray], labels: list[int], bad: int, ring: _Ring | None) -> Batch:
    shape = images[0].shape
    if any(image.dtype != np.uint8 or image.shape != shape for image in images) or len(shape) != 3 \
            or shape[2] != 3:
        raise TypeError(f"the transform must return HWC uint8 images of one size with 3 channels, got "
                        f"{images[0].dtype} {shape}")
    # Stacked straight into shared memory (a ring buffer, or default_collate's in a worker), so the batch
    # reaches the main process without another copy; NHWC viewed as NCHW is channels_last.
    tensors = [torch.from_numpy(image) for image in images]
    stacked, slot = ring.stack(tensors) if ring is not None else (default_collate(tensors), -1)
    return {"image": stacked.permute(0, 3, 1, 2), "label": torch.tensor(labels, dtype=torch.int64),
            "key": keys, "bad": bad, "slot": slot}
