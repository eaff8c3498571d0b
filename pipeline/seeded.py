"""Seeded hashes: sort keys, seeds and generators derived from (seed, purpose, ...) by sha256, the same in
every process, on every platform and Python version (str's hash() is salted per process, and no RNG library's
stream is involved, whose algorithm could change between versions)."""

from __future__ import annotations

import hashlib
import random


def seeded_digest(*parts: object) -> bytes:
    """sha256 of the parts written as text and joined by ":" (a seeded, platform-independent sort key)."""
    return hashlib.sha256(":".join(map(str, parts)).encode("utf-8", "surrogateescape")).digest()


def seeded_int(*parts: object, bits: int = 64) -> int:
    """The first `bits` (a multiple of 8) of seeded_digest(*parts) as an unsigned little-endian integer."""
    return int.from_bytes(seeded_digest(*parts)[: bits // 8], "little")


def seeded_random(*parts: object) -> random.Random:
    """A random generator seeded from `parts`, identical in every process."""
    return random.Random(seeded_int(*parts))
