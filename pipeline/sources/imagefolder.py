"""ImageFolder: `ROOT/<class>/*` (a seeded, stratified test split is carved out) or `ROOT/{train,test}/<class>/*`
(with `val/` or `valid/` taken as the valid split instead of carving one from train).

Class names are the sorted class-folder names (the union over the split folders). Images are the files with
an extension in IMAGE_EXTENSIONS (any case) anywhere below a class folder; hidden files and folders and other
files are ignored, and links to folders are not followed.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import UserError
from pipeline.sources.base import Dataset, Record, Settings
from pipeline.splits import carve

NAME = "imagefolder"
LOOKS_FOR = "class folders of images, or train/ and test/ folders of class folders (imagefolder)"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                    ".pbm", ".pnm")
DEFAULT_TEST_FRACTION = 0.2
SPLIT_FOLDERS = {"train": "train", "test": "test", "val": "valid", "valid": "valid"}


LISTING_MARKERS = ("classes.txt", "image_class_labels.txt", "train_test_split.txt")


def find_root(path: Path) -> Path | None:
    """`path` when it holds folders; a lone top folder (as in most archives) is looked into. A folder with
    listing files is a listing layout with a file missing, never an imagefolder."""
    if any((path / name).exists() for name in LISTING_MARKERS):
        return None
    folders = _visible_dirs(path)
    if len(folders) == 1 and not _visible_files(path) and _visible_dirs(folders[0]) \
            and not _has_split_folders(path):
        return folders[0]
    return path if folders else None


def read(root: Path, settings: Settings) -> Dataset:
    if _has_split_folders(root):
        if settings.test_fraction is not None:
            raise UserError(f"--test-fraction: {root} has its own test split (train/ and test/ folders)")
        return _read_split_folders(root)
    fraction = DEFAULT_TEST_FRACTION if settings.test_fraction is None else settings.test_fraction
    if not 0 <= fraction < 1:
        raise UserError(f"--test-fraction must be in [0, 1), got {fraction}")
    folders = _class_folders(root)
    classes = [folder.name for folder in folders]
    images = [(label, path) for label, folder in enumerate(folders) for path in _images(root, folder)]
    by_class: dict[int, list[str]] = {}
    for label, path in images:
        by_class.setdefault(label, []).append(path)
    test = carve(by_class, fraction, settings.seed, "test")
    records = [Record(image_id=path, path=path, label=label, split="test" if path in test else "train")
               for label, path in images]
    return Dataset(NAME, root, classes, records, info={"test_fraction": fraction})


def _read_split_folders(root: Path) -> Dataset:
    present = [name for name in SPLIT_FOLDERS if (root / name).is_dir()]
    if "val" in present and "valid" in present:
        raise UserError(f"{root}: both val/ and valid/ exist; keep one of them as the valid split")
    others = [p.name for p in _visible_dirs(root) if p.name not in SPLIT_FOLDERS]
    if others:
        raise UserError(f"{root}: folder {others[0]!r} next to train/ and test/ is not a split "
                        f"(expected {', '.join(SPLIT_FOLDERS)})")
    folders = {name: _class_folders(root / name) for name in present}
    classes = sorted({folder.name for found in folders.values() for folder in found})
    index = {name: label for label, name in enumerate(classes)}
    records = [Record(image_id=path, path=path, label=index[folder.name], split=SPLIT_FOLDERS[name])
               for name in present for folder in folders[name] for path in _images(root, folder)]
    return Dataset(NAME, root, classes, records)


def _has_split_folders(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "test").is_dir()


def _visible_dirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError:
        return []


def _visible_files(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if not p.name.startswith(".") and p.is_file()]


def _class_folders(path: Path) -> list[Path]:
    folders = _visible_dirs(path)
    if not folders:
        raise UserError(f"not an imagefolder layout: no class folders in {path}")
    return folders


def _images(root: Path, folder: Path) -> list[str]:
    """Paths (relative to root, '/'-separated, sorted) of the images below a class folder; none is an error."""
    found = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        base = Path(directory).relative_to(root).as_posix()
        found += [f"{base}/{name}" for name in sorted(files)
                  if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
    if not found:
        raise UserError(f"{folder}: class folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return found
