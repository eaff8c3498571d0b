"""Parsing of CUB-style listing files (`<id> <fields...>` per line), shared by the CUB and NABirds layouts.

Listing files are UTF-8 (a leading UTF-8 byte-order mark is allowed); any other encoding is refused at its
first undecodable line. Whitespace around every field is dropped (trailing spaces, tabs, CRLF line ends);
the last field keeps its inner spaces. Every problem is one line naming the file and line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.errors import UserError
from pipeline.sources.base import visible_dirs

Row = tuple[int, list[str]]  # line number, fields after the id
# Every listing file of the listing layouts (CUB, NABirds). A folder holding one is such a tree, perhaps with a
# file missing: the listing layout names what is missing, and it is never read as an ImageFolder.
FILES = ("classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt",
         "hierarchy.txt")
# Those that claim a folder for a listing layout: classes.txt alone does not (ImageFolder trees often have one).
MARKERS = FILES[1:]


def rows(root: Path, name: str, num_fields: int, int_ids: bool = True) -> Iterator[tuple[int, int | str, list[str]]]:
    """Yield (line number, id, fields) of a listing file; ids are integers unless `int_ids` is False."""
    raw = (root / name).read_bytes().removeprefix(b"\xef\xbb\xbf")
    for number, line in enumerate(raw.splitlines(), 1):  # bytes split on \n, \r and \r\n only
        text = _decode_line(name, number, line).strip()
        if not text:
            continue
        fields = text.split(maxsplit=num_fields)
        if len(fields) != num_fields + 1:
            raise UserError(f"{name}:{number}: expected {num_fields + 1} fields, got {text!r}")
        if not int_ids:
            yield number, fields[0], fields[1:]
            continue
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


def read_map(root: Path, name: str, num_fields: int, int_ids: bool = True) -> dict[int | str, Row]:
    """id -> (line number, fields); a repeated id is an error naming both lines."""
    table: dict[int | str, Row] = {}
    for number, row_id, fields in rows(root, name, num_fields, int_ids):
        if row_id in table:
            raise UserError(f"{name}:{number}: duplicate id {row_id} (first on line {table[row_id][0]})")
        table[row_id] = (number, fields)
    return table


def require(root: Path, names: tuple[str, ...], title: str) -> None:
    for name in names:
        if not (root / name).is_file():
            raise UserError(f"not {title} layout: {root / name} is missing")


def require_rows(root: Path, name: str, table: dict, what: str) -> None:
    """An empty listing file (or one of blank lines) is named, before anything is built from it."""
    if not table:
        raise UserError(f"{root / name}: 0 {what} (the file lists none)")


def as_int(name: str, number: int, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}:{number}: {value!r} is not an integer") from None


def check_same_ids(images: dict, name: str, table: dict) -> None:
    for image_id, (number, _) in table.items():
        if image_id not in images:
            raise UserError(f"{name}:{number}: id {image_id} is not in images.txt")
    for image_id, (number, _) in images.items():
        if image_id not in table:
            raise UserError(f"images.txt:{number}: id {image_id} is missing from {name}")


def image_path(row: Row) -> str:
    """The path of images.txt's row, relative to the source root (`images/...`)."""
    number, (path,) = row
    if path.startswith("/") or ".." in path.split("/"):
        raise UserError(f"images.txt:{number}: path {path!r} leaves images/")
    return f"images/{path}"


def split_flag(row: Row) -> str:
    number, (value,) = row
    if value not in ("0", "1"):
        raise UserError(f"train_test_split.txt:{number}: is_training_image must be 0 or 1, got {value!r}")
    return "train" if value == "1" else "test"


def bbox(row: Row) -> tuple[float, float, float, float]:
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


def present(directory: Path, names: tuple[str, ...]) -> list[str]:
    """Those of `names` that are files in `directory`."""
    return [name for name in names if (directory / name).is_file()]


def find_listing_root(path: Path, folder: str, is_root: Callable[[Path], bool]) -> Path | None:
    """The first of `path`, `path/folder` (the dataset's own folder name) and `path`'s only folder (an
    archive's top folder, or a copy under another name) for which `is_root` holds, else None."""
    candidates = [path, path / folder]
    folders = visible_dirs(path)
    if len(folders) == 1:
        candidates.append(folders[0])
    return next((c for c in candidates if c.is_dir() and is_root(c)), None)
