"""Train / valid / test assignment: test is CUB's official test set; valid is a stratified seeded fraction."""

from __future__ import annotations

import hashlib
from collections import defaultdict

from pipeline.cub import Record


def _rank(seed: int, purpose: str, image_id: int) -> bytes:
    """A seeded, platform-independent sort key (no RNG library whose stream could change between versions)."""
    return hashlib.sha256(f"{seed}:{purpose}:{image_id}".encode()).digest()


def num_valid(num_train_images: int, fraction: float) -> int:
    """Valid images for one class: rounded share, at least one when possible, never the whole class."""
    if fraction <= 0 or num_train_images < 2:
        return 0
    return min(max(1, round(num_train_images * fraction)), num_train_images - 1)


def assign_splits(records: list[Record], valid_fraction: float, seed: int) -> dict[str, list[Record]]:
    """Split records and shuffle each split (seeded) so every shard mixes classes."""
    by_class: dict[int, list[Record]] = defaultdict(list)
    for record in records:
        if record.is_train:
            by_class[record.label].append(record)
    valid_ids: set[int] = set()
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda r: _rank(seed, "valid", r.image_id))
        valid_ids.update(r.image_id for r in members[: num_valid(len(members), valid_fraction)])

    splits: dict[str, list[Record]] = {"train": [], "valid": [], "test": []}
    for record in records:
        name = "test" if not record.is_train else "valid" if record.image_id in valid_ids else "train"
        splits[name].append(record)
    return {name: sorted(rs, key=lambda r: _rank(seed, f"order-{name}", r.image_id)) for name, rs in splits.items()}
