"""What every dataset layout gives the build: records, class names and a content fingerprint.

A layout is a module of pipeline/sources/ with NAME, LOOKS_FOR, `find_root(path)` and `read(root, settings)`
(the `Layout` protocol below), registered in pipeline/sources/__init__.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import UserError

Box = tuple[float, float, float, float]  # x, y, w, h in original pixels
SPLIT_FLAGS = ("train", "valid", "test")
KEY_SAFE = re.compile(r"[A-Za-z0-9_-]+")
KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
KEY_PREFIX_MAX = 60  # + "_" + 12 hex digits + ".json" stays far below ustar's 100-byte member names
KEY_HASH_HEX = 12
# Sample-JSON fields the writer fills; a layout's extras may not replace them.
SAMPLE_FIELDS = ("image_id", "class_index", "class_name", "split", "path", "original_size", "size", "bbox")


def sample_key(raw: str) -> str:
    """The tar key of a sample whose source id is `raw`: `raw` itself when it is already safe (ASCII letters,
    digits, '_' and '-', at most KEY_PREFIX_MAX characters), else its sanitised, shortened form plus '_' and
    a hash of `raw`, so ids that sanitise alike (spaces, dots, unicode) keep distinct keys.

    A key never holds a dot: webdataset and our readers take everything after a member name's first dot as
    its extension, so `a.b.jpg` would be read as key `a`. Nor a slash, which would make a directory."""
    if KEY_SAFE.fullmatch(raw) and len(raw) <= KEY_PREFIX_MAX:
        return raw
    prefix = KEY_UNSAFE.sub("_", raw).strip("_")[:KEY_PREFIX_MAX] or "x"
    return f"{prefix}_{hashlib.sha256(raw.encode('utf-8', 'surrogateescape')).hexdigest()[:KEY_HASH_HEX]}"


@dataclass(frozen=True)
class Record:
    """One image of a source. `path` is relative to the source root ('/'-separated); `label` is 0-based;
    `split` is the source's own split: 'train' or 'test' (CUB's flag), or 'valid' where the source has one.
    `extras` are (name, value) pairs added to the sample's JSON."""

    image_id: int | str
    path: str
    label: int
    split: str
    bbox: Box | None = None
    key: str = ""  # "" -> sample_key(str(image_id))
    extras: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", sample_key(str(self.image_id)))
        if self.split not in SPLIT_FLAGS:
            raise ValueError(f"split must be one of {SPLIT_FLAGS}, got {self.split!r}")


@dataclass(frozen=True)
class Settings:
    """What a layout may need besides its files: the build's seed, the test share for sources without an
    official test split (None: the layout's default, refused by layouts that have one), and whether every
    record needs a bounding box (--crop-bbox)."""

    seed: int = 0
    test_fraction: float | None = None
    need_boxes: bool = False


@dataclass(frozen=True)
class Dataset:
    """A parsed source. `info` goes into the manifest's `source` object (it is part of what identifies the
    source); `class_fields` are extra per-class manifest fields (e.g. original class ids)."""

    layout: str
    root: Path
    classes: list[str]
    records: list[Record]  # in the source's own order
    fingerprint_files: tuple[str, ...] = ()  # listing files hashed into the fingerprint, relative to root
    info: dict[str, Any] = field(default_factory=dict)
    class_fields: dict[str, list[Any]] = field(default_factory=dict)
    # CUB hashes image paths relative to this folder (kept so fingerprints of existing sets do not change)
    fingerprint_prefix: str = ""

    def image_path(self, record: Record) -> Path:
        return self.root / record.path

    def fingerprint(self, sizes: list[int]) -> str:
        """sha256 over the listing files, `info`, and every image's path and size: equal for a directory and
        its .tgz, different when any file, the layout's settings or an image's size differ."""
        digest = hashlib.sha256()
        for name in self.fingerprint_files:
            digest.update(name.encode() + b"\0" + (self.root / name).read_bytes() + b"\0")
        if self.info:  # CUB has none: its fingerprint stays what it was before layouts existed
            digest.update(repr(sorted(self.info.items())).encode() + b"\0")
        for record, size in zip(self.records, sizes, strict=True):
            digest.update(f"{record.path.removeprefix(self.fingerprint_prefix)}\0{size}\0".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()


class Layout(Protocol):
    """A layout module's interface (see pipeline/sources/cub.py for an example)."""

    NAME: str
    LOOKS_FOR: str  # for the error when no layout matches, e.g. "images.txt (CUB_200_2011/)"

    def find_root(self, path: Path) -> Path | None:
        """The directory holding this layout's files: `path` or a folder in it; None if it is not there, a
        UserError if `path` is a tree this layout recognises but must refuse."""

    def read(self, root: Path, settings: Settings) -> Dataset:
        """Parse and cross-check the source at `root`; every problem is one UserError line."""


def visible_dirs(path: Path) -> list[Path]:
    """The folders in `path` whose names do not start with a dot (links to folders too), sorted; none when
    `path` cannot be listed."""
    try:
        return sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError:
        return []


def image_sizes(dataset: Dataset) -> list[int]:
    """Each record's file size in bytes, -1 where it is missing or not a regular file (one stat each)."""
    root = str(dataset.root)
    sizes = []
    for record in dataset.records:
        try:
            info = os.stat(os.path.join(root, record.path))
        except OSError:
            sizes.append(-1)
            continue
        sizes.append(info.st_size if stat.S_ISREG(info.st_mode) else -1)
    return sizes


def check_records(dataset: Dataset, settings: Settings) -> None:
    """What every layout must deliver: labels in range, unique keys, extras that do not shadow fields, and
    boxes where --crop-bbox needs them."""
    if not dataset.records:
        raise UserError(f"{dataset.root}: 0 images: nothing to build")
    if settings.need_boxes and any(record.bbox is None for record in dataset.records):
        raise UserError(f"--crop-bbox: the {dataset.layout} layout has no bounding boxes ({dataset.root})")
    seen: dict[str, Record] = {}
    for record in dataset.records:
        if not 0 <= record.label < len(dataset.classes):
            raise UserError(f"{dataset.root}: image {record.image_id!r} has label {record.label}, "
                            f"outside 0..{len(dataset.classes) - 1}")
        first = seen.setdefault(record.key, record)
        if first is not record:
            raise UserError(f"{dataset.root}: images {first.image_id!r} and {record.image_id!r} get the same "
                            f"sample key {record.key!r} after sanitising; rename one of them")
        shadowed = [name for name, _ in record.extras if name in SAMPLE_FIELDS]
        if shadowed:
            raise ValueError(f"layout {dataset.layout}: extras may not replace {shadowed}")
