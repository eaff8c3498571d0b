"""The one sample check, and decoding: `verify` and the train stream reject a sample for the same reason.

A raw sample, as read from a tar, is a mapping of member suffix -> payload (keys starting with "__",
webdataset's `__key__` and `__url__`, are not members). `sample_problem` is cheap (member names, label, image
header: no pixels), so the train stream can run it on samples it skips when resuming; `decode_sample` adds the
full decode and returns a `Sample`, which is what the train stream feeds to augmentation and what `verify`
requires of every sample. With `with_meta` it also parses the JSON record, and `record_problem` is verify's
own further check of it (the train stream reads no JSON).
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image

from pipeline.errors import one_line
from pipeline.shardformat.schema import IMAGE, LABEL, META, Sample, is_refused

log = logging.getLogger(__name__)
# PIL names the in-memory file it could not identify by its repr, address included: dropped, so the same
# bytes always give the same reason.
_OBJECT_REPR = re.compile(r" ?<[^<>]* object at 0x[0-9a-fA-F]+>")


class CorruptSample(Exception):
    """One sample cannot be used (undecodable image, bad label, refused member); the message is the reason."""


def sample_problem(sample: Mapping[str, Any], num_classes: int) -> str | None:
    """Why a sample is unusable, from what is cheap to check (no image decoding); None if usable."""
    members = [name for name in sample if not name.startswith("__")]
    refused = [name for name in members if is_refused(name)]
    if refused:
        return f"pickle member .{refused[0]} refused (never unpickled)"
    if IMAGE not in sample or LABEL not in sample:
        return f"needs {IMAGE} and {LABEL}, has {sorted(members)}"
    try:
        label = int(sample[LABEL])
    except ValueError:
        return f"{LABEL} {sample[LABEL][:20]!r} is not an integer"
    if not 0 <= label < num_classes:
        return f"{LABEL} {label} out of range 0..{num_classes - 1}"
    return _header_problem(sample[IMAGE])


def record_problem(sample: Sample, split: str) -> str | None:
    """Why a decoded sample's record (read `with_meta`) disagrees with its label or with the split of the
    shard holding it (a sample copied from another split); None if it agrees."""
    record = sample.meta or {}
    if record.get("split") != split:
        return f"{META} says split {record.get('split')!r}, but the sample is in a {split} shard"
    if record.get("class_index") != sample.label:
        return f"{META} says class_index {record.get('class_index')!r}, {LABEL} says {sample.label}"
    return None


def decode_sample(raw: Mapping[str, Any], num_classes: int, decode: Callable[[bytes], Any] | None = None, *,
                  with_meta: bool = False) -> Sample:
    """The `Sample` of a usable raw sample, its image decoded (HWC uint8 RGB; `decode` replaces decode_rgb:
    the train stream's decodes at the size its augmentation needs); CorruptSample naming the first problem
    otherwise. `with_meta`: the JSON record too, which must then be there and be a JSON object."""
    problem = sample_problem(raw, num_classes)
    if problem is not None:
        raise CorruptSample(problem)
    try:
        image = (decode or decode_rgb)(raw[IMAGE])
    except MemoryError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise CorruptSample(_undecodable(e)) from None
    return Sample(raw["__key__"], int(raw[LABEL]), image, _record(raw) if with_meta else None)


def _record(raw: Mapping[str, Any]) -> dict[str, Any]:
    if META not in raw:
        raise CorruptSample(f"needs {META}, has {sorted(name for name in raw if not name.startswith('__'))}")
    try:
        record = json.loads(raw[META])
    except ValueError as e:  # UnicodeDecodeError included
        raise CorruptSample(f"{META} is not JSON ({one_line(e)})") from None
    if not isinstance(record, dict):
        raise CorruptSample(f"{META} is not a JSON object")
    return record


def decode_rgb(data: bytes, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """simplejpeg (libjpeg-turbo, fast) for JPEGs; PIL for anything else or what simplejpeg refuses. With
    `min_size` (height, width), a JPEG is decoded at the smallest DCT scaling at least that large (PIL
    always decodes the full size)."""
    if simplejpeg.is_jpeg(data):
        height, width = min_size or (0, 0)
        try:
            # fastdct / fastupsample: faster, with differences far below augmentation noise
            return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True,
                                          min_height=height, min_width=width)
        except ValueError as e:
            log.debug("simplejpeg failed (%s); trying PIL", e)
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _header_problem(data: bytes) -> str | None:
    """None if the image's header parses (simplejpeg for JPEGs, else PIL), the reason otherwise."""
    if simplejpeg.is_jpeg(data):
        try:
            simplejpeg.decode_jpeg_header(data)
            return None
        except ValueError:
            pass  # PIL may still read it, as decode_rgb then does
    try:
        with Image.open(io.BytesIO(data)):
            return None
    except MemoryError:
        raise
    except Exception as e:  # PIL raises many types for garbage input
        return _undecodable(e)


def _undecodable(error: Exception) -> str:
    return f"{IMAGE} does not decode ({_OBJECT_REPR.sub('', one_line(error, typed=True))})"
