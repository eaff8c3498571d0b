"""The sample schema: a sample is consecutive tar members `<key>.<suffix>` sharing one key, in a fixed order."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

LABEL = "cls"  # the 0-based class index, ASCII digits
IMAGE = "jpg"  # RGB JPEG bytes
META = "json"  # the sample's record (strict JSON, sorted keys)
MEMBER_ORDER = (LABEL, IMAGE, META)  # the order a sample's members are written in
# Suffixes of members that unpickle when read by a generic decoder: never read, a sample carrying one is refused.
REFUSED_SUFFIXES = (".pyd", ".pth", ".pickle", ".pkl")
SHARD_SUFFIX = ".tar"
SHARD_GLOB = f"*{SHARD_SUFFIX}"  # matches every shard file of a set


def sample_members(key: str, label: int, image: bytes, meta: Mapping[str, Any]) -> tuple[tuple[str, bytes], ...]:
    """The (name, payload) tar members of one sample, in MEMBER_ORDER. `meta` is written as strict JSON:
    a NaN or infinity in it raises ValueError instead of writing what JSON readers refuse."""
    payloads = {LABEL: str(label).encode(), IMAGE: image,
                META: json.dumps(meta, sort_keys=True, allow_nan=False).encode()}
    return tuple((f"{key}.{suffix}", payloads[suffix]) for suffix in MEMBER_ORDER)


def split_name(name: str) -> tuple[str, str]:
    """(key, suffix) of a member name: the suffix is everything after the first dot."""
    key, _, suffix = name.partition(".")
    return key, suffix


def is_refused(suffix: str) -> bool:
    return f".{suffix}".endswith(REFUSED_SUFFIXES)


def shard_name(split: str, index: int) -> str:
    """`train-000003.tar`: shards sort by split, then by their place in the split."""
    return f"{split}-{index:06d}{SHARD_SUFFIX}"
