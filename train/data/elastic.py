"""What an epoch interrupted mid-way still owes when it resumes under another layout (processes x workers x
batch size x gradient accumulation), and which layout keeps the run's global batch.

A train stream of an epoch is a pure function of sample counts and seeded generators
(train.data.stages.stream_samples), never of sample content. Replaying the streams on positions (shard
index, sample index in the shard) instead of samples gives the positions every stream of the earlier layout
delivered up to the checkpoint, without reading a byte. The positions nobody delivered, in a fixed order
(the epoch's (seed, epoch) shard order, positions ascending), are cut into one consecutive chunk per stream
of the new layout, each exactly the samples that stream still has to deliver in the epoch; what is left over
is dropped, as a normal epoch drops its remainder. An epoch may change layout more than once: each layout
is a segment, and a segment's chunks are cut from what no earlier segment delivered.

The optimizer steps of an epoch stay the same because the global batch does (batch x accumulation x
processes): the epoch's batches per rank are steps_per_epoch x grad_accum under every layout.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.errors import UserError
from train.data.plan import Chunk, Position, chunk_source, shard_order, stream_shards
from train.data.shards import Shard
from train.data.stages import stream_samples

LAYOUT_KEYS = ("batch_size", "grad_accum", "shuffle_buffer")  # saved with world_size and workers


@dataclass(frozen=True)
class Layout:
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


@dataclass(frozen=True)
class Segment:
    """A part of an epoch read under one layout, from optimizer step `from_step` of the epoch on."""

    layout: Layout
    from_step: int


def saved_layout(state: dict[str, Any], fallback: dict[str, Any]) -> Layout:
    """The layout that wrote a checkpoint (its trainer.json `state`); values older checkpoints lack come
    from `fallback` (the run's saved config, which such a run could not change)."""
    values = {key: state.get(key, fallback[key]) for key in LAYOUT_KEYS}
    return Layout(processes=state["world_size"], workers=state["workers"], **values)


def keep_global_batch(saved: Layout, processes: int, batch_size: int, grad_accum: int,
                      where: str) -> tuple[int, str | None]:
    """The --grad-accum that keeps `saved`'s global batch with `processes` x `batch_size`, and the line that
    says so when it differs from `grad_accum` (None when unchanged). A UserError naming a --batch-size and
    --grad-accum that would work when none does with this batch size."""
    want = saved.global_batch
    if batch_size * grad_accum * processes == want:
        return grad_accum, None
    if want % (processes * batch_size) == 0:
        chosen = want // (processes * batch_size)
        return chosen, (f"resuming the {saved.processes}x{saved.workers} layout (processes x workers) of {where} "
                        f"as {processes} process(es): --grad-accum {chosen} keeps the global batch of {want}")
    per_process = want // processes
    if want % processes:
        hint = f"use a number of processes that divides {want}"
    else:
        fits = max(b for b in range(1, min(batch_size, per_process) + 1) if per_process % b == 0)
        hint = f"use e.g. --batch-size {fits} --grad-accum {per_process // fits}"
    raise UserError(f"cannot resume {where} with --batch-size {batch_size} x {processes} process(es): its global "
                    f"batch is {want} (--batch-size {saved.batch_size} x --grad-accum {saved.grad_accum} x {saved.processes} "
                    f"process(es)), which must stay the same; {hint}")


def segments_after_resume(state: dict[str, Any], saved: Layout, now: Layout) -> list[Segment]:
    """The segments of the checkpoint's epoch once this run takes over at its step (one segment: the epoch
    never changed layout)."""
    segments = segments_of(state.get("segments") or []) or [Segment(saved, 0)]
    if state["step_in_epoch"] and segments[-1].layout != now:
        segments.append(Segment(now, state["step_in_epoch"]))
    return segments


def segments_of(records: list[dict[str, Any]]) -> list[Segment]:
    """Segments from their trainer.json records."""
    return [Segment(Layout(**record["layout"]), record["from_step"]) for record in records]


def as_records(segments: list[Segment]) -> list[dict[str, Any]]:
    """For trainer.json; an epoch that never changed layout records none."""
    return [dataclasses.asdict(s) for s in segments] if len(segments) > 1 else []


def plan(shards: list[Shard], *, seed: int, epoch: int, steps_per_epoch: int, segments: list[Segment],
         step: int) -> list[Chunk]:
    """The chunk of every stream (rank * streams + role) of the last segment, which resumes at optimizer
    step `step` of the epoch (its own start, or later when a run of that layout resumes itself)."""
    seen: set[Position] = set()
    for segment, end in zip(segments[:-1], [s.from_step for s in segments[1:]], strict=True):
        seen.update(itertools.chain.from_iterable(delivered(shards, seed, epoch, steps_per_epoch, segment, seen,
                                                            end)))
    last = segments[-1]
    chunks = _cut(shards, seed, epoch, steps_per_epoch, last, seen)
    done = delivered(shards, seed, epoch, steps_per_epoch, last, seen, step, chunks=chunks)
    return [Chunk(chunk, len(already), _tag(last, stream)) for stream, (chunk, already) in
            enumerate(zip(chunks, done, strict=True))]


def delivered(shards: list[Shard], seed: int, epoch: int, steps_per_epoch: int, segment: Segment,
              seen: set[Position], step: int, chunks: list[tuple[Position, ...]] | None = None
              ) -> list[list[Position]]:
    """Per stream of `segment`, the positions it delivered from the segment's start to optimizer step
    `step` of the epoch; `seen`: what the segments before it delivered; `chunks`: the segment's chunks when
    the caller has cut them already (they are cut from `seen` otherwise)."""
    layout = segment.layout
    if not segment.from_step:
        chunks = None  # the epoch's first layout reads the normal streams
    elif chunks is None:
        chunks = _cut(shards, seed, epoch, steps_per_epoch, segment, seen)
    with warnings.catch_warnings():  # more streams than shards: the run that read them warned already
        warnings.simplefilter("ignore")
        normal = stream_shards(shards, seed=seed, epoch=epoch, num_streams=layout.processes * layout.streams)
    index = {shard: i for i, shard in enumerate(shards)}
    out = []
    for stream in range(layout.processes * layout.streams):
        role = stream % layout.streams
        count = _role_batches(layout, steps_per_epoch, role, segment.from_step, step) * layout.batch_size
        quota = _role_batches(layout, steps_per_epoch, role, segment.from_step, steps_per_epoch) * layout.batch_size
        if chunks is None:
            source, keep, tag = normal[stream], None, stream
        else:
            (source, keep), tag = chunk_source(shards, chunks[stream]), _tag(segment, stream)
        positions = stream_samples(source, keep, seed=seed, epoch=epoch, stream=tag, quota=quota,
                                   shuffle_buffer=layout.shuffle_buffer,
                                   read=lambda shard: ((index[shard], p) for p in range(shard.num_samples)))
        out.append(list(itertools.islice(positions, count)) if quota else [])
    return out


def _cut(shards: list[Shard], seed: int, epoch: int, steps_per_epoch: int, segment: Segment,
         seen: set[Position]) -> list[tuple[Position, ...]]:
    """The positions not in `seen`, in the epoch's shard order, cut into the quotas of `segment`'s streams."""
    layout = segment.layout
    unseen = _unseen(shards, seed, epoch, seen)
    chunks = []
    for stream in range(layout.processes * layout.streams):
        batches = _role_batches(layout, steps_per_epoch, stream % layout.streams, segment.from_step, steps_per_epoch)
        chunk = tuple(itertools.islice(unseen, batches * layout.batch_size))
        if len(chunk) < batches * layout.batch_size:  # cannot happen while the global batch is kept
            raise ValueError(f"epoch {epoch}: too few unseen samples for stream {stream} of {layout}")
        chunks.append(chunk)
    return chunks


def _unseen(shards: list[Shard], seed: int, epoch: int, seen: set[Position]) -> Iterator[Position]:
    index = {shard: i for i, shard in enumerate(shards)}
    for shard in shard_order(shards, seed=seed, epoch=epoch):
        for position in range(shard.num_samples):
            if (index[shard], position) not in seen:
                yield index[shard], position


def _role_batches(layout: Layout, steps_per_epoch: int, role: int, from_step: int, to_step: int) -> int:
    """Batches of one rank a stream with this role delivers between two optimizer steps of the epoch: the
    DataLoader takes the rank's batches i = role (mod streams) from it."""
    start, end = from_step * layout.grad_accum, min(to_step, steps_per_epoch) * layout.grad_accum
    return len(range(role, end, layout.streams)) - len(range(role, start, layout.streams))


def _tag(segment: Segment, stream: int) -> str:
    """Seeds a chunk stream's shuffle: its number and where its segment began."""
    return f"{stream}@{segment.from_step}"
