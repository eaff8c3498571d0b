"""What an epoch interrupted mid-way still owes when it resumes under another topology (processes x workers x
batch size x gradient accumulation), and which topology keeps the run's global batch.

A train stream of an epoch is a pure function of sample counts and seeded generators
(train.data.stages.stream_samples), never of sample content. Replaying the streams on positions (shard
index, sample index in the shard) instead of samples gives the positions every stream of the earlier topology
delivered up to the checkpoint, without reading a byte. The positions nobody delivered, in a fixed order
(the epoch's (seed, epoch) shard order, positions ascending), are cut into one consecutive chunk per stream
of the new topology, each exactly the samples that stream still has to deliver in the epoch; what is left over
is dropped, as a normal epoch drops its remainder. An epoch may change topology more than once: each topology
is a segment, and a segment's chunks are cut from what no earlier segment delivered.

The optimizer steps of an epoch stay the same because the global batch does (batch x accumulation x
processes): the epoch's batches per rank are steps_per_epoch x grad_accum under every topology.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.errors import UserError
from train.data.assignment import Chunk, Position, chunk_source, shard_order, stream_shards
from train.data.shards import Shard
from train.data.stages import stream_samples
from train.data.topology import TOPOLOGY_KEYS, Topology, role_batches


@dataclass(frozen=True)
class Segment:
    """A part of an epoch read under one topology, from optimizer step `from_step` of the epoch on."""

    topology: Topology
    from_step: int


def saved_topology(state: dict[str, Any], fallback: dict[str, Any]) -> Topology:
    """The topology that wrote a checkpoint (its trainer.json `state`); values older checkpoints lack come
    from `fallback` (the run's saved config, which such a run could not change)."""
    values = {key: state.get(key, fallback[key]) for key in TOPOLOGY_KEYS}
    return Topology(processes=state["world_size"], workers=state["workers"], **values)


def keep_global_batch(saved: Topology, processes: int, batch_size: int, grad_accum: int,
                      where: str) -> tuple[int, str | None]:
    """The --grad-accum that keeps `saved`'s global batch with `processes` x `batch_size`, and the line that
    says so when it differs from `grad_accum` (None when unchanged). A UserError naming a --batch-size and
    --grad-accum that would work when none does with this batch size."""
    want = saved.global_batch
    if batch_size * grad_accum * processes == want:
        return grad_accum, None
    if want % (processes * batch_size) == 0:
        chosen = want // (processes * batch_size)
        return chosen, (f"resuming the {saved.processes}x{saved.workers} topology (processes x workers) of {where} "
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


def segments_after_resume(state: dict[str, Any], saved: Topology, now: Topology) -> list[Segment]:
    """The segments of the checkpoint's epoch once this run takes over at its step (one segment: the epoch
    never changed topology)."""
    segments = segments_of(state.get("segments") or []) or [Segment(saved, 0)]
    if state["step_in_epoch"] and segments[-1].topology != now:
        segments.append(Segment(now, state["step_in_epoch"]))
    return segments


def segments_of(records: list[dict[str, Any]]) -> list[Segment]:
    """Segments from their trainer.json records (which name a segment's topology "layout")."""
    return [Segment(Topology(**record["layout"]), record["from_step"]) for record in records]


def as_records(segments: list[Segment]) -> list[dict[str, Any]]:
    """For trainer.json; an epoch that never changed topology records none."""
    if len(segments) < 2:
        return []
    return [{"layout": dataclasses.asdict(s.topology), "from_step": s.from_step} for s in segments]


def plan(shards: list[Shard], *, seed: int, epoch: int, steps_per_epoch: int, segments: list[Segment],
         step: int) -> list[Chunk]:
    """The chunk of every stream (rank * streams + role) of the last segment, which resumes at optimizer
    step `step` of the epoch (its own start, or later when a run of that topology resumes itself)."""
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
    topology = segment.topology
    if not segment.from_step:
        chunks = None  # the epoch's first topology reads the normal streams
    elif chunks is None:
        chunks = _cut(shards, seed, epoch, steps_per_epoch, segment, seen)
    with warnings.catch_warnings():  # more streams than shards: the run that read them warned already
        warnings.simplefilter("ignore")
        normal = stream_shards(shards, seed=seed, epoch=epoch, num_streams=topology.processes * topology.streams)
    index = {shard: i for i, shard in enumerate(shards)}
    out = []
    for stream in range(topology.processes * topology.streams):
        role = stream % topology.streams
        count = _role_batches(topology, steps_per_epoch, role, segment.from_step, step) * topology.batch_size
        quota = _role_batches(topology, steps_per_epoch, role, segment.from_step, steps_per_epoch) * topology.batch_size
        if chunks is None:
            source, keep, tag = normal[stream], None, stream
        else:
            (source, keep), tag = chunk_source(shards, chunks[stream]), _tag(segment, stream)
        positions = stream_samples(source, keep, seed=seed, epoch=epoch, stream=tag, quota=quota,
                                   shuffle_buffer=topology.shuffle_buffer,
                                   read=lambda shard: ((index[shard], p) for p in range(shard.num_samples)))
        out.append(list(itertools.islice(positions, count)) if quota else [])
    return out


def _cut(shards: list[Shard], seed: int, epoch: int, steps_per_epoch: int, segment: Segment,
         seen: set[Position]) -> list[tuple[Position, ...]]:
    """The positions not in `seen`, in the epoch's shard order, cut into the quotas of `segment`'s streams."""
    topology = segment.topology
    unseen = _unseen(shards, seed, epoch, seen)
    chunks = []
    for stream in range(topology.processes * topology.streams):
        batches = _role_batches(topology, steps_per_epoch, stream % topology.streams, segment.from_step, steps_per_epoch)
        chunk = tuple(itertools.islice(unseen, batches * topology.batch_size))
        if len(chunk) < batches * topology.batch_size:  # cannot happen while the global batch is kept
            raise ValueError(f"epoch {epoch}: too few unseen samples for stream {stream} of {topology}")
        chunks.append(chunk)
    return chunks


def _unseen(shards: list[Shard], seed: int, epoch: int, seen: set[Position]) -> Iterator[Position]:
    index = {shard: i for i, shard in enumerate(shards)}
    for shard in shard_order(shards, seed=seed, epoch=epoch):
        for position in range(shard.num_samples):
            if (index[shard], position) not in seen:
                yield index[shard], position


def _role_batches(topology: Topology, steps_per_epoch: int, role: int, from_step: int, to_step: int) -> int:
    """Batches of one rank a stream with this role delivers between two optimizer steps of the epoch."""
    return role_batches(topology.streams, role, from_step * topology.grad_accum,
                        min(to_step, steps_per_epoch) * topology.grad_accum)


def _tag(segment: Segment, stream: int) -> str:
    """Seeds a chunk stream's shuffle: its number and where its segment began."""
    return f"{stream}@{segment.from_step}"
