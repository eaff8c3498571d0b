"""The sample schema: a sample is consecutive tar members `<key>.<suffix>` sharing one key, in a fixed order;
`Sample` is what the members hold, as the writer produces it and decoding returns it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

LABEL = "cls"  # the 0-based class index, ASCII digits
IMAGE = "jpg"  # RGB JPEG bytes
META = "json"  # the sample's record (strict JSON, sorted keys)
MEMBER_ORDER = (LABEL, IMAGE, META)  # the order a sample's members are written in
# Suffixes of members that unpickle when read by a generic decoder: never read, a sample carrying one is refused.
REFUSED_SUFFIXES = (".pyd", ".pth", ".pickle", ".pkl")
SHARD_SUFFIX = ".tar"
SHARD_GLOB = f"*{SHARD_SUFFIX}"  # matches every shard file of a set


@dataclass(slots=True)
class Sample:
    """One sample. The writer builds it with the JPEG bytes as `image` and the record as `meta`, and writes
    `members()`; `check.decode_sample` returns it with `image` decoded (what its `decode` gave: an HWC uint8
    RGB array by default) and `meta` only when asked for (the train stream never parses the JSON). The train
    stream then replaces `image` by its augmented pixels in place: no copy per sample."""

    key: str  # unique in the set; never a dot or a slash (member names split at the first dot)
    label: int  # 0-based class index
    image: Any  # JPEG bytes as stored, or the decoded image
    meta: dict[str, Any] | None = None  # the sample's record (strict JSON, sorted keys)

    def members(self) -> tuple[tuple[str, bytes], ...]:
        """The (name, payload) tar members, in MEMBER_ORDER. `meta` is written as strict JSON: a NaN or
        infinity in it raises ValueError instead of writing what JSON readers refuse."""
        payloads = {LABEL: str(self.label).encode(), IMAGE: self.image,
                    META: json.dumps(self.meta, sort_keys=True, allow_nan=False).encode()}
        return tuple((f"{self.key}.{suffix}", payloads[suffix]) for suffix in MEMBER_ORDER)


def split_name(name: str) -> tuple[str, str]:
    """(key, suffix) of a member name: the suffix is everything after the first dot."""
    key, _, suffix = name.partition(".")
    return key, suffix


def is_refused(suffix: str) -> bool:
    return f".{suffix}".endswith(REFUSED_SUFFIXES)


def shard_name(split: str, index: int) -> str:
    """`train-000003.tar`: shards sort by split, then by their place in the split."""
    return f"{split}-{index:06d}{SHARD_SUFFIX}"
