"""CUB-200-2011: five listing files with integer ids, classes 1..N, images under `images/`."""

from __future__ import annotations

from pathlib import Path

from pipeline.archive import CUB_DIRNAME
from pipeline.errors import UserError
from pipeline.sources import listing
from pipeline.sources.base import Dataset, Record, Settings, sample_key

NAME = "cub"
LOOKS_FOR = f"images.txt and CUB's other listing files (cub, e.g. {CUB_DIRNAME}/)"
LISTING_FILES = ("classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")


def find_root(path: Path) -> Path | None:
    """Any listing file but classes.txt claims a folder, so a tree with a file missing is read here and the
    missing file named (NABirds, tried first, has taken the trees with NABirds' own files)."""
    return listing.find_listing_root(path, CUB_DIRNAME, lambda folder: bool(listing.present(folder, listing.MARKERS)))


def read(root: Path, settings: Settings) -> Dataset:
    """Parse and cross-check the five listing files; every inconsistency is one line naming file and line."""
    if settings.test_fraction is not None:
        raise UserError(f"--test-fraction: {root} has CUB's official test split (train_test_split.txt)")
    listing.require(root, LISTING_FILES, "CUB's")
    images = listing.read_map(root, "images.txt", 1)
    listing.require_rows(root, "images.txt", images, "images")
    class_rows = listing.read_map(root, "classes.txt", 1)
    listing.require_rows(root, "classes.txt", class_rows, "classes")
    if sorted(class_rows) != list(range(1, len(class_rows) + 1)):
        raise UserError(f"classes.txt: class ids must be 1..{len(class_rows)} without gaps")
    classes = [class_rows[i][1][0] for i in range(1, len(class_rows) + 1)]

    labels = listing.read_map(root, "image_class_labels.txt", 1)
    split = listing.read_map(root, "train_test_split.txt", 1)
    boxes = listing.read_map(root, "bounding_boxes.txt", 4)
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", split),
                        ("bounding_boxes.txt", boxes)):
        listing.check_same_ids(images, name, table)

    records = [Record(image_id=image_id, path=listing.image_path(images[image_id]),
                      label=_label(labels[image_id], len(classes)), split=listing.split_flag(split[image_id]),
                      bbox=listing.bbox(boxes[image_id]), key=sample_key(f"{image_id:05d}"))
               for image_id in sorted(images)]
    return Dataset(NAME, root, classes, records, fingerprint_files=LISTING_FILES, fingerprint_prefix="images/")


def _label(row: listing.Row, num_classes: int) -> int:
    number, (value,) = row
    label = listing.as_int("image_class_labels.txt", number, value)
    if not 1 <= label <= num_classes:
        raise UserError(f"image_class_labels.txt:{number}: label {label} out of range 1..{num_classes}")
    return label - 1
