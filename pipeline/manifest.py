"""The shard-set contract: the manifest's schema and format version, loading it from a directory or URL, and
the locations of a set's files."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.remote import is_pipe, is_url, read_all

FORMAT = "cubstream-shards"
VERSION = 1  # the format version this code writes; when it changes: shards/README.md, "Versions"
MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "test")
# Optional per-class lists some layouts add next to "classes" (NABirds: original ids, ancestors' names).
CLASS_FIELDS = ("class_ids", "class_parents")
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ManifestError(UserError):
    """The manifest is missing, unreadable or not a cubstream shard set this code understands."""


PIPE_EXAMPLE = "pipe:aws s3 cp s3://BUCKET/PREFIX/{} -"


def join(location: str, name: str) -> str:
    """Path, URL or pipe: command of `name` inside a shard-set location (a directory, an http(s) base URL,
    or a `pipe:` command template such as 'pipe:aws s3 cp s3://BUCKET/PREFIX/{} -')."""
    if is_pipe(location):
        if "{}" not in location:
            raise UserError(f"{location}: a pipe: location needs {{}} where the file name goes, e.g. "
                            f"'{PIPE_EXAMPLE}'")
        return location.replace("{}", shlex.quote(name))
    if is_url(location):
        return location.rstrip("/") + "/" + name
    return str(Path(location) / name)


def read_bytes(location: str, name: str) -> bytes:
    """Read one file of a shard set, local or remote; a failure is one line naming the file or URL.
    pipeline.remote does the reading (the same stall timeout and retries as the trainer's shard streams)."""
    return read_all(join(location, name))


def load_manifest(location: str) -> dict[str, Any]:
    """Load and validate `manifest.json` of a shard set; raises ManifestError with one line."""
    try:
        raw = read_bytes(location, MANIFEST)
    except UserError as e:
        raise ManifestError(f"no shard set at {location}: {e}") from None
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise ManifestError(f"{join(location, MANIFEST)}: not valid JSON ({e})") from None
    validate(manifest, join(location, MANIFEST))
    return manifest


def validate(manifest: Any, where: str) -> None:
    """The format and its version first, then the reader of that version checks every field this code or
    its readers use, with its type; one line naming the first problem."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{where}: not a {FORMAT} manifest")
    version = manifest.get("version")
    reader = READERS.get(version) if is_count(version) else None  # JSON true is not version 1
    if reader is None:
        newer = "; it was written by a newer cubstream" if is_count(version) and version > max(READERS) else ""
        raise ManifestError(f"{where}: format version {version!r} is not supported (this code reads "
                            f"{', '.join(map(str, sorted(READERS)))}{newer})")
    reader(manifest, where)


def _validate_v1(manifest: dict[str, Any], where: str) -> None:
    classes = manifest.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ManifestError(f"{where}: 'classes' must be a non-empty list of names")
    if len(set(classes)) != len(classes):
        duplicate = next(c for i, c in enumerate(classes) if c in classes[:i])
        raise ManifestError(f"{where}: class {duplicate!r} is listed twice")
    for key in ("options", "source", "tool"):
        if not isinstance(manifest.get(key, {}), dict):
            raise ManifestError(f"{where}: {key!r} must be an object, got {type(manifest[key]).__name__}")
    _validate_class_fields(manifest, len(classes), where)
    _validate_skipped(manifest.get("skipped", []), where)
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        raise ManifestError(f"{where}: 'splits' missing")
    listed: dict[str, str] = {}  # shard name -> split: a name listed twice would be read twice
    for split in SPLITS:
        _validate_split(splits.get(split), split, len(classes), listed, where)


def _validate_split(info: Any, split: str, num_classes: int, listed: dict[str, str], where: str) -> None:
    if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
        raise ManifestError(f"{where}: split {split!r} missing or has no shard list")
    if not is_count(info.get("num_samples")):
        raise ManifestError(f"{where}: split {split!r} num_samples must be an integer >= 0, got "
                            f"{info.get('num_samples')!r}")
    for index, shard in enumerate(info["shards"]):
        _validate_shard(shard, f"{where}: {split} shard {index}", where)
        if shard["name"] in listed:
            raise ManifestError(f"{where}: shard {shard['name']!r} is listed twice (in {listed[shard['name']]} "
                                f"and {split})")
        listed[shard["name"]] = split
    total = sum(shard["num_samples"] for shard in info["shards"])
    if total != info["num_samples"]:
        raise ManifestError(f"{where}: split {split!r} num_samples {info['num_samples']} != sum of shards {total}")
    counts = info.get("class_counts", [])  # absent or empty: not recorded (inspect then shows no balance)
    if counts != [] and not (isinstance(counts, list) and len(counts) == num_classes
                             and all(map(is_count, counts)) and sum(counts) == total):
        raise ManifestError(f"{where}: split {split!r} class_counts must be {num_classes} integers >= 0 "
                            f"summing to {total} (or empty)")


def _validate_shard(shard: Any, at: str, where: str) -> None:
    if not isinstance(shard, dict):
        raise ManifestError(f"{at}: must be an object, got {type(shard).__name__}")
    missing = [k for k in ("name", "num_samples", "bytes", "sha256") if k not in shard]
    if missing:
        raise ManifestError(f"{at}: missing {', '.join(missing)}")
    name = shard["name"]
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise ManifestError(f"{where}: shard name {name!r} is not a plain file name "
                            "(letters, digits, '.', '_', '-'; not starting with '.')")
    for key in ("num_samples", "bytes"):
        if not is_count(shard[key]):
            raise ManifestError(f"{at} ({name}): {key} must be an integer >= 0, got {shard[key]!r}")
    if not isinstance(shard["sha256"], str) or not SHA256_HEX.fullmatch(shard["sha256"]):
        raise ManifestError(f"{at} ({name}): sha256 must be 64 lowercase hex digits, got {shard['sha256']!r:.80}")


def _validate_class_fields(manifest: dict[str, Any], num_classes: int, where: str) -> None:
    """class_ids: one integer per class; class_parents: one list of names per class (both optional)."""
    ids, parents = manifest.get("class_ids"), manifest.get("class_parents")
    if ids is not None and not (isinstance(ids, list) and len(ids) == num_classes and all(map(is_count, ids))):
        raise ManifestError(f"{where}: 'class_ids' must be {num_classes} integers >= 0, one per class")
    if parents is not None and not (isinstance(parents, list) and len(parents) == num_classes and all(
            isinstance(chain, list) and all(isinstance(name, str) for name in chain) for chain in parents)):
        raise ManifestError(f"{where}: 'class_parents' must be {num_classes} lists of names, one per class")


def _validate_skipped(skipped: Any, where: str) -> None:
    if not isinstance(skipped, list) or not all(
            isinstance(s, dict) and isinstance(s.get("path"), str) and isinstance(s.get("reason"), str)
            for s in skipped):
        raise ManifestError(f"{where}: 'skipped' must be a list of objects with a path and a reason")


# The reader of each format version this code reads (its check of the manifest; what it then reads of the
# shards follows from the version too). A new version adds its reader here.
READERS: dict[int, Callable[[dict[str, Any], str], None]] = {1: _validate_v1}


def is_count(value: Any) -> bool:
    """An integer >= 0 (JSON true/false are not counts, though Python's bool is an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def shard_locations(location: str, manifest: dict[str, Any], split: str) -> list[str]:
    """Paths or URLs of every shard of `split`, in manifest order."""
    return [join(location, shard["name"]) for shard in manifest["splits"][split]["shards"]]
