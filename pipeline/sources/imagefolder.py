"""ImageFolder: class folders `ROOT/<class>/*`, or split folders `ROOT/{train,test,val}/<class>/*`.

Split folders are `train/`, `test/` and `val/` (or `valid/`, `validation/`), in any letter case. A root that
holds any of them is read as split folders:
- every folder at the root must be a split folder, one per split, and `train/` must be one of them;
- a split folder holds class folders only: an image lying directly in it has no class and is refused;
- without `test/`, the test split is carved from train/ (seeded, stratified, `--test-fraction`), as for
  class folders; without a valid folder, the build carves valid from train as usual.
Any other root is class folders, and a test split is carved from them. A split folder's name never becomes
a class: a class folder named like one, or a split folder below a class folder (`ROOT/<class>/train/`), is
refused.

Class names are the sorted class-folder names (the union over the split folders). Images are the files with
an extension in IMAGE_EXTENSIONS (any case) anywhere below a class folder; hidden files and folders and other
files are ignored, and links to folders are not followed. A folder holding CUB's or NABirds' listing files is
never read as an ImageFolder.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import UserError
from pipeline.sources import listing
from pipeline.sources.base import Dataset, Record, Settings, visible_dirs
from pipeline.splits import carve

NAME = "imagefolder"
LOOKS_FOR = "class folders of images, or train/ and test/ folders of class folders (imagefolder)"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                    ".pbm", ".pnm")
DEFAULT_TEST_FRACTION = 0.2
# Split-folder name (casefolded) -> split; records are listed in SPLIT_ORDER (the fingerprint depends on it).
SPLIT_FOLDERS = {"train": "train", "test": "test", "val": "valid", "valid": "valid", "validation": "valid"}
SPLIT_ORDER = ("train", "test", "valid")

Entry = tuple[str, str, str]  # class name, image path relative to the root, split


def find_root(path: Path) -> Path | None:
    """`path` when it holds folders; a lone top folder (as in most archives) is looked into unless it is a
    split folder. A CUB or NABirds tree (a folder with their listing files, at the top or one level down) is
    refused with one line naming those files: with a file missing, the listing layouts name it instead."""
    folders = visible_dirs(path)
    for folder in (path, *folders):
        found = listing.present(folder, listing.FILES)
        if found:
            raise UserError(f"{folder}: holds {', '.join(found)} (listing files of the cub and nabirds layouts), "
                            "so it is not read as an imagefolder")
    if len(folders) == 1 and not _split_folders(path) and not _visible_files(path) and visible_dirs(folders[0]):
        return folders[0]
    return path if folders else None


def read(root: Path, settings: Settings) -> Dataset:
    splits = _split_folders(root)
    if splits:
        entries = _split_entries(root, splits)
        if "test" in splits:
            if settings.test_fraction is not None:
                raise UserError(f"--test-fraction: {root} has its own test split (a test/ folder)")
            return _dataset(root, entries, {})
    else:
        entries = [(folder.name, path, "train") for folder in _class_folders(root) for path in _images(root, folder)]
    fraction = DEFAULT_TEST_FRACTION if settings.test_fraction is None else settings.test_fraction
    if not 0 <= fraction < 1:
        raise UserError(f"--test-fraction must be in [0, 1), got {fraction}")
    by_class: dict[str, list[str]] = {}
    for name, path, split in entries:
        if split == "train":
            by_class.setdefault(name, []).append(path)
    test = carve(by_class, fraction, settings.seed, "test")
    entries = [(name, path, "test" if path in test else split) for name, path, split in entries]
    return _dataset(root, entries, {"test_fraction": fraction})


def _dataset(root: Path, entries: list[Entry], info: dict) -> Dataset:
    classes = sorted({name for name, _, _ in entries})
    index = {name: label for label, name in enumerate(classes)}
    records = [Record(image_id=path, path=path, label=index[name], split=split) for name, path, split in entries]
    return Dataset(NAME, root, classes, records, info=info)


def _split_folders(path: Path) -> dict[str, Path]:
    """split -> its folder in `path`; two folders for one split (val/ and valid/, Train/ and train/) are refused."""
    found: dict[str, Path] = {}
    for folder in visible_dirs(path):
        split = SPLIT_FOLDERS.get(folder.name.casefold())
        if split is None:
            continue
        if split in found:
            raise UserError(f"{path}: both {found[split].name}/ and {folder.name}/ are {split} folders; keep one")
        found[split] = folder
    return found


def _split_entries(root: Path, splits: dict[str, Path]) -> list[Entry]:
    others = [p.name for p in visible_dirs(root) if p.name.casefold() not in SPLIT_FOLDERS]
    if others:
        raise UserError(f"{root}: folder {others[0]!r} next to the split folders is not a split "
                        f"(split folders: {', '.join(SPLIT_FOLDERS)}; class folders go inside them)")
    if "train" not in splits:
        present = ", ".join(f"{folder.name}/" for folder in splits.values())
        raise UserError(f"{root}: split folder {present} without a train/ folder (split folders need "
                        "train/<class>/; test/ and val/ are optional)")
    entries = []
    for split in SPLIT_ORDER:
        if split not in splits:
            continue
        loose = [p.name for p in _visible_files(splits[split]) if _is_image(p.name)]
        if loose:
            raise UserError(f"{splits[split] / loose[0]}: an image directly in a split folder has no class "
                            f"(images go in {splits[split].name}/<class>/)")
        for folder in _class_folders(splits[split]):
            if folder.name.casefold() in SPLIT_FOLDERS:
                raise UserError(f"{folder}: a class folder named like a split folder (is the tree nested one "
                                "level too deep?)")
            entries += [(folder.name, path, split) for path in _images(root, folder)]
    return entries


def _visible_files(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if not p.name.startswith(".") and p.is_file()]


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _class_folders(path: Path) -> list[Path]:
    folders = visible_dirs(path)
    if not folders:
        raise UserError(f"not an imagefolder layout: no class folders in {path}")
    return folders


def _images(root: Path, folder: Path) -> list[str]:
    """Paths (relative to root, '/'-separated, sorted) of the images below a class folder; none is an error,
    and so is a split folder inside it (its images would be mixed into one split)."""
    found = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        nested = [d for d in subdirs if d.casefold() in SPLIT_FOLDERS]
        if nested:
            raise UserError(f"{Path(directory) / nested[0]}: a split folder inside class folder {folder.name!r}; "
                            "split folders go at the top (ROOT/train/<class>/, ROOT/test/<class>/)")
        base = Path(directory).relative_to(root).as_posix()
        found += [f"{base}/{name}" for name in sorted(files) if _is_image(name)]
    if not found:
        raise UserError(f"{folder}: class folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return found
