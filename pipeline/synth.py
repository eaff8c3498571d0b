"""A small, learnable stand-in for CUB-200-2011, in its layout (or NABirds' or ImageFolder's), for tests and
demos without the download.

Every class is a procedurally drawn "bird" (pipeline.synth_draw): a body shape, a body hue, a head hue and a
plumage pattern, all fixed by the class index, so class names and looks do not depend on the seed. Each image
jitters size, position, scale, colours and a noisy gradient background from a generator seeded by (seed,
image id). The listing files follow the official formats (pipeline.synth_layouts), and a few files carry the
quirks of the real download: grayscale (L) JPEGs, CMYK JPEGs and a PNG named `.jpg`.

Deterministic: the same arguments give byte-identical files (and, with `tgz`, a byte-identical archive).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.archive import pack_tgz
from pipeline.errors import UserError
from pipeline.files import replace_dir, temporary_name
from pipeline.synth_draw import ClassStyle, class_styles, draw_bird
from pipeline.synth_layouts import LAYOUTS, ImageEntry, dirname, listings, place, write_listings

README_MARKER = "CUB_200_2011 (cubstream synthetic)"
SYNTHETIC = "(cubstream synthetic)"  # how the README of every layout's synth dataset starts its first line
JPEG_QUALITY = 90

# Quirks at fixed image ids (the real download has a few such files too).
PNG_AS_JPG_ID = 3
QUIRK_PERIOD = 200
GRAYSCALE_OFFSET = 5  # ids 5, 205, 405, ...
CMYK_OFFSET = 9  # ids 9, 209, 409, ...

# Independent random streams per seed (SeedSequence entropy is [seed, stream, index]).
STREAM_IMAGE = 1
STREAM_SPLIT = 2


def synth(out: Path, classes: int = 20, per_class: int = 40, seed: int = 0, tgz: bool = False,
          progress: bool = True, layout: str = "cub") -> Path:
    """Write `out/CUB_200_2011/` (`out/nabirds/`, `out/imagefolder/` for those layouts; with `tgz`, also
    `out/<that name>.tgz`); return the dataset directory.

    The dataset is built in a hidden temporary directory and renamed into place when complete, so an
    interrupted run never leaves a complete-looking but partial dataset. An existing dataset directory
    is replaced only if it is empty or was made by this function.
    """
    _validate(classes, per_class, seed, layout)
    out = Path(out)
    name = dirname(layout)
    final = out / name
    _check_replaceable(final)
    _make_dir(out)
    tmp = temporary_name(final)  # a directory: built whole, then swapped in by replace_dir
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_dataset(tmp, layout, classes, per_class, seed, progress)
        if tgz:
            pack_tgz(tmp, out / f"{name}.tgz", arcname=name)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _validate(classes: int, per_class: int, seed: int, layout: str) -> None:
    if layout not in LAYOUTS:
        raise UserError(f"--layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")
    if not 1 <= classes <= 999:
        raise UserError(f"--classes must be between 1 and 999 (got {classes})")
    if not 2 <= per_class <= 9999:
        raise UserError(f"--per-class must be between 2 and 9999, so each class has train and test images "
                        f"(got {per_class})")
    if seed < 0:
        raise UserError(f"--seed must be >= 0 (got {seed})")


def _check_replaceable(final: Path) -> None:
    if not final.exists():
        return
    if final.is_dir() and (not any(final.iterdir()) or _is_synthetic(final)):
        return
    raise UserError(f"{final} exists and is not a synthetic dataset made by this tool; "
                    f"remove it or choose another --out")


def _is_synthetic(root: Path) -> bool:
    readme = root / "README"
    return readme.is_file() and SYNTHETIC in readme.read_text(encoding="utf-8").partition("\n")[0]


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {path}: cannot create directory ({e.strerror})") from None


def _entries(layout: str, styles: list[ClassStyle], per_class: int, seed: int) -> list[ImageEntry]:
    entries = []
    for style in styles:
        for number in range(1, per_class + 1):
            entries.append(ImageEntry(len(entries) + 1, number, style, is_train=False))
    flags = _split(entries, seed)
    entries = [ImageEntry(e.image_id, e.number, e.style, bool(flags[e.image_id])) for e in entries]
    return [ImageEntry(e.image_id, e.number, e.style, e.is_train, place(layout, e)) for e in entries]


def _split(entries: list[ImageEntry], seed: int) -> dict[int, int]:
    """image id -> is_training (1/0): about half of each class, at least one of each, seeded per class."""
    flags: dict[int, int] = {}
    by_class: dict[int, list[int]] = {}
    for entry in entries:
        by_class.setdefault(entry.style.label, []).append(entry.image_id)
    for label, ids in by_class.items():
        rng = np.random.default_rng([seed, STREAM_SPLIT, label])
        n_train = len(ids) // 2 + (int(rng.integers(0, 2)) if len(ids) % 2 else 0)
        n_train = min(max(n_train, 1), len(ids) - 1)
        train = set(rng.permutation(ids)[:n_train].tolist())
        flags.update({i: int(i in train) for i in ids})
    return flags


def _write_dataset(root: Path, layout: str, classes: int, per_class: int, seed: int, progress: bool) -> None:
    styles = class_styles(classes)
    entries = _entries(layout, styles, per_class, seed)
    boxes, sizes = {}, {}
    for entry in tqdm(entries, desc="synth", unit="img", disable=not progress):
        rng = np.random.default_rng([seed, STREAM_IMAGE, entry.image_id])
        image, boxes[entry.image_id] = draw_bird(entry.style, rng)
        sizes[entry.image_id] = image.size
        (root / entry.relpath).parent.mkdir(parents=True, exist_ok=True)
        _save(image, root / entry.relpath, entry.image_id)
    write_listings(root, listings(layout, styles, entries, boxes, sizes))
    (root / "README").write_text(_readme(layout, classes, per_class, seed), encoding="utf-8")


def _readme(layout: str, classes: int, per_class: int, seed: int) -> str:
    quirks = (f"images {GRAYSCALE_OFFSET} mod {QUIRK_PERIOD} are grayscale, {CMYK_OFFSET} mod {QUIRK_PERIOD} "
              "are CMYK")
    if layout == "cub":
        return (f"{README_MARKER}\n\nProcedurally drawn stand-in for Caltech-UCSD Birds-200-2011, in its layout.\n"
                f"classes={classes} per_class={per_class} seed={seed}\n"
                f"Quirks like the real download: image {PNG_AS_JPG_ID} is a PNG named .jpg; {quirks}.\n")
    where = "NABirds' layout" if layout == "nabirds" else "ImageFolder's layout (train/ and test/ class folders)"
    return (f"{dirname(layout)} {SYNTHETIC}\n\nProcedurally drawn stand-in for a bird dataset, in {where}.\n"
            f"classes={classes} per_class={per_class} seed={seed}\nQuirks: {quirks}.\n")


def _save(image: Image.Image, path: Path, image_id: int) -> None:
    """Save as JPEG, except the quirk ids: grayscale or CMYK JPEG, or a PNG under a `.jpg` name; a file named
    with another image extension is saved in that format."""
    if path.suffix != ".jpg":
        image.save(path)  # the format follows the extension
    elif image_id == PNG_AS_JPG_ID:
        image.save(path, format="PNG")
    elif image_id % QUIRK_PERIOD == GRAYSCALE_OFFSET:
        image.convert("L").save(path, format="JPEG", quality=JPEG_QUALITY)
    elif image_id % QUIRK_PERIOD == CMYK_OFFSET:
        image.convert("CMYK").save(path, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(path, format="JPEG", quality=JPEG_QUALITY)
