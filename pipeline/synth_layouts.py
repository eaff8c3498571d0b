"""Where the synthetic images go and what listing files describe them, per dataset layout.

The same classes, images, boxes and official split are written in each layout: CUB-200-2011's (integer ids,
`001.Name` class folders), NABirds' (UUID image ids, sparse leaf class ids under a small taxonomy with
spaces and commas in names, `images/NNNN/` folders, `hierarchy.txt`, `sizes.txt`) or ImageFolder's
(`train/` and `test/` of class folders named with spaces, files named with spaces and dots, several formats).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI reads LAYOUTS without importing the drawing code (numpy, PIL)
    from pipeline.synth_draw import ClassStyle

LAYOUTS = ("cub", "nabirds", "imagefolder")
Box = tuple[int, int, int, int]
# NABirds-like taxonomy: leaf classes sit under one family per body shape, families under the root.
NABIRDS_ROOT = (0, "Birds")
NABIRDS_FAMILIES = {"ellipse": (10, "Plovers, Dotterels, and Allies"), "box": (20, "Boxbills and Kin"),
                    "wedge": (30, "Wedgewings")}
NABIRDS_UNUSED_LEAF = (99, "Unseen Plover")  # a leaf class no image is labelled with
# ImageFolder: images with these ids (modulo 200) are written in another format, under its extension.
IMAGEFOLDER_FORMATS = {3: ".png", 7: ".webp", 11: ".bmp"}


@dataclass(frozen=True)
class ImageEntry:
    image_id: int  # 1-based, in class order
    number: int  # 1-based within its class
    style: ClassStyle
    is_train: bool
    relpath: str = ""  # relative to the dataset root


def dirname(layout: str) -> str:
    return {"cub": "CUB_200_2011", "nabirds": "nabirds", "imagefolder": "imagefolder"}[layout]


def place(layout: str, entry: ImageEntry) -> str:
    """The path of an entry's image, relative to the dataset root."""
    style = entry.style
    if layout == "cub":
        return f"images/{style.name}/{style.species}_{entry.number:04d}_{entry.image_id}.jpg"
    if layout == "nabirds":
        return f"images/{nabirds_class_id(style):04d}/{nabirds_uuid(entry.image_id).replace('-', '')}.jpg"
    split = "train" if entry.is_train else "test"
    extension = IMAGEFOLDER_FORMATS.get(entry.image_id % 200, ".jpg")
    words = style.species.replace("_", " ")
    return f"{split}/{words}/{words} {entry.number:04d}.v1{extension}"


def nabirds_class_id(style: ClassStyle) -> int:
    """Sparse, four-digit, and descending with the class index, so sorting by id reorders the classes."""
    return 4999 - 3 * (style.label - 1)


def nabirds_uuid(image_id: int) -> str:
    return str(uuid.UUID(bytes=hashlib.sha256(f"synth-nabirds:{image_id}".encode()).digest()[:16], version=4))


def listings(layout: str, styles: list[ClassStyle], entries: list[ImageEntry], boxes: dict[int, Box],
             sizes: dict[int, tuple[int, int]]) -> dict[str, list[str]]:
    """Listing file name -> lines (none for ImageFolder, whose folders are its listing)."""
    if layout == "cub":
        return {
            "classes.txt": [f"{s.label} {s.name}" for s in styles],
            "images.txt": [f"{e.image_id} {e.relpath.removeprefix('images/')}" for e in entries],
            "image_class_labels.txt": [f"{e.image_id} {e.style.label}" for e in entries],
            "train_test_split.txt": [f"{e.image_id} {int(e.is_train)}" for e in entries],
            "bounding_boxes.txt": [f"{e.image_id} " + " ".join(f"{float(v):.1f}" for v in boxes[e.image_id])
                                   for e in entries],
        }
    if layout == "nabirds":
        return _nabirds_listings(styles, entries, boxes, sizes)
    return {}


def _nabirds_listings(styles: list[ClassStyle], entries: list[ImageEntry], boxes: dict[int, Box],
                      sizes: dict[int, tuple[int, int]]) -> dict[str, list[str]]:
    families = {s.shape: NABIRDS_FAMILIES[s.shape] for s in styles}
    leaves = {nabirds_class_id(s): (s.species.replace("_", " "), families[s.shape][0]) for s in styles}
    leaves[NABIRDS_UNUSED_LEAF[0]] = (NABIRDS_UNUSED_LEAF[1], NABIRDS_FAMILIES["ellipse"][0])
    families.setdefault("ellipse", NABIRDS_FAMILIES["ellipse"])
    names = {NABIRDS_ROOT[0]: NABIRDS_ROOT[1], **dict(families.values()),
             **{class_id: name for class_id, (name, _) in leaves.items()}}
    parents = {**{family_id: NABIRDS_ROOT[0] for family_id, _ in families.values()},
               **{class_id: parent for class_id, (_, parent) in leaves.items()}}
    uid = {e.image_id: nabirds_uuid(e.image_id) for e in entries}
    return {
        "classes.txt": [f"{class_id} {names[class_id]}" for class_id in sorted(names)],
        "hierarchy.txt": [f"{child} {parent}" for child, parent in sorted(parents.items())],
        "images.txt": [f"{uid[e.image_id]} {e.relpath.removeprefix('images/')}" for e in entries],
        "image_class_labels.txt": [f"{uid[e.image_id]} {nabirds_class_id(e.style)}" for e in entries],
        "train_test_split.txt": [f"{uid[e.image_id]} {int(e.is_train)}" for e in entries],
        "bounding_boxes.txt": [f"{uid[e.image_id]} " + " ".join(map(str, boxes[e.image_id])) for e in entries],
        "sizes.txt": [f"{uid[e.image_id]} {sizes[e.image_id][0]} {sizes[e.image_id][1]}" for e in entries],
    }


def write_listings(root: Path, files: dict[str, list[str]]) -> None:
    for name, lines in files.items():
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
