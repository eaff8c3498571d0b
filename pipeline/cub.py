"""Read and cross-check CUB-200-2011's official listing files (a directory or the .tgz)."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.archive import find_cub_root, safe_extract
from pipeline.errors import UserError

LISTING_FILES = ("classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")


@dataclass(frozen=True)
class Record:
    """One listed image. `label` is 0-based; `path` is relative to `images/`."""

    image_id: int
    path: str
    label: int
    is_train: bool
    bbox: tuple[float, float, float, float]  # x, y, w, h in original pixels

    @property
    def key(self) -> str:
        return f"{self.image_id:05d}"


@dataclass(frozen=True)
class Cub:
    root: Path
    classes: list[str]
    records: list[Record]  # sorted by image id

    def image_path(self, record: Record) -> Path:
        return self.root / "images" / record.path


@contextlib.contextmanager
def open_source(source: Path) -> Iterator[Path]:
    """Yield the directory holding `images.txt` for a CUB directory or a .tgz/.tar (extracted safely)."""
    if not source.exists():
        raise UserError(f"source {source}: no such file or directory")
    if source.is_dir():
        yield find_cub_root(source)
        return
    with tempfile.TemporaryDirectory(prefix="cubstream-src-") as tmp:
        safe_extract(source, Path(tmp))
        yield find_cub_root(Path(tmp))


def _rows(root: Path, name: str, num_fields: int) -> Iterator[tuple[int, int, list[str]]]:
    """Yield (line number, id, fields) of a listing file, with one-line errors naming file and line.

    Listing files are UTF-8 (a leading UTF-8 byte-order mark is allowed); any other encoding is refused at
    its first undecodable line. Whitespace around every field is dropped (trailing spaces, tabs, CRLF line
    ends); the last field keeps its inner spaces.
    """
    path = root / name
    if not path.is_file():
        raise UserError(f"not CUB's layout: {path} is missing")
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    for number, line in enumerate(raw.splitlines(), 1):  # bytes split on \n, \r and \r\n only
        text = _decode_line(name, number, line).strip()
        if not text:
            continue
        fields = text.split(maxsplit=num_fields)
        if len(fields) != num_fields + 1:
            raise UserError(f"{name}:{number}: expected {num_fields + 1} fields, got {text!r}")
        try:
            yield number, int(fields[0]), fields[1:]
        except ValueError:
            raise UserError(f"{name}:{number}: id {fields[0]!r} is not an integer") from None


def _decode_line(name: str, number: int, line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = line[e.start:e.end]
        raise UserError(f"{name}:{number}: not UTF-8 (bytes {bad!r} at byte {e.start + 1} of the line); "
                        "listing files must be UTF-8: convert it, e.g. `iconv -f latin1 -t utf-8`") from None


def _read_map(root: Path, name: str, num_fields: int) -> dict[int, tuple[int, list[str]]]:
    table: dict[int, tuple[int, list[str]]] = {}
    for number, image_id, fields in _rows(root, name, num_fields):
        if image_id in table:
            raise UserError(f"{name}:{number}: duplicate id {image_id} (first on line {table[image_id][0]})")
        table[image_id] = (number, fields)
    return table


def _as_int(name: str, number: int, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}:{number}: {value!r} is not an integer") from None


def read_cub(root: Path) -> Cub:
    """Parse and cross-check the five listing files; every inconsistency is one line naming file and line."""
    for name in LISTING_FILES:
        if not (root / name).is_file():
            raise UserError(f"not CUB's layout: {root / name} is missing")
    class_rows = _read_map(root, "classes.txt", 1)
    if sorted(class_rows) != list(range(1, len(class_rows) + 1)):
        raise UserError(f"classes.txt: class ids must be 1..{len(class_rows)} without gaps")
    classes = [class_rows[i][1][0] for i in range(1, len(class_rows) + 1)]

    images = _read_map(root, "images.txt", 1)
    labels = _read_map(root, "image_class_labels.txt", 1)
    split = _read_map(root, "train_test_split.txt", 1)
    boxes = _read_map(root, "bounding_boxes.txt", 4)
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", split),
                        ("bounding_boxes.txt", boxes)):
        _check_same_ids(images, name, table)

    records = []
    for image_id in sorted(images):
        records.append(Record(
            image_id=image_id,
            path=_image_path(images[image_id]),
            label=_label(labels[image_id], len(classes)),
            is_train=_flag(split[image_id]),
            bbox=_bbox(boxes[image_id]),
        ))
    return Cub(root=root, classes=classes, records=records)


def _check_same_ids(images: dict, name: str, table: dict) -> None:
    for image_id, (number, _) in table.items():
        if image_id not in images:
            raise UserError(f"{name}:{number}: id {image_id} is not in images.txt")
    for image_id, (number, _) in images.items():
        if image_id not in table:
            raise UserError(f"images.txt:{number}: id {image_id} is missing from {name}")


def _image_path(row: tuple[int, list[str]]) -> str:
    number, (path,) = row
    if path.startswith("/") or ".." in path.split("/"):
        raise UserError(f"images.txt:{number}: path {path!r} leaves images/")
    return path


def _label(row: tuple[int, list[str]], num_classes: int) -> int:
    number, (value,) = row
    label = _as_int("image_class_labels.txt", number, value)
    if not 1 <= label <= num_classes:
        raise UserError(f"image_class_labels.txt:{number}: label {label} out of range 1..{num_classes}")
    return label - 1


def _flag(row: tuple[int, list[str]]) -> bool:
    number, (value,) = row
    if value not in ("0", "1"):
        raise UserError(f"train_test_split.txt:{number}: is_training_image must be 0 or 1, got {value!r}")
    return value == "1"


def _bbox(row: tuple[int, list[str]]) -> tuple[float, float, float, float]:
    number, values = row
    try:
        x, y, w, h = (float(v) for v in values)
    except ValueError:
        raise UserError(f"bounding_boxes.txt:{number}: expected 4 numbers, got {' '.join(values)!r}") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise UserError(f"bounding_boxes.txt:{number}: box values must be finite numbers, got {' '.join(values)!r}")
    if w <= 0 or h <= 0:
        raise UserError(f"bounding_boxes.txt:{number}: box width and height must be positive")
    return x, y, w, h


def image_sizes(cub: Cub) -> list[int]:
    """Each listed image's size in bytes, -1 where it is missing or not a regular file (one stat each)."""
    images = os.path.join(cub.root, "images")
    sizes = []
    for record in cub.records:
        try:
            info = os.stat(os.path.join(images, record.path))
        except OSError:
            sizes.append(-1)
            continue
        sizes.append(info.st_size if stat.S_ISREG(info.st_mode) else -1)
    return sizes


def fingerprint(cub: Cub, sizes: list[int]) -> str:
    """sha256 over the listing files and every image's path and size: equal for a directory and its .tgz."""
    digest = hashlib.sha256()
    for name in LISTING_FILES:
        digest.update(name.encode() + b"\0" + (cub.root / name).read_bytes() + b"\0")
    for record, size in zip(cub.records, sizes, strict=True):
        digest.update(f"{record.path}\0{size}\0".encode())
    return digest.hexdigest()
