"""Decoding at the size the augmentation needs (train/decode.py): a large JPEG is decoded at 1/2..1/8 of its
size when the first step shrinks it by 2x or more; the crop boxes and every random draw stay those of the
full-decode path, and the images stay within a small tolerance of it."""

from __future__ import annotations

import numpy as np
import pytest
import simplejpeg

from pipeline.shardformat.check import decode_rgb
from train.augment import Augment, sample_seed, train_transform
from train.data.stages import decoded
from train.decode import first_crop_box

SIZE = 64


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    """A 480 x 640 photo-like JPEG: smooth gradients, a few shapes, no left-right symmetry."""
    h, w = 480, 640
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.stack([xx / w * 200 + 30, yy / h * 180 + 40, 120 + 80 * np.sin(xx / 37) * np.cos(yy / 53)], 2)
    image[100:260, 80:300] = (220, 60, 40)
    image[300:420, 400:560] = (30, 90, 200)
    return simplejpeg.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), quality=95)


def full_path(augment: Augment, data: bytes, seed: int) -> np.ndarray:
    return augment(decode_rgb(data), seed)


def scaled_path(augment: Augment, data: bytes, seed: int) -> np.ndarray:
    image, source = augment.decode(data, seed)
    return augment(image, seed, source)


def test_a_large_image_is_decoded_smaller_for_a_small_crop(jpeg: bytes) -> None:
    augment = Augment(train_transform("standard", SIZE))
    shapes = {augment.decode(jpeg, seed)[0].shape[:2] for seed in range(20)}
    assert shapes <= {(240, 320), (120, 160), (60, 80)} and len(shapes) >= 1
    assert all(augment.decode(jpeg, seed)[1] == (480, 640) for seed in range(5))
    big = Augment(train_transform("standard", 400))  # a crop that barely shrinks: full size
    assert {big.decode(jpeg, seed)[1] for seed in range(20)} == {None}


def test_the_crop_boxes_are_those_of_the_full_decode(jpeg: bytes) -> None:
    full, scaled = Augment(train_transform("standard", SIZE)), Augment(train_transform("standard", SIZE))
    for seed in range(40):
        full_path(full, jpeg, seed)
        image, source = scaled.decode(jpeg, seed)
        scaled(image, seed, source)
        x1, y1, x2, y2 = full.transform.transforms[0].params["crop_coords"]
        scaled.reseed(seed)  # the box drawn before decoding, to choose the scale, is the same one
        assert first_crop_box(scaled.transform, (480, 640)) == (x1, y1, x2, y2)
        fy, fx = image.shape[0] / 480, image.shape[1] / 640
        got = scaled.transform.transforms[0].params["crop_coords"]
        assert got == (round(x1 * fx), round(y1 * fy), round(x2 * fx), round(y2 * fy)), seed
        for step in (1, 2):  # the flip and the colour jitter: the same draws
            assert full.transform.transforms[step].params.keys() == scaled.transform.transforms[step].params.keys()


@pytest.mark.parametrize("preset", ["standard", "notebook", "none"])
def test_outputs_are_within_a_small_tolerance_of_the_full_decode(jpeg: bytes, preset: str) -> None:
    full, scaled = Augment(train_transform(preset, SIZE)), Augment(train_transform(preset, SIZE))
    for seed in range(30):
        a = full_path(full, jpeg, seed).astype(np.int16)
        b = scaled_path(scaled, jpeg, seed).astype(np.int16)
        assert a.shape == b.shape == (SIZE, SIZE, 3)
        assert np.abs(a - b).mean() < 4.0, (preset, seed, np.abs(a - b).mean())


def test_the_stream_decodes_scaled_and_stays_deterministic(jpeg: bytes) -> None:
    samples = [{"__key__": f"k{i}", "__url__": "mem", "cls": b"1", "jpg": jpeg} for i in range(6)]
    augment = Augment(train_transform("standard", SIZE))
    first = [sample.image.tobytes() for sample in decoded(samples, augment, 3, seed=5, epoch=1)]
    again = [sample.image.tobytes() for sample in decoded(samples, Augment(train_transform("standard", SIZE)), 3,
                                                         seed=5, epoch=1)]
    assert first == again
    full = Augment(train_transform("standard", SIZE))
    plain = [full_path(full, jpeg, sample_seed(5, 1, f"k{i}")) for i in range(6)]
    for ours, theirs in zip(first, plain, strict=True):
        diff = np.abs(np.frombuffer(ours, np.uint8).astype(np.int16) - theirs.reshape(-1).astype(np.int16))
        assert diff.mean() < 4.0
