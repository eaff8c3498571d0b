"""pipeline.seeded: the one seeded-hash generator gives the splits, the augmentation seeds and the stream
shuffles exactly the values they had (built sets and resumed runs depend on them)."""

from __future__ import annotations

import random

from pipeline.seeded import seeded_digest, seeded_int, seeded_random
from train.augment import sample_seed


def test_values_are_pinned() -> None:
    assert seeded_digest(0, "valid", 17).hex()[:16] == "60b2c50211931c60"
    assert sample_seed(3, 1, "00042") == seeded_int(3, 1, "00042", bits=32) == 595219809
    order = list(range(8))
    seeded_random("shards", 0, 2).shuffle(order)
    assert order == [2, 0, 4, 3, 7, 6, 5, 1]


def test_bits_and_generator_agree() -> None:
    parts = ("buffer", 5, 0, "chunk-1")
    assert seeded_int(*parts) == int.from_bytes(seeded_digest(*parts)[:8], "little")
    assert seeded_int(*parts, bits=32) == seeded_int(*parts) & 0xFFFFFFFF
    assert seeded_random(*parts).random() == random.Random(seeded_int(*parts)).random()


def test_non_utf8_ids_hash_without_error() -> None:
    """ImageFolder ids are paths, which may hold undecodable bytes (surrogate escapes)."""
    assert len(seeded_digest(0, "order-train", "caf\udce9.jpg")) == 32
