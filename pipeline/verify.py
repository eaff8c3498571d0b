"""`verify` (every shard's size, sha256, members and JPEGs; across the set: unique keys, each sample's split,
and class counts) and `inspect` (a per-split summary)."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline import manifest as mf
from pipeline.buildstate import temporaries
from pipeline.errors import UserError
from pipeline.remote import is_pipe, is_url
from pipeline.shardformat.check import CorruptSample, decode_sample, record_problem
from pipeline.shardformat.tarread import strict_samples

CLASS_COUNTS = "class_counts"  # the manifest field verify compares with the labels it reads


def verify(location: str, progress: bool = True) -> list[str]:
    """Return one problem line per bad shard, and one per split whose class_counts disagree with the labels
    in its shards (empty list: the set is good). Besides each shard's own checks, a sample key must be unique
    across the whole set and each sample's record must name its shard's split."""
    manifest = mf.load_manifest(location)
    num_classes = len(manifest["classes"])
    shards = [(split, shard) for split in mf.SPLITS for shard in manifest["splits"][split]["shards"]]
    seen: dict[str, str] = {}  # sample key -> the shard holding it
    counts = {split: [0] * num_classes for split in mf.SPLITS}
    counted = dict.fromkeys(mf.SPLITS, True)  # False once a shard of the split could not be counted
    problems = []
    for split, shard in tqdm(shards, unit="shard", desc="verify", disable=not progress):
        problem, labels = _check_shard(location, shard, split, num_classes, seen)
        if problem:
            problems.append(f"{mf.join(location, shard['name'])} ({split}): {problem}")
            counted[split] = False
        for label in labels:
            counts[split][label] += 1
    for split in mf.SPLITS:
        recorded = manifest["splits"][split].get("class_counts") or []
        if counted[split] and recorded and recorded != counts[split]:
            label = next(c for c in range(num_classes) if recorded[c] != counts[split][c])
            problems.append(f"{mf.join(location, mf.MANIFEST)} ({split}): {CLASS_COUNTS} say {recorded[label]} "
                            f"sample(s) of class {label} ({manifest['classes'][label]!r}), the shards hold "
                            f"{counts[split][label]}")
    return problems


def summary(location: str, problems: list[str]) -> str:
    """verify's error line: how many shards are bad, and how many splits' class_counts are wrong."""
    wrong_counts = sum(f"): {CLASS_COUNTS} say " in line for line in problems)
    parts = [f"{len(problems) - wrong_counts} bad shard(s)"] if len(problems) > wrong_counts else []
    if wrong_counts:
        parts.append(f"{CLASS_COUNTS} of {wrong_counts} split(s) differ from the labels in the shards")
    return f"{' and '.join(parts)} in {location}"


def _check_shard(location: str, shard: dict[str, Any], split: str, num_classes: int,
                 seen: dict[str, str]) -> tuple[str, list[int]]:
    """(the shard's first problem or "", the labels of its samples: only when it has no problem). `seen`
    collects the keys of good shards."""
    try:
        data = mf.read_bytes(location, shard["name"])
    except UserError as e:
        return f"unreadable: {e}", []
    if len(data) != shard["bytes"]:
        return f"{len(data)} bytes, manifest says {shard['bytes']}", []
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        return "sha256 mismatch", []
    try:
        samples, problem = strict_samples(data)
    except (tarfile.TarError, ValueError) as e:
        return f"not a readable tar ({e})", []
    if problem:
        return problem, []
    if len(samples) != shard["num_samples"]:
        return f"{len(samples)} samples, manifest says {shard['num_samples']}", []
    labels = []
    for key, raw in samples.items():
        if key in seen:
            return f"sample {key}: key also in {seen[key]}", []
        try:  # the train stream's check and decode: the same verdict
            sample = decode_sample(raw, num_classes, with_meta=True)
        except CorruptSample as e:
            return f"sample {key}: {e}", []
        problem = record_problem(sample, split)
        if problem:
            return f"sample {key}: {problem}", []
        labels.append(sample.label)
    seen.update(dict.fromkeys(samples, shard["name"]))
    return "", labels


def inspect(location: str) -> str:
    """A readable per-split table: samples, shards, bytes, classes present and class balance."""
    manifest = mf.load_manifest(location)
    classes = manifest["classes"]
    lines = [f"{location}: {len(classes)} classes, options {manifest.get('options', {})}",
             f"{'split':<6} {'samples':>8} {'shards':>7} {'MB':>9} {'classes':>8} {'min/class':>10} {'max/class':>10}"]
    for split in mf.SPLITS:
        info = manifest["splits"][split]
        counts = info.get("class_counts") or []
        present = [c for c in counts if c]
        size_mb = sum(s["bytes"] for s in info["shards"]) / 1e6
        lines.append(f"{split:<6} {info['num_samples']:>8} {len(info['shards']):>7} {size_mb:>9.1f} "
                     f"{len(present):>8} {min(present, default=0):>10} {max(present, default=0):>10}")
    skipped = manifest.get("skipped", [])
    if skipped:
        lines.append(f"skipped: {len(skipped)} image(s), e.g. {skipped[0]['path']} ({skipped[0]['reason']})")
    left = _temporaries(location)
    if left:
        lines.append(f"temporary files: {len(left)} left by an interrupted build ({', '.join(left[:3])}"
                     f"{', ...' if len(left) > 3 else ''}); the next build or merge into {location} removes them")
    return "\n".join(lines)


def _temporaries(location: str) -> list[str]:
    """Temporaries in a local shard set (remote stores are listed by their own tools)."""
    if is_url(location) or is_pipe(location) or not Path(location).is_dir():
        return []
    return temporaries(Path(location))
