"""A small, learnable stand-in for CUB-200-2011, in the official layout, for tests and demos without the download.

Every class is a procedurally drawn "bird": a body shape (ellipse, rounded box or wedge), a body hue, a head
hue and a plumage pattern (plain, stripes, spots, bars), all fixed by the class index, so class names and
looks do not depend on the seed. Each image jitters size, position, scale, colours and a noisy gradient
background from a generator seeded by (seed, image id). The listing files follow the official formats, and a
few files carry the quirks of the real download: grayscale (L) JPEGs, CMYK JPEGs and a PNG named `.jpg`.

Deterministic: the same arguments give byte-identical files (and, with `tgz`, a byte-identical archive).
"""

from __future__ import annotations

import colorsys
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw
from tqdm import tqdm

from pipeline.archive import CUB_DIRNAME, pack_tgz
from pipeline.errors import UserError
from pipeline.manifest import replace_dir

README_MARKER = "CUB_200_2011 (cubstream synthetic)"
JPEG_QUALITY = 90
SIZE_RANGE = (300, 500)  # width and height, each drawn in this range (inclusive)
MARGIN = 4

# Quirks at fixed image ids (the real download has a few such files too).
PNG_AS_JPG_ID = 3
QUIRK_PERIOD = 200
GRAYSCALE_OFFSET = 5  # ids 5, 205, 405, ...
CMYK_OFFSET = 9  # ids 9, 209, 409, ...

# Independent random streams per seed (SeedSequence entropy is [seed, stream, index]).
STREAM_IMAGE = 1
STREAM_SPLIT = 2

GOLDEN = 0.6180339887498949
HUE_WORDS = ("Red", "Orange", "Amber", "Yellow", "Lime", "Green", "Jade", "Teal",
             "Cyan", "Azure", "Blue", "Indigo", "Violet", "Purple", "Magenta", "Rose")
SHAPES = ("ellipse", "box", "wedge")
SHAPE_WORDS = {"ellipse": "Plover", "box": "Boxbill", "wedge": "Wedgewing"}
PATTERNS = ("plain", "striped", "spotted", "barred")


@dataclass(frozen=True)
class ClassStyle:
    """What makes a class recognisable; derived from the class index only."""

    label: int  # 1-based, as in classes.txt
    name: str  # "001.Red_Striped_Plover"
    hue: float
    head_hue: float
    head_value: float
    shape: str
    pattern: str

    @property
    def species(self) -> str:
        return self.name.split(".", 1)[1]


@dataclass(frozen=True)
class ImageEntry:
    image_id: int
    style: ClassStyle
    relpath: str  # relative to images/, e.g. "001.Red_Striped_Plover/Red_Striped_Plover_0001_1.jpg"


def synth(out: Path, classes: int = 20, per_class: int = 40, seed: int = 0, tgz: bool = False,
          progress: bool = True) -> Path:
    """Write `out/CUB_200_2011/` (and with `tgz`, `out/CUB_200_2011.tgz`); return the dataset directory.

    The dataset is built in a hidden temporary directory and renamed into place when complete, so an
    interrupted run never leaves a complete-looking but partial dataset. An existing `CUB_200_2011`
    is replaced only if it is empty or was made by this function.
    """
    _validate(classes, per_class, seed)
    out = Path(out)
    final = out / CUB_DIRNAME
    _check_replaceable(final)
    _make_dir(out)
    tmp = out / f".{CUB_DIRNAME}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_dataset(tmp, classes, per_class, seed, progress)
        if tgz:
            pack_tgz(tmp, out / f"{CUB_DIRNAME}.tgz", arcname=CUB_DIRNAME)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _validate(classes: int, per_class: int, seed: int) -> None:
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
    return readme.is_file() and readme.read_text(encoding="utf-8").startswith(README_MARKER)


# ---------------------------------------------------------------- the listing files


def class_styles(classes: int) -> list[ClassStyle]:
    """Styles of classes 1..classes; names are unique (a numeric suffix breaks ties past 192 classes)."""
    styles, seen = [], {}
    for index in range(classes):
        hue = (0.02 + index * GOLDEN) % 1.0
        shape = SHAPES[index % len(SHAPES)]
        pattern = PATTERNS[(index // len(SHAPES)) % len(PATTERNS)]
        species = f"{HUE_WORDS[int(hue * len(HUE_WORDS))]}_{pattern.capitalize()}_{SHAPE_WORDS[shape]}"
        seen[species] = seen.get(species, 0) + 1
        if seen[species] > 1:
            species = f"{species}_{seen[species]}"
        styles.append(ClassStyle(label=index + 1, name=f"{index + 1:03d}.{species}", hue=hue,
                                 head_hue=(hue + 0.5 + 0.1 * (index % 3)) % 1.0,
                                 head_value=0.3 if index % 2 else 0.9, shape=shape, pattern=pattern))
    return styles


def _entries(styles: list[ClassStyle], per_class: int) -> list[ImageEntry]:
    entries = []
    for style in styles:
        for number in range(1, per_class + 1):
            image_id = len(entries) + 1
            relpath = f"{style.name}/{style.species}_{number:04d}_{image_id}.jpg"
            entries.append(ImageEntry(image_id, style, relpath))
    return entries


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


def _write_listings(root: Path, styles: list[ClassStyle], entries: list[ImageEntry], seed: int,
                    per_class: int, boxes: dict[int, tuple[int, int, int, int]]) -> None:
    split = _split(entries, seed)
    files = {
        "classes.txt": [f"{s.label} {s.name}" for s in styles],
        "images.txt": [f"{e.image_id} {e.relpath}" for e in entries],
        "image_class_labels.txt": [f"{e.image_id} {e.style.label}" for e in entries],
        "train_test_split.txt": [f"{e.image_id} {split[e.image_id]}" for e in entries],
        "bounding_boxes.txt": [f"{e.image_id} " + " ".join(f"{float(v):.1f}" for v in boxes[e.image_id])
                               for e in entries],
    }
    for name, lines in files.items():
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "README").write_text(
        f"{README_MARKER}\n\nProcedurally drawn stand-in for Caltech-UCSD Birds-200-2011, in its layout.\n"
        f"classes={len(styles)} per_class={per_class} seed={seed}\n"
        f"Quirks like the real download: image {PNG_AS_JPG_ID} is a PNG named .jpg; images "
        f"{GRAYSCALE_OFFSET} mod {QUIRK_PERIOD} are grayscale, {CMYK_OFFSET} mod {QUIRK_PERIOD} are CMYK.\n",
        encoding="utf-8")


def _write_dataset(root: Path, classes: int, per_class: int, seed: int, progress: bool) -> None:
    styles = class_styles(classes)
    entries = _entries(styles, per_class)
    boxes = {}
    for style in styles:
        (root / "images" / style.name).mkdir(parents=True, exist_ok=True)
    for entry in tqdm(entries, desc="synth", unit="img", disable=not progress):
        rng = np.random.default_rng([seed, STREAM_IMAGE, entry.image_id])
        image, boxes[entry.image_id] = draw_bird(entry.style, rng)
        _save(image, root / "images" / entry.relpath, entry.image_id)
    _write_listings(root, styles, entries, seed, per_class, boxes)


def _save(image: Image.Image, path: Path, image_id: int) -> None:
    """Save as JPEG, except the quirk ids: grayscale or CMYK JPEG, or a PNG under a `.jpg` name."""
    if image_id == PNG_AS_JPG_ID:
        image.save(path, format="PNG")
    elif image_id % QUIRK_PERIOD == GRAYSCALE_OFFSET:
        image.convert("L").save(path, format="JPEG", quality=JPEG_QUALITY)
    elif image_id % QUIRK_PERIOD == CMYK_OFFSET:
        image.convert("CMYK").save(path, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(path, format="JPEG", quality=JPEG_QUALITY)


# ---------------------------------------------------------------- drawing


def draw_bird(style: ClassStyle, rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One RGB image of a bird of `style` and its bounding box (x, y, width, height) in pixels."""
    width, height = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, size=2))
    image = _background(width, height, rng)
    body = Image.new("L", (width, height), 0)
    whole = Image.new("L", (width, height), 0)
    geometry = _geometry(width, height, rng)
    _draw_body(ImageDraw.Draw(body), style.shape, geometry)
    image.paste(_hsv(style.hue + rng.uniform(-0.015, 0.015), rng.uniform(0.65, 0.95), rng.uniform(0.65, 0.95)),
                mask=body)
    _draw_pattern(image, body, style.pattern, geometry, rng)
    _draw_head(ImageDraw.Draw(image), style, geometry, rng)
    whole.paste(body)
    _draw_head(ImageDraw.Draw(whole), None, geometry, rng)
    left, top, right, bottom = whole.getbbox()
    return image, (left, top, right - left, bottom - top)


def _background(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A muted gradient between four random corner colours, blended with uniform pixel noise.

    Done with PIL's C routines: float numpy arithmetic on the full image was most of the generation time.
    """
    corners = np.array([_hsv(rng.uniform(), rng.uniform(0.05, 0.35), rng.uniform(0.35, 0.85))
                        for _ in range(4)], np.uint8).reshape(2, 2, 3)
    gradient = Image.fromarray(corners).resize((width, height), Image.Resampling.BILINEAR)
    noise = Image.frombytes("RGB", (width, height), rng.bytes(width * height * 3))
    return Image.blend(gradient, noise, rng.uniform(0.05, 0.15))


@dataclass(frozen=True)
class _Geometry:
    """Where the bird sits. `x(v)` maps a local x (0 = tail side) to the image, mirrored when facing left."""

    ox: float
    oy: float
    extent_w: float
    facing_right: bool
    body_w: float
    body_h: float
    top: float
    head_r: float

    def x(self, v: float) -> float:
        return self.ox + (v if self.facing_right else self.extent_w - v)

    def y(self, v: float) -> float:
        return self.oy + v

    def box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        xa, xb = sorted((self.x(x0), self.x(x1)))
        return xa, self.y(y0), xb, self.y(y1)

    @property
    def head_center(self) -> tuple[float, float]:
        return self.body_w * 0.85, self.top + self.body_h * 0.1


def _geometry(width: int, height: int, rng: np.random.Generator) -> _Geometry:
    short = min(width, height)
    body_w = short * rng.uniform(0.4, 0.65)
    body_h = body_w * rng.uniform(0.5, 0.75)
    head_r = body_h * rng.uniform(0.28, 0.38)
    top = head_r
    extent_w = max(body_w, body_w * 0.85 + head_r * 1.8)
    extent_h = top + body_h
    ox = rng.uniform(MARGIN, max(MARGIN, width - extent_w - MARGIN))
    oy = rng.uniform(MARGIN, max(MARGIN, height - extent_h - MARGIN))
    return _Geometry(ox, oy, extent_w, bool(rng.integers(0, 2)), body_w, body_h, top, head_r)


def _draw_body(draw: ImageDraw.ImageDraw, shape: str, g: _Geometry) -> None:
    box = g.box(0, g.top, g.body_w, g.top + g.body_h)
    if shape == "ellipse":
        draw.ellipse(box, fill=255)
    elif shape == "box":
        draw.rounded_rectangle(box, radius=g.body_h * 0.15, fill=255)
    else:  # wedge: pointed towards the head
        draw.polygon([(g.x(0), g.y(g.top)), (g.x(g.body_w), g.y(g.top + g.body_h * 0.4)),
                      (g.x(0), g.y(g.top + g.body_h))], fill=255)


def _draw_pattern(image: Image.Image, body: Image.Image, pattern: str, g: _Geometry,
                  rng: np.random.Generator) -> None:
    if pattern == "plain":
        return
    marks = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(marks)
    if pattern == "striped":
        step = g.body_h / rng.uniform(4.5, 6.0)
        for i in range(1, int(g.body_h / step) + 1):
            y = g.y(g.top + i * step)
            draw.rectangle((g.x(0) - g.extent_w, y, g.x(0) + g.extent_w, y + step * 0.45), fill=255)
    elif pattern == "barred":
        step = g.body_w / rng.uniform(3.5, 5.0)
        for i in range(1, int(g.body_w / step) + 1):
            draw.rectangle(g.box(i * step, g.top, i * step + step * 0.4, g.top + g.body_h), fill=255)
    else:  # spotted
        radius = g.body_h * 0.08
        for _ in range(14):
            cx, cy = g.x(rng.uniform(0, g.body_w)), g.y(g.top + rng.uniform(0, g.body_h))
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    colour = (245, 245, 240) if pattern == "spotted" else (25, 25, 30)
    image.paste(colour, mask=ImageChops.multiply(marks, body))


def _draw_head(draw: ImageDraw.ImageDraw, style: ClassStyle | None, g: _Geometry,
               rng: np.random.Generator) -> None:
    """Head, beak and eye; with style None, only the silhouette (255) for the bounding-box mask."""
    cx, cy = g.head_center
    r = g.head_r
    head_fill: int | tuple[int, int, int] = 255
    beak_fill: int | tuple[int, int, int] = 255
    if style is not None:
        head_fill = _hsv(style.head_hue + rng.uniform(-0.015, 0.015), 0.7, style.head_value)
        beak_fill = (235, 170, 40)
    draw.polygon([(g.x(cx + r * 0.8), g.y(cy - r * 0.25)), (g.x(cx + r * 0.8), g.y(cy + r * 0.25)),
                  (g.x(cx + r * 1.8), g.y(cy))], fill=beak_fill)
    draw.ellipse(g.box(cx - r, cy - r, cx + r, cy + r), fill=head_fill)
    if style is not None:
        e = r * 0.15
        draw.ellipse(g.box(cx + r * 0.35 - e, cy - r * 0.3 - e, cx + r * 0.35 + e, cy - r * 0.3 + e),
                     fill=(10, 10, 10))


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {path}: cannot create directory ({e.strerror})") from None
