"""Write a build's shards: each shard's samples are read, encoded and written as one tar, whole, by one
worker process; the tar goes to a temporary name, its record into the build state, then it is renamed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline import buildstate, files
from pipeline.encode import BadImage, EncodeOptions, encode_image
from pipeline.plan import BuildOptions, ShardPlan
from pipeline.pool import mapped
from pipeline.shardfile import ShardFile
from pipeline.shardformat import Sample
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
    sample: Sample | None = None  # None when the image is bad
    error: str = ""


def write_shards(out: Path, dataset: Dataset, shards: list[ShardPlan], options: BuildOptions, workers: int,
                 skip_bad: bool, progress: bool) -> list[tuple[Record, str]]:
    """Each shard encoded and written by one of `workers` processes; returns the bad images (plan order)."""
    root = str(dataset.root)
    jobs = [ShardJob(out, s, tuple(SampleTask(r, os.path.join(root, r.path), dataset.classes[r.label], s.split,
                                              options.encode) for r in s.records), len(dataset.classes), skip_bad)
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
    """Encode a shard's samples and write its tar as they come (pipeline.shardfile), unless one is bad and
    bad ones may not be skipped (then the tar is discarded: the build goes on only to list every bad file)."""
    bad: list[tuple[Record, str]] = []
    class_counts = [0] * job.num_classes
    with ShardFile(job.out / job.shard.name) as tar:
        for task in job.tasks:
            result = encode_sample(task)
            if result.sample is None:
                bad.append((task.record, result.error))
            elif not bad or job.skip_bad:
                tar.add(result.sample)
                class_counts[task.record.label] += 1
        if bad and not job.skip_bad:
            tar.discard()
            return bad
        _commit(job.out, job.shard, tar, class_counts, bad)
    return bad


def encode_sample(task: SampleTask) -> SampleResult:
    """Runs in a worker process: read the file, encode it, build the sample."""
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
    return SampleResult(task, Sample(record.key, record.label, encoded.jpeg, meta))


def _remove_temporaries_of(out: Path, pids: list[int]) -> None:
    """A failed build stops its workers mid-write (terminate is SIGTERM): their temporaries go with them."""
    for pid in pids:
        for path in files.temporaries(out, pid=pid):
            files.remove_quietly(path)


def _commit(out: Path, shard: ShardPlan, tar: ShardFile, class_counts: list[int],
            skipped: list[tuple[Record, str]]) -> None:
    """Synced temporary -> shard record -> rename: a tar under its final name is always complete."""
    size, sha256 = tar.finish()
    record = {
        "name": shard.name,
        "num_samples": sum(class_counts),
        "bytes": size,
        "sha256": sha256,
        "class_counts": class_counts,
        "skipped": [{"image_id": r.image_id, "path": r.path, "reason": reason} for r, reason in skipped],
    }
    files.write_json_atomic(buildstate.record_path(out, shard.name), record)
    tar.rename()
