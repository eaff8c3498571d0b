"""Encoding: every mode to RGB JPEG, original bytes kept when possible, boxes follow crops and resizes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.encode import BadImage, EncodeOptions, encode_image, transpose_box


def _image_bytes(mode: str, size: tuple[int, int] = (300, 200), fmt: str = "JPEG", **save: object) -> bytes:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    out = io.BytesIO()
    rgb.convert(mode).save(out, fmt, **save)
    return out.getvalue()


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"),
                                      ("P", "PNG"), ("LA", "PNG")])
def test_every_mode_becomes_rgb_jpeg(mode: str, fmt: str) -> None:
    encoded = encode_image(_image_bytes(mode, fmt=fmt), (10, 10, 50, 50), EncodeOptions(resize_short=0))
    image = _decode(encoded.jpeg)
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (300, 200))


def test_rgb_jpeg_bytes_kept_when_not_resizing() -> None:
    data = _image_bytes("RGB")
    assert encode_image(data, (0, 0, 5, 5), EncodeOptions(resize_short=0)).jpeg == data
    assert encode_image(data, (0, 0, 5, 5), EncodeOptions(resize_short=100)).jpeg != data


def test_resize_short_side_scales_box() -> None:
    encoded = encode_image(_image_bytes("RGB", (400, 300)), (40, 30, 200, 150), EncodeOptions(resize_short=150))
    assert encoded.original_size == (400, 300)
    assert encoded.size == (200, 150) == _decode(encoded.jpeg).size
    assert encoded.bbox == pytest.approx((20, 15, 100, 75))


def test_small_images_are_not_upscaled() -> None:
    encoded = encode_image(_image_bytes("RGB", (120, 90)), (0, 0, 10, 10), EncodeOptions(resize_short=256))
    assert encoded.size == (120, 90)


def test_crop_bbox_with_margin() -> None:
    encoded = encode_image(_image_bytes("RGB", (400, 300)), (100, 100, 100, 50),
                           EncodeOptions(resize_short=0, crop_bbox=True))
    assert encoded.size == (120, 60)  # 10% margin each side
    assert encoded.bbox == pytest.approx((10, 5, 100, 50))


def test_deterministic() -> None:
    data = _image_bytes("CMYK")
    options = EncodeOptions(resize_short=128, crop_bbox=True, quality=90)
    assert encode_image(data, (5, 5, 100, 100), options) == encode_image(data, (5, 5, 100, 100), options)


def test_truncated_and_garbage_are_bad() -> None:
    data = _image_bytes("RGB")
    with pytest.raises(BadImage, match="cannot decode"):
        encode_image(data[: len(data) // 2], (0, 0, 5, 5), EncodeOptions(resize_short=0))
    with pytest.raises(BadImage, match="not an image"):
        encode_image(b"definitely not a jpeg", (0, 0, 5, 5), EncodeOptions())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_moves_the_box(orientation: int) -> None:
    """Draw the box white on black, let PIL apply the orientation, find the white box again."""
    size, box = (200, 120), (30, 20, 60, 40)
    canvas = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    canvas[box[1]:box[1] + box[3], box[0]:box[0] + box[2]] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(canvas).save(out, "PNG", exif=exif)
    encoded = encode_image(out.getvalue(), box, EncodeOptions(resize_short=0))
    found = _decode(encoded.jpeg).convert("L").point(lambda v: 255 if v > 128 else 0).getbbox()
    x, y, w, h = transpose_box(box, size, orientation)
    assert encoded.bbox == pytest.approx((x, y, w, h))
    assert found == pytest.approx((x, y, x + w, y + h), abs=1)


def _png_with_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _image_bytes("RGB", fmt="PNG", exif=exif)


@pytest.mark.parametrize("options", [EncodeOptions(resize_short=0), EncodeOptions(resize_short=64),
                                     EncodeOptions(resize_short=64, crop_bbox=True)], ids=["keep", "resize", "crop"])
@pytest.mark.parametrize("make", [lambda: _image_bytes("RGB", fmt="PNG"), _png_with_exif], ids=["png", "png-exif"])
def test_truncated_png_is_bad_whichever_step_reads_it(make, options: EncodeOptions) -> None:
    """PIL reads PNG metadata lazily: a cut PNG fails in the EXIF lookup, before any pixel is decoded."""
    data = make()
    for cut in (60, 100, len(data) // 2):
        with pytest.raises(BadImage, match="cannot decode|not an image"):
            encode_image(data[:cut], (10, 10, 50, 50), options)
