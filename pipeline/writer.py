"""Write a build's shards: each shard's samples are read, encoded and written as one tar, whole, by one
worker process; the tar goes to a temporary name, its record into the build state, then it is renamed."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline import buildstate
from pipeline import manifest as mf
from pipeline.encode import BadImage, EncodeOptions, encode_image
from pipeline.errors import UserError
from pipeline.plan import BuildOptions, ShardPlan
from pipeline.pool import mapped
from pipeline.shardformat.schema import sample_members
from pipeline.shardformat.tarwrite import tar_bytes
from pipeline.sources import Dataset, Record


@dataclass(frozen=True)
class SampleTask:
    record: Record
    image_path: str
    class_name: str
    split: str
    options: EncodeOptions


@dataclass(frozen=True)
class ShardJob:
    """One shard to encode and write, whole, in one worker process."""

    out: Path
    shard: ShardPlan
    tasks: tuple[SampleTask, ...]
    num_classes: int
    skip_bad: bool


@dataclass(frozen=True)
class SampleResult:
    task: SampleTask
    members: tuple[tuple[str, bytes], ...] = ()
    error: str = ""


def write_shards(out: Path, cub: Dataset, shards: list[ShardPlan], options: BuildOptions, workers: int,
                 skip_bad: bool, progress: bool) -> list[tuple[Record, str]]:
    """Each shard encoded and written by one of `workers` processes; returns the bad images (plan order)."""
    root = str(cub.root)
    jobs = [ShardJob(out, s, tuple(SampleTask(r, os.path.join(root, r.path), cub.classes[r.label], s.split,
                                              options.encode) for r in s.records), len(cub.classes), skip_bad)
            for s in shards]
    # Largest shards first: the short last shard of each split then fills the gaps at the end instead of
    # leaving workers idle behind a full one. The order of work never changes what is written.
    jobs.sort(key=lambda job: len(job.tasks), reverse=True)
    bad: dict[str, list[tuple[Record, str]]] = {}
    total = sum(len(job.tasks) for job in jobs)
    with tqdm(total=total, unit="img", desc=f"build {out.name}", disable=not progress) as bar, \
            mapped(write_shard, jobs, workers, after=lambda pids: _remove_temporaries_of(out, pids)) as results:
        for job, shard_bad in zip(jobs, results, strict=True):
            bar.update(len(job.tasks))
            bad[job.shard.name] = shard_bad
    return [b for s in shards for b in bad[s.name]]


def write_shard(job: ShardJob) -> list[tuple[Record, str]]:
    """Encode a shard's samples and write its tar, unless one is bad and bad ones may not be skipped
    (then the shard is never written: the build goes on only to list every bad file)."""
    samples = [encode_sample(task) for task in job.tasks]
    bad = [(s.task.record, s.error) for s in samples if s.error]
    if not bad or job.skip_bad:
        _write_tar(job.out, job.shard, [s for s in samples if not s.error], bad, job.num_classes)
    return bad


def encode_sample(task: SampleTask) -> SampleResult:
    """Runs in a worker process: read the file, encode it, build the tar members of one sample."""
    try:
        with open(task.image_path, "rb", buffering=0) as f:
            data = f.read()
    except FileNotFoundError:
        return SampleResult(task, error="missing")
    except OSError as e:
        return SampleResult(task, error=f"unreadable: {e.strerror}")
    try:
        encoded = encode_image(data, task.record.bbox, task.options)
    except BadImage as e:
        return SampleResult(task, error=str(e))
    record = task.record
    meta = {
        "image_id": record.image_id,
        "class_index": record.label,
        "class_name": task.class_name,
        "split": task.split,
        "path": record.path,
        "original_size": list(encoded.original_size),
        "size": list(encoded.size),
        "bbox": None if record.bbox is None else [round(v, 2) for v in encoded.bbox],
        **dict(record.extras),
    }
    return SampleResult(task, sample_members(record.key, record.label, encoded.jpeg, meta))


def _remove_temporaries_of(out: Path, pids: list[int]) -> None:
    """A failed build stops its workers mid-write (terminate is SIGTERM): their temporaries go with them."""
    for pid in pids:
        for path in out.glob(f".*{mf.TEMPORARY_MARK}{pid}"):
            mf.remove_quietly(path)


def _write_tar(out: Path, shard: ShardPlan, samples: Iterable[SampleResult], skipped: list[tuple[Record, str]],
               num_classes: int) -> None:
    """Temp file -> shard record -> rename: a tar under its final name is always complete."""
    class_counts = [0] * num_classes
    members = []
    for sample in samples:
        members += sample.members
        class_counts[sample.task.record.label] += 1
    data = tar_bytes(members)
    record = {
        "name": shard.name,
        "num_samples": sum(class_counts),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "class_counts": class_counts,
        "skipped": [{"image_id": r.image_id, "path": r.path, "reason": reason} for r, reason in skipped],
    }
    final = out / shard.name
    tmp = mf.temporary_name(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        mf.write_json_atomic(buildstate.record_path(out, shard.name), record)
        os.replace(tmp, final)
    except OSError as e:  # a full disk, a quota: one line naming the shard
        raise UserError(f"{final}: cannot write ({e.strerror or e})") from None
    finally:  # gone after the rename; otherwise whatever stopped the write (an error, Ctrl-C) leaves none
        mf.remove_quietly(tmp)
