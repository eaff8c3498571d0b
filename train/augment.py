"""Albumentations presets and a deterministic, picklable augmentation callable.

Workers decode and augment uint8 images and hand uint8 batches to the main process; normalization to
float happens on the device (`normalize`), which keeps worker-to-main traffic at 1 byte per value
(float32 would be 4 bytes, ~600 KB a 224-px image). Images stay HWC (OpenCV's layout) to the end: a batch is NHWC memory viewed as NCHW, which is
exactly the channels_last layout the model runs in, so no worker ever transposes pixels.

Determinism: `Augment(image, seed)` is a pure function of (image, seed). Albumentations 2.x gives every
transform its own `random_generator` (numpy) and `py_random` (python) attributes; `Compose.set_random_seed`
would seed each transform's generators with the *same* seed, so every transform would see the same first
draws (flip and colour jitter, both p=0.5, would always happen together). Instead one pair of generators is
shared across the whole pipeline (`Compose.set_random_state`) and re-seeded from the seed on every call, so
the draws are sequential, independent of earlier calls, and identical in any process. The numpy generator
gets its PCG64 state straight from splitmix64 of the seed: seeding it through numpy's SeedSequence costs
several times more per image (bench/micro.py measures both).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import albumentations as A
import cv2
import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.seeded import seeded_int
from pipeline.shardformat.check import decode_rgb
from train import decode as scaled

# OpenCV's thread pool does not survive fork(): a DataLoader worker forked after this process ran a
# multi-threaded cv2 call can hang on its first cv2 call. Parallelism comes from loader workers instead.
cv2.setNumThreads(1)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Resize filters by the names models' metadata uses (timm's pretrained_cfg, torchvision's InterpolationMode).
INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST,
                  "area": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4}


def eval_transform(image_size: int, crop_pct: float = 0.875, interpolation: str = "bilinear") -> A.Compose:
    """Resize the short side to round(image_size / crop_pct) with `interpolation`, then centre-crop
    image_size x image_size."""
    _check_size(image_size)
    if not 0.0 < crop_pct <= 1.0:
        raise UserError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"interpolation {interpolation!r}: choose from {', '.join(INTERPOLATIONS)}")
    resize_to = round(image_size / crop_pct)
    return A.Compose(
        [A.SmallestMaxSize(max_size=resize_to, interpolation=INTERPOLATIONS[interpolation]),
         A.CenterCrop(height=image_size, width=image_size)],
        seed=0,
    )


def train_transform(preset: str, image_size: int, crop_scale: tuple[float, float] = (0.35, 1.0)) -> A.Compose:
    """The training augmentation of `preset`, one of TRAIN_PRESETS."""
    _check_size(image_size)
    if preset not in TRAIN_PRESETS:
        raise UserError(f"unknown augmentation preset {preset!r}; valid presets: {', '.join(TRAIN_PRESETS)}")
    return TRAIN_PRESETS[preset](image_size, crop_scale)


def _standard(size: int, crop_scale: tuple[float, float]) -> A.Compose:
    low, high = crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise UserError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
    return A.Compose(
        [
            scaled.SourceRandomResizedCrop(size=(size, size), scale=(low, high)),  # a RandomResizedCrop
            A.HorizontalFlip(p=0.5),
            # Brightness and saturation only. No hue: colour tells bird species apart (and hue was a large
            # share of the stream). No contrast: ColorJitter converts every image to gray for its mean
            # (bench/micro.py measures that cost).
            A.ColorJitter(brightness=0.2, contrast=0.0, saturation=0.2, hue=0.0, p=0.5),
        ],
        seed=0,
    )


def _notebook(size: int, crop_scale: tuple[float, float]) -> A.Compose:
    """The classic CUB notebook: squash to size x size, small rotation, flip, padded random crop.

    Borders (rotation corners and padding) are filled with black, as torchvision's RandomRotation and
    RandomCrop(padding=...) do.
    """
    padded = size + 2 * (size // 8)
    return A.Compose(
        [
            A.Resize(height=size, width=size),
            A.Rotate(limit=5, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0),
            A.HorizontalFlip(p=0.5),
            A.PadIfNeeded(min_height=padded, min_width=padded, border_mode=cv2.BORDER_CONSTANT, fill=0),
            A.RandomCrop(height=size, width=size),
        ],
        seed=0,
    )


def _none(size: int, crop_scale: tuple[float, float]) -> A.Compose:
    """No augmentation: the eval transform."""
    return eval_transform(size)


# The presets by name (`--augment`): each builds a uint8 HWC -> size x size pipeline from (size, crop_scale).
TRAIN_PRESETS: dict[str, Callable[[int, tuple[float, float]], A.Compose]] = {
    "standard": _standard,
    "notebook": _notebook,
    "none": _none,
}


def _check_size(image_size: int) -> None:
    if image_size < 1:
        raise UserError(f"image_size must be a positive integer, got {image_size}")


class Augment:
    """Picklable callable: (HWC or HW uint8 image, seed) -> HWC uint8 RGB contiguous array.

    Not thread-safe (it re-seeds the shared transform on every call); DataLoader workers are processes,
    each with its own copy.
    """

    def __init__(self, transform: A.Compose) -> None:
        self.transform = transform
        self.numpy_random = np.random.Generator(np.random.PCG64())
        self.py_random = random.Random()

    def __call__(self, image: np.ndarray, seed: int, source_shape: tuple[int, int] | None = None) -> np.ndarray:
        """`source_shape`: the full size of an image `decode` gave at a smaller scale (None: it is full size)."""
        image = _as_rgb_uint8(image)
        self.reseed(seed)
        crop = self._source_crop()
        if crop is None:
            return np.ascontiguousarray(self.transform(image=image)["image"])
        crop.source_shape = source_shape
        try:
            return np.ascontiguousarray(self.transform(image=image)["image"])
        finally:
            crop.source_shape = None

    def decode(self, data: bytes, seed: int) -> tuple[np.ndarray, tuple[int, int] | None]:
        """The image in `data` decoded at the smallest DCT scaling that this pipeline's first step, for
        `seed`, shrinks no further than to its output (train.decode), and its full size for __call__'s
        `source_shape` (None when decoded at full size)."""
        shape = scaled.jpeg_shape(data)
        factor = 1 if shape is None else self._factor(shape, seed)
        if factor == 1:
            return decode_rgb(data), None
        return scaled.decode_scaled(data, shape, factor), shape

    def _factor(self, shape: tuple[int, int], seed: int) -> int:
        known = scaled.region_and_target(self.transform, shape)
        if known is not None:
            return scaled.scale_factor(*known)
        crop = self._source_crop()
        if crop is None or scaled.scale_factor(shape, tuple(crop.size)) == 1:
            return 1  # not even a crop of the whole image would shrink 2x: no need to draw the box
        self.reseed(seed)
        x1, y1, x2, y2 = scaled.first_crop_box(self.transform, shape)
        return scaled.scale_factor((y2 - y1, x2 - x1), tuple(crop.size))

    def _source_crop(self) -> scaled.SourceRandomResizedCrop | None:
        first = self.transform.transforms[0]
        return first if isinstance(first, scaled.SourceRandomResizedCrop) else None

    def reseed(self, seed: int) -> None:
        """Put the pipeline's generators in the state a call with `seed` starts from."""
        if self.transform.py_random is not self.py_random:  # first call, or another Augment shares the Compose
            self.transform.set_random_state(self.numpy_random, self.py_random)
        self.py_random.seed(seed)
        self.numpy_random.bit_generator.state = pcg64_state(seed)


def run_eval_transform(meta: dict[str, object]) -> Augment:
    """The eval transform a run recorded in its meta.json (eval size, crop, resize filter); runs saved before
    the eval size was recorded scored at the train size, before the filter was recorded resized bilinear."""
    return Augment(eval_transform(eval_size(meta), meta["crop_pct"], meta.get("interpolation", "bilinear")))


def eval_size(meta: dict[str, object]) -> int:
    """The eval crop a run's meta records (the train size for runs saved before it was recorded)."""
    return meta.get("eval_image_size") or meta["image_size"]


MASK64 = (1 << 64) - 1


def pcg64_state(seed: int) -> dict[str, object]:
    """numpy's PCG64 state dict (128-bit state, odd increment) from four splitmix64 outputs of `seed`."""
    x, words = seed & MASK64, []
    for _ in range(4):
        x = (x + 0x9E3779B97F4A7C15) & MASK64
        z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        words.append(z ^ (z >> 31))
    return {"bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0,
            "state": {"state": words[0] << 64 | words[1], "inc": words[2] << 64 | words[3] | 1}}


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Grayscale (H, W) or (H, W, 1) -> (H, W, 3); RGBA -> RGB; anything but uint8 is refused."""
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HW, HWC (C in 1, 3, 4) image, got shape {image.shape}")
    if image.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    if image.shape[2] == 4:
        return np.ascontiguousarray(image[:, :, :3])
    return image


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """A 32-bit seed from (run seed, epoch, sample key), stable across processes and Python runs.

    sha256 rather than hash(): str hashes are salted per process (PYTHONHASHSEED).
    """
    return seeded_int(seed, epoch, key, bits=32)


Stats = tuple[float, float, float] | list[float]


def _stats(images: torch.Tensor, mean: Stats, std: Stats) -> tuple[torch.Tensor, torch.Tensor]:
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return mean_t, std_t


def normalize(images: torch.Tensor, mean: Stats = IMAGENET_MEAN, std: Stats = IMAGENET_STD) -> torch.Tensor:
    """uint8 NCHW batch (any memory format) -> float32 (x / 255 - mean) / std, channels_last, computed on
    images.device. `predict` passes the statistics stored in the checkpoint."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a uint8 N x 3 x H x W batch, got {images.dtype} {tuple(images.shape)}")
    mean, std = _stats(images, mean, std)
    x = images.to(dtype=torch.float32, memory_format=torch.channels_last)
    return x.div_(255.0).sub_(mean).div_(std)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalize` with ImageNet statistics: float NCHW -> float32 in [0, 1] (for plotting)."""
    mean, std = _stats(images, IMAGENET_MEAN, IMAGENET_STD)
    return (images.float() * std + mean).clamp_(0.0, 1.0)
