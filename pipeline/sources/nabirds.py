"""NABirds: CUB's listing files plus `hierarchy.txt`, with UUID image ids and sparse class ids.

`classes.txt` lists every node of the taxonomy ("0 Birds", "295 Swans, Geese, and Ducks", ...);
`hierarchy.txt` gives each class's parent (`child_id parent_id`). Images are labelled with leaf classes only
and sit in `images/NNNN/`. Labels become 0..K-1 over the leaf classes used, in class-id order; the manifest
keeps each one's original id (`class_ids`) and its ancestors' names, nearest first (`class_parents`).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import UserError
from pipeline.sources import listing
from pipeline.sources.base import Dataset, Record, Settings, sample_key

NAME = "nabirds"
LOOKS_FOR = "images.txt with hierarchy.txt (nabirds, e.g. nabirds/)"
DIRNAME = "nabirds"
# Files that only NABirds has besides its listing files (sizes.txt and photographers.txt ship with it).
OWN_FILES = ("hierarchy.txt", "sizes.txt", "photographers.txt")
LISTING_FILES = ("classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt",
                 "bounding_boxes.txt", "hierarchy.txt")


def find_root(path: Path) -> Path | None:
    """A folder with hierarchy.txt, or with other listing files and either another file only NABirds has or
    NABirds' folder name: a NABirds tree with a listing file missing is read here, and the file named."""
    return listing.find_listing_root(path, DIRNAME, _is_root)


def _is_root(folder: Path) -> bool:
    if (folder / "hierarchy.txt").is_file():
        return True
    return bool(listing.present(folder, listing.MARKERS)) and (
        folder.name == DIRNAME or bool(listing.present(folder, OWN_FILES)))


def read(root: Path, settings: Settings) -> Dataset:
    """Parse and cross-check the listing files; every inconsistency is one line naming file and line."""
    if settings.test_fraction is not None:
        raise UserError(f"--test-fraction: {root} has NABirds' official test split (train_test_split.txt)")
    listing.require(root, LISTING_FILES, "NABirds'")
    images = listing.read_map(root, "images.txt", 1, int_ids=False)
    listing.require_rows(root, "images.txt", images, "images")
    names = {class_id: fields[0] for class_id, (_, fields) in listing.read_map(root, "classes.txt", 1).items()}
    listing.require_rows(root, "classes.txt", names, "classes")
    parents = _hierarchy(root, names)

    labels = listing.read_map(root, "image_class_labels.txt", 1, int_ids=False)
    split = listing.read_map(root, "train_test_split.txt", 1, int_ids=False)
    boxes = listing.read_map(root, "bounding_boxes.txt", 4, int_ids=False)
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", split),
                        ("bounding_boxes.txt", boxes)):
        listing.check_same_ids(images, name, table)

    children: dict[int, list[int]] = {}
    for child, parent in sorted(parents.items()):
        children.setdefault(parent, []).append(child)
    class_of = {image_id: _leaf(labels[image_id], names, children) for image_id in images}
    used = sorted(set(class_of.values()))
    _check_unique_names(used, names)
    index = {class_id: i for i, class_id in enumerate(used)}
    records = [Record(image_id=image_id, path=listing.image_path(images[image_id]), label=index[class_of[image_id]],
                      split=listing.split_flag(split[image_id]), bbox=listing.bbox(boxes[image_id]),
                      key=sample_key(str(image_id)), extras=(("class_id", class_of[image_id]),))
               for image_id in sorted(images, key=str)]
    class_fields = {"class_ids": used, "class_parents": [_ancestors(c, names, parents) for c in used]}
    return Dataset(NAME, root, [names[c] for c in used], records, fingerprint_files=LISTING_FILES,
                   class_fields=class_fields)


def _hierarchy(root: Path, names: dict) -> dict[int, int]:
    """child id -> parent id, both listed in classes.txt, without cycles."""
    parents: dict[int, int] = {}
    for child, (number, (value,)) in listing.read_map(root, "hierarchy.txt", 1).items():
        parent = listing.as_int("hierarchy.txt", number, value)
        for class_id in (child, parent):
            if class_id not in names:
                raise UserError(f"hierarchy.txt:{number}: class id {class_id} is not in classes.txt")
        parents[child] = parent
    for start in parents:
        seen = {start}
        node = start
        while node in parents:
            node = parents[node]
            if node in seen:
                raise UserError(f"hierarchy.txt: class {start} is its own ancestor (a cycle through {node})")
            seen.add(node)
    return parents


def _leaf(row: listing.Row, names: dict, children: dict[int, list[int]]) -> int:
    number, (value,) = row
    class_id = listing.as_int("image_class_labels.txt", number, value)
    if class_id not in names:
        raise UserError(f"image_class_labels.txt:{number}: class id {class_id} is not in classes.txt")
    if class_id in children:
        examples = ", ".join(map(str, children[class_id][:3]))
        raise UserError(f"image_class_labels.txt:{number}: class {class_id} ({names[class_id]!r}) is not a leaf "
                        f"class (hierarchy.txt lists children, e.g. {examples}); "
                        "images must be labelled with leaf classes")
    return class_id


def _check_unique_names(used: list[int], names: dict) -> None:
    first: dict[str, int] = {}
    for class_id in used:
        other = first.setdefault(names[class_id], class_id)
        if other != class_id:
            raise UserError(f"classes.txt: classes {other} and {class_id} are both named {names[class_id]!r}")


def _ancestors(class_id: int, names: dict, parents: dict[int, int]) -> list[str]:
    chain = []
    while class_id in parents:
        class_id = parents[class_id]
        chain.append(names[class_id])
    return chain
