"""Decode any listed image, fix it to RGB, optionally crop to its box and resize, and encode it as JPEG."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image, ImageOps

from pipeline.errors import one_line

Box = tuple[float, float, float, float]  # x, y, w, h
BBOX_MARGIN = 0.1  # --crop-bbox keeps this fraction of the box's size around it on each side


class BadImage(Exception):
    """The file is missing, truncated or not a decodable image; the message is the reason."""


@dataclass(frozen=True)
class EncodeOptions:
    resize_short: int = 256  # 0 keeps the original pixels
    crop_bbox: bool = False
    quality: int = 95


@dataclass(frozen=True)
class Encoded:
    jpeg: bytes
    original_size: tuple[int, int]
    size: tuple[int, int]
    bbox: Box  # in stored-image pixels


def encode_image(data: bytes, bbox: Box | None, options: EncodeOptions) -> Encoded:
    """Deterministic: the same bytes and options always give the same output bytes.

    Every step that reads the file (header, EXIF, pixels, conversions) runs inside one guard: a truncated or
    malformed file is a BadImage, whichever step notices it (PIL reads PNG metadata lazily, so a cut PNG
    fails as early as its EXIF lookup). Without a box (a source that has none), the whole image is the box.
    """
    image = _open(data)
    try:
        return _encode(image, data, bbox, options)
    except BadImage:
        raise
    except MemoryError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data, from any step that reads it
        raise BadImage(f"cannot decode ({one_line(e, typed=True)})") from None


def _encode(image: Image.Image, data: bytes, bbox: Box | None, options: EncodeOptions) -> Encoded:
    original_size = image.size
    if bbox is None:
        bbox = (0.0, 0.0, float(original_size[0]), float(original_size[1]))
    orientation = image.getexif().get(0x0112, 1)
    if _can_keep_bytes(image, orientation, options):
        image.load()
        return Encoded(data, original_size, original_size, bbox)

    if options.resize_short and not options.crop_bbox and orientation == 1:
        image.draft(None, _target_size(image.size, options.resize_short))  # JPEG DCT-domain downscale
    image.load()
    # draft() may have shrunk the decode: express the box in the decoded grid.
    box = _scale_box(bbox, image.size[0] / original_size[0], image.size[1] / original_size[1])
    if orientation != 1:
        box = transpose_box(box, image.size, orientation)
        image = ImageOps.exif_transpose(image)
    image = to_rgb(image)
    if options.crop_bbox:
        image, box = _crop(image, box)
    if options.resize_short:
        image, box = _resize_short(image, box, options.resize_short)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=options.quality)
    return Encoded(out.getvalue(), original_size, image.size, box)


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except MemoryError:
        raise
    except Exception as e:  # PIL raises many types for garbage input
        raise BadImage(f"not an image ({one_line(e, typed=True)})") from None


def _can_keep_bytes(image: Image.Image, orientation: int, options: EncodeOptions) -> bool:
    return (options.resize_short == 0 and not options.crop_bbox and image.format == "JPEG"
            and image.mode == "RGB" and orientation == 1)


def _target_size(size: tuple[int, int], short: int) -> tuple[int, int]:
    scale = min(1.0, short / min(size))
    return math.ceil(size[0] * scale), math.ceil(size[1] * scale)


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette, 16-bit and alpha images to RGB (alpha composited on white)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode == "I":
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def transpose_box(box: Box, size: tuple[int, int], orientation: int) -> Box:
    """Map a box on the raw pixel grid (width, height = size) through an EXIF orientation."""
    x, y, w, h = box
    width, height = size
    x0, y0, x1, y1 = x, y, x + w, y + h
    mapped = {
        2: (width - x1, y0, width - x0, y1),
        3: (width - x1, height - y1, width - x0, height - y0),
        4: (x0, height - y1, x1, height - y0),
        5: (y0, x0, y1, x1),
        6: (height - y1, x0, height - y0, x1),
        7: (height - y1, width - x1, height - y0, width - x0),
        8: (y0, width - x1, y1, width - x0),
    }.get(orientation, (x0, y0, x1, y1))
    return mapped[0], mapped[1], mapped[2] - mapped[0], mapped[3] - mapped[1]


def _scale_box(box: Box, sx: float, sy: float) -> Box:
    x, y, w, h = box
    return x * sx, y * sy, w * sx, h * sy


def _crop(image: Image.Image, box: Box) -> tuple[Image.Image, Box]:
    x, y, w, h = box
    left = max(0, math.floor(x - BBOX_MARGIN * w))
    top = max(0, math.floor(y - BBOX_MARGIN * h))
    right = min(image.width, math.ceil(x + w + BBOX_MARGIN * w))
    bottom = min(image.height, math.ceil(y + h + BBOX_MARGIN * h))
    if right <= left or bottom <= top:
        raise BadImage(f"bounding box {box} lies outside the {image.width}x{image.height} image")
    return image.crop((left, top, right, bottom)), _clip((x - left, y - top, w, h), right - left, bottom - top)


def _clip(box: Box, width: int, height: int) -> Box:
    x0, y0 = max(0.0, box[0]), max(0.0, box[1])
    x1, y1 = min(float(width), box[0] + box[2]), min(float(height), box[1] + box[3])
    return x0, y0, max(0.0, x1 - x0), max(0.0, y1 - y0)


def _resize_short(image: Image.Image, box: Box, short: int) -> tuple[Image.Image, Box]:
    """Downscale so the short side is `short`; smaller images keep their size (upscaling adds no detail)."""
    width, height = image.size
    if min(width, height) <= short:
        return image, box
    scale = short / min(width, height)
    size = (short, round(height * scale)) if width <= height else (round(width * scale), short)
    resized = image.resize(size, Image.Resampling.BICUBIC)
    return resized, _scale_box(box, size[0] / width, size[1] / height)
