"""Decoding a JPEG at the size its augmentation needs: when the first step of a pipeline shrinks the region it
reads by 2x or more (a random-resized crop of a large image, the eval resize, the notebook's squash), the
image is decoded at 1/2, 1/4 or 1/8 of its size with libjpeg-turbo's DCT scaling (simplejpeg's
`min_height` / `min_width`), which produces and resizes 4-64x fewer pixels.

The augmentation stays the same function of (image, seed): the random-resized crop draws its box on the
original size (`SourceRandomResizedCrop.source_shape`), exactly as on a full decode, and maps it onto the
smaller image; every later draw is unchanged. Only the pixels differ slightly: a DCT-scaled decode averages
blocks where a full decode followed by a linear resize samples them, and the mapped box rounds to whole
pixels of the smaller image (tests/test_decode.py bounds the difference).
"""

from __future__ import annotations

import math
from typing import Any

import albumentations as A
import numpy as np
import simplejpeg

from pipeline.shardformat.check import decode_rgb

FACTORS = (8, 4, 2)  # the DCT scalings libjpeg-turbo does fast (others are slower than a full decode)

Shape = tuple[int, int]


class SourceRandomResizedCrop(A.RandomResizedCrop):
    """RandomResizedCrop whose box is drawn on `source_shape` (the image's size before a scaled decode) and
    mapped onto the image it is given; with `source_shape` None (or equal to the image's) it is
    RandomResizedCrop."""

    source_shape: Shape | None = None

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        shape = tuple(params["shape"][:2])
        source = self.source_shape
        if source is None or source == shape:
            return super().get_params_dependent_on_data(params, data)
        x1, y1, x2, y2 = super().get_params_dependent_on_data({**params, "shape": source}, data)["crop_coords"]
        sy, sx = shape[0] / source[0], shape[1] / source[1]
        left, top = min(round(x1 * sx), shape[1] - 1), min(round(y1 * sy), shape[0] - 1)
        right, bottom = max(min(round(x2 * sx), shape[1]), left + 1), max(min(round(y2 * sy), shape[0]), top + 1)
        return {"crop_coords": (left, top, right, bottom)}


def first_crop_box(transform: A.Compose, shape: Shape) -> tuple[int, int, int, int]:
    """The box the pipeline's first step, a RandomResizedCrop, will draw on an image of `shape`, with its
    generators in the state of the start of a call (the Compose draws once for its own probability first:
    albumentations 2.x). Advances the generators."""
    transform.py_random.random()
    crop = transform.transforms[0]
    return A.RandomResizedCrop.get_params_dependent_on_data(crop, {"shape": shape}, {})["crop_coords"]


def region_and_target(transform: A.Compose, shape: Shape) -> tuple[Shape, Shape] | None:
    """(the region of the image the first step reads, the size it makes of it), for the steps that shrink
    with no random draw; None for a first step that is not one of them (a random crop: `first_crop_box`)."""
    first = transform.transforms[0]
    if isinstance(first, A.Resize):
        return shape, (first.height, first.width)
    if isinstance(first, A.SmallestMaxSize) and isinstance(first.max_size, int):
        short = min(shape)
        return (short, short), (first.max_size, first.max_size)
    return None


def scale_factor(region: Shape, target: Shape) -> int:
    """The largest of FACTORS by which `region` can shrink and still cover `target` (1: none)."""
    for factor in FACTORS:
        if region[0] / factor >= target[0] and region[1] / factor >= target[1]:
            return factor
    return 1


def jpeg_shape(data: bytes) -> Shape | None:
    """(height, width) from a JPEG's header; None for anything else or a header simplejpeg refuses."""
    if not simplejpeg.is_jpeg(data):
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return height, width


def decode_scaled(data: bytes, shape: Shape, factor: int) -> np.ndarray:
    """The RGB image decoded at 1/`factor` of `shape` (libjpeg-turbo's ceil rounding), or at full size."""
    if factor == 1:
        return decode_rgb(data)
    return decode_rgb(data, (math.ceil(shape[0] / factor), math.ceil(shape[1] / factor)))
