"""Shard streams -> uint8 batches, for training (exact batch counts on every rank) and evaluation (every
sample exactly once).

A batch is a dict: {"image": uint8 tensor [B, 3, H, W] in channels_last memory, "label": int64 tensor [B],
"key": list[str], "bad": int}, where "bad" counts the corrupt samples the producing worker dropped since its
previous batch.
Batches are assembled inside the DataLoader workers (the DataLoader runs with batch_size=None over an
IterableDataset that yields whole batches) and stay uint8 until the device normalises them (a quarter of
the bytes of float32 through the worker pipes).
Each worker stacks its batches into a few shared-memory buffers it reuses (`_Ring`) instead of the fresh
shared memory torch would create per batch.

Each DataLoader worker runs a chain of small generators:
    shard paths/URLs -> tar members (pipeline.remote, train.tar_reader) -> samples (webdataset group_by_keys)
    -> [train: seeded shuffle buffer -> resume skip] -> decode + augment -> batches

Train: the shard order is shuffled by (seed, epoch), the same on every rank, and dealt round robin to the
world_size * max(workers, 1) streams (stream = rank * W + worker); with more streams than shards, streams
wrap around the shard list. Every worker yields an exact quota of full batches, cycling its shards as often
as needed, so every rank yields exactly `train_batches_per_epoch(...)` batches and DDP never waits on a rank
that ran dry. Node/worker splitting happens here: never `accelerator.prepare()` these loaders. A train
loader may span several epochs: each worker runs its jobs of one epoch after the other, so worker processes
start once per run and prefetching goes on across epoch ends.

Resume: the DataLoader takes batch i from worker i % W, so each worker knows how many of its own batches
were consumed and skips those samples (after the shuffle buffer, before decoding). A resumed loader also
rotates the workers' roles so that its first batch comes from the worker that owned batch `start_batch`
(and rotates them again at each later epoch whose batch count W does not divide):
the remaining batches are identical to the rest of an uninterrupted epoch. Limit: the skip stage only
checks what is cheap (member names, label, image header); a sample whose header parses but whose pixels do
not decode, inside the skipped span, shifts the resumed stream by one sample (batch counts stay exact).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import random
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import group_by_keys

from pipeline.errors import UserError
from pipeline.manifest import FORBIDDEN_EXTENSIONS, shard_locations
from pipeline.remote import RETRY_POLICY, RemoteError, is_url, open_stream
from train.augment import sample_seed
from train.tar_reader import tar_members

log = logging.getLogger(__name__)

Transform = Callable[[np.ndarray, int], np.ndarray]
Batch = dict[str, Any]

SHARD_POLICY = "shards are not retried or skipped; the run stops; resume with --resume auto"
# Errors that mean "these bytes are not an image we can read" (PIL raises SyntaxError for some files).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# Errors that mean "this shard's tar cannot be read": broken tar, or webdataset's ValueError for duplicate
# member names. (Failures of the source itself arrive as pipeline.remote.RemoteError.)
READ_ERRORS = (OSError, tarfile.TarError, ValueError)
# Shared-memory batch buffers per DataLoader worker: two batches in flight (the DataLoader's prefetch_factor),
# the one just received, the one the consumer still holds, and the one it dropped (handed back when the next
# batch arrives). A consumer that keeps more only makes workers fall back to fresh shared memory.
RING_SLOTS = 5
# A train stream gives up after this many corrupt samples in a row beyond one pass over its shards
# (plus headroom for the shuffle buffer): a worker whose every sample is corrupt would otherwise loop forever.
BAD_RUN_BUFFER_FACTOR = 20


class ShardError(UserError):
    """A shard cannot be read (missing, HTTP error, connection cut, truncated): the run stops."""


class CorruptSample(Exception):
    """One sample cannot be used (undecodable image, bad label, refused member): it is dropped."""


@dataclass(frozen=True)
class Shard:
    url: str  # local path, http(s):// URL or pipe: command (pipeline.remote.open_stream)
    num_samples: int
    sha256: str = ""  # the manifest's; the streamed bytes must match it ("": not checked)


# ---------------------------------------------------------------- public API


def train_batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches every rank yields per epoch: floor(num_samples / global batch)."""
    batches = num_samples // (batch_size * world_size)
    if batches == 0:
        raise UserError(
            f"the train split has {num_samples} samples, fewer than one global batch "
            f"({batch_size} per process x {world_size} processes): lower --batch-size or use fewer processes"
        )
    return batches


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
) -> Batches:
    """The train batches of `epochs` epochs on one rank, from batch `start_batch` of `epoch` on: exactly
    epochs * train_batches_per_epoch(...) - start_batch, epoch after epoch, told apart by count.

    One loader for a whole run keeps its worker processes and lets their prefetching run on across epoch
    ends (no start-up per epoch); its batches are those of one loader per epoch.
    `start_batch`: batches this rank already consumed in `epoch`, with the same `workers` as now.
    """
    _check_layout(batch_size, workers, rank, world_size)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    total = train_batches_per_epoch(manifest["splits"]["train"]["num_samples"], batch_size, world_size)
    if not 0 <= start_batch <= total:
        raise UserError(f"cannot resume at batch {start_batch}: an epoch has {total} batches per process")
    num_workers = max(workers, 1)
    shards = _shards(location, manifest, "train")
    jobs: list[list[_TrainJob]] = [[] for _ in range(num_workers)]
    for e in range(epoch, epoch + epochs):
        streams = stream_shards(shards, seed=seed, epoch=e, num_streams=world_size * num_workers)
        for worker in range(num_workers):
            # The DataLoader takes this rank's batches (counted over the whole run from `start_batch`) from
            # its workers in turn; in epoch e worker w thus owns the batches i = role (mod W). In the first
            # epoch the worker that owned batch start_batch goes first.
            role = (worker + start_batch - (e - epoch) * total) % num_workers
            consumed, remaining = _worker_batches(total, num_workers, role, start_batch if e == epoch else 0)
            stream = rank * num_workers + role
            jobs[worker].append(_TrainJob(
                shards=streams[stream], stream=stream, skip_samples=consumed * batch_size,
                num_batches=remaining, batch_size=batch_size, transform=transform,
                num_classes=len(manifest["classes"]), seed=seed, epoch=e, shuffle_buffer=shuffle_buffer,
            ))
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
    _check_layout(batch_size, workers, rank, world_size)
    mine = _shards(location, manifest, split)[rank::world_size]
    workers = min(workers, len(mine))  # no idle worker processes
    num_workers = max(workers, 1)
    jobs = [
        [_EvalJob(shards=tuple(mine[w::num_workers]), batch_size=batch_size, transform=transform,
                  num_classes=len(manifest["classes"]))]
        for w in range(num_workers)
    ]
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


def _released(free: torch.Tensor, slot: int, ref: StorageWeakRef) -> bool:
    """Mark `slot` free for its worker once nothing in this process refers to its memory."""
    if not ref.expired():
        return False
    free[slot] = 1
    return True


def shard_error_message(exc: BaseException) -> str | None:
    """The one-line message of a ShardError, also after DataLoader re-raised it from a worker process
    (then its text is "Caught ShardError in DataLoader worker ...", the worker's traceback, and last the
    original "...ShardError: <message>" line). None for any other exception."""
    if not isinstance(exc, ShardError):
        return None
    text = str(exc).strip()
    if "Traceback" not in text:
        return text
    return text.splitlines()[-1].split("ShardError: ", 1)[-1]


def stream_shards(shards: list[Shard], *, seed: int, epoch: int, num_streams: int) -> list[tuple[Shard, ...]]:
    """The shards of every train stream: one (seed, epoch) order shared by all ranks, dealt round robin.

    With more streams than shards, stream s reads shard s % n (some shards are read by several streams
    per epoch) and a warning says so.
    """
    order = list(shards)
    _rng("shards", seed, epoch).shuffle(order)
    if num_streams <= len(order):
        return [tuple(order[s::num_streams]) for s in range(num_streams)]
    warnings.warn(
        f"{num_streams} streams (processes x workers) but only {len(order)} train shards: streams wrap "
        f"around the shard list and some samples are read more than once per epoch; write smaller shards "
        f"(--shard-samples) or use fewer workers",
        stacklevel=3,  # the caller of train_loader
    )
    return [(order[s % len(order)],) for s in range(num_streams)]


# ---------------------------------------------------------------- planning


def _check_layout(batch_size: int, workers: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or workers < 0 or not 0 <= rank < world_size:
        raise ValueError(f"bad loader layout: batch_size={batch_size} workers={workers} "
                         f"rank={rank} world_size={world_size}")


def _shards(location: str, manifest: dict[str, Any], split: str) -> list[Shard]:
    entries = manifest["splits"][split]["shards"]
    return [Shard(url, entry["num_samples"], entry["sha256"]) for url, entry in
            zip(shard_locations(location, manifest, split), entries, strict=True)]


def _worker_batches(total: int, workers: int, worker: int, start_batch: int) -> tuple[int, int]:
    """(consumed, remaining) batches of `worker`, which owns the rank's batches worker, worker + W, ..."""
    consumed = len(range(worker, start_batch, workers))
    return consumed, len(range(worker, total, workers)) - consumed


def _rng(*parts: object) -> random.Random:
    """A random generator seeded from `parts`, identical in every process."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


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


class _Ring:
    """The reusable shared-memory image buffers of one DataLoader worker.

    torch moves every batch a worker returns into new shared memory: creating and faulting in 9.6 MB
    (64 x 224 x 224 x 3) costs ~0.15 ms an image in the worker, ~15% of the whole stream. Instead a worker
    stacks each batch into one of its RING_SLOTS buffers, shared once; torch sends a tensor that is already
    shared as a handle, without copying. The worker takes a slot only while its `free` flag is set, and
    only `Batches` (main process) sets it again, once the batch's memory is unreferenced there. With no
    free slot the batch goes into fresh shared memory as before: a worker never waits on the consumer.
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


@dataclass(frozen=True)
class _TrainJob:
    shards: tuple[Shard, ...]
    stream: int
    skip_samples: int
    num_batches: int
    batch_size: int
    transform: Transform
    num_classes: int
    seed: int
    epoch: int
    shuffle_buffer: int

    def batches(self, ring: _Ring | None) -> Iterator[Batch]:
        if self.num_batches == 0:
            return iter(())
        # Shuffle exactly the samples this worker uses in the whole epoch (the same for a resumed worker),
        # so nothing is read (or downloaded) only to fill a buffer; the endless rest of the stream is read
        # only to replace corrupt samples.
        quota = self.skip_samples + self.num_batches * self.batch_size
        buffer = min(self.shuffle_buffer, quota)
        stream = _cycled(self.shards, self.seed, self.epoch, self.stream)
        head = _shuffled(itertools.islice(stream, quota), buffer, _rng("buffer", self.seed, self.epoch, self.stream))
        samples = _skipped(itertools.chain(head, stream), self.skip_samples, self.num_classes)
        max_bad_run = sum(s.num_samples for s in self.shards) + BAD_RUN_BUFFER_FACTOR * buffer
        items = _decoded(samples, self.transform, self.num_classes, self.seed, self.epoch, max_bad_run)
        return _batched(items, self.batch_size, ring, limit=self.num_batches)


@dataclass(frozen=True)
class _EvalJob:
    shards: tuple[Shard, ...]
    batch_size: int
    transform: Transform
    num_classes: int

    def batches(self, ring: _Ring | None) -> Iterator[Batch]:
        samples = (sample for shard in self.shards for sample in _read_shard(shard))
        items = _decoded(samples, self.transform, self.num_classes, seed=0, epoch=0)
        return _batched(items, self.batch_size, ring)


# ---------------------------------------------------------------- reading shards


def _read_shard(shard: Shard) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard ({"__key__", "__url__", "jpg": bytes, ...}); any read failure (missing,
    HTTP error, cut, stall), a sample count that differs from the manifest (a tar truncated between
    members), or bytes whose sha256 differs from the manifest's is a ShardError. The digest is taken as the
    bytes stream by, so a mismatch is known once the whole shard has been read (its samples are already on
    their way by then; the run stops)."""
    try:
        stream = open_stream(shard.url, digest=bool(shard.sha256))
    except RemoteError as e:
        raise ShardError(_unreadable(shard.url, e.reason)) from None
    count = 0
    try:
        members = ({"fname": name, "data": data, "__url__": shard.url} for name, data in tar_members(stream))
        for sample in group_by_keys(members):
            count += 1
            yield sample
        digest = stream.finish()  # the rest of the file (tar padding); raises if the source failed
    except GeneratorExit:  # the consumer stopped early on purpose
        stream.abort()
        raise
    except RemoteError as e:
        stream.abort()
        raise ShardError(_unreadable(shard.url, e.reason)) from None
    except READ_ERRORS as e:
        stream.abort()
        raise ShardError(_unreadable(shard.url, _first_line(e))) from None
    if count != shard.num_samples:
        raise ShardError(_unreadable(
            shard.url, f"it holds {count} samples, the manifest says {shard.num_samples} (truncated?)"))
    if shard.sha256 and digest != shard.sha256:
        raise ShardError(_unreadable(shard.url, "its bytes do not match the manifest's sha256 (changed or "
                                                "corrupted since the set was built; check it with "
                                                "`python -m pipeline verify`)"))


def _unreadable(url: str, reason: str) -> str:
    retries = f" ({RETRY_POLICY})" if is_url(url) else ""
    return f"cannot read shard {url}: {reason}; {SHARD_POLICY}{retries}"


def _first_line(error: Exception) -> str:
    """webdataset appends " @ <stream object>" and extra args to messages; keep the readable part."""
    message = str(error.args[0]) if error.args else ""
    if isinstance(error, OSError) and error.strerror:
        message = error.strerror
    message = message.split(" @ ", 1)[0].splitlines()[0] if message else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


# ---------------------------------------------------------------- train stream stages


def _cycled(shards: tuple[Shard, ...], seed: int, epoch: int, stream: int) -> Iterator[dict[str, Any]]:
    """Samples of `shards`, endlessly: the first pass in the given order, later passes reshuffled."""
    for cycle in itertools.count():
        order = list(shards)
        if cycle:
            _rng("cycle", seed, epoch, stream, cycle).shuffle(order)
        count = 0
        for shard in order:
            for sample in _read_shard(shard):
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
        if _problem(next(samples), num_classes) is None:
            count -= 1
    yield from samples


# ---------------------------------------------------------------- decode, augment, batch


def _decoded(samples: Iterable[dict[str, Any]], transform: Transform, num_classes: int, seed: int,
             epoch: int, max_bad_run: int | None = None) -> Iterator[tuple[str, np.ndarray, int] | None]:
    """(key, augmented HWC uint8 image, label) per sample; None for a dropped corrupt sample (one warning
    line), so that the batch stage can count it."""
    bad_run = 0
    for sample in samples:
        key = sample["__key__"]
        try:
            label, image = _decode(sample, num_classes)
        except CorruptSample as e:
            log.warning("dropped corrupt sample %s in shard %s: %s", key, sample["__url__"], e)
            bad_run += 1
            if max_bad_run is not None and bad_run > max_bad_run:
                raise ShardError(f"{bad_run} corrupt samples in a row (last in {sample['__url__']}): "
                                 f"the shard set is broken; check it with `python -m pipeline verify`") from None
            yield None
            continue
        bad_run = 0
        yield key, transform(image, sample_seed(seed, epoch, key)), label


def _problem(sample: dict[str, Any], num_classes: int) -> str | None:
    """Why a raw sample is unusable, from what is cheap to check (no image decoding); None if usable."""
    refused = [name for name in sample if not name.startswith("__") and f".{name}".endswith(FORBIDDEN_EXTENSIONS)]
    if refused:
        return f"refusing pickle member(s) {refused} (never unpickled)"
    if "jpg" not in sample:
        return "no jpg member"
    try:
        label = int(sample.get("cls", b"").strip())
    except ValueError:
        return f"cls {sample.get('cls', b'')[:20]!r} is not a class index"
    if not 0 <= label < num_classes:
        return f"class index {label} out of range 0..{num_classes - 1}"
    if not (_jpeg_header_ok(sample["jpg"]) or _pil_header_ok(sample["jpg"])):
        return "jpg is not a readable image"
    return None


def _jpeg_header_ok(data: bytes) -> bool:
    if not simplejpeg.is_jpeg(data):
        return False
    try:
        simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return False
    return True


def _pil_header_ok(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except DECODE_ERRORS:
        return False


def _decode(sample: dict[str, Any], num_classes: int) -> tuple[int, np.ndarray]:
    """(label, HWC uint8 RGB image), or CorruptSample."""
    problem = _problem(sample, num_classes)
    if problem is not None:
        raise CorruptSample(problem)
    try:
        image = _decode_rgb(sample["jpg"])
    except DECODE_ERRORS as e:
        raise CorruptSample(f"jpg does not decode ({_first_line(e)})") from None
    return int(sample["cls"].strip()), image


def _decode_rgb(data: bytes) -> np.ndarray:
    """simplejpeg (libjpeg-turbo, fast) for JPEGs; PIL for anything else or what simplejpeg refuses."""
    if simplejpeg.is_jpeg(data):
        try:
            # fastdct / fastupsample: ~10% faster, differences far below augmentation noise
            return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True)
        except ValueError as e:
            log.debug("simplejpeg failed (%s); trying PIL", e)
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _batched(items: Iterable[tuple[str, np.ndarray, int] | None], batch_size: int, ring: _Ring | None,
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
        key, image, label = item
        keys.append(key)
        images.append(image)
        labels.append(label)
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
