"""Train / valid / test assignment: test is the source's own test set; valid is a stratified seeded fraction
of its train set, unless the source has its own valid set."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable
from typing import TYPE_CHECKING

from pipeline.seeded import seeded_digest

if TYPE_CHECKING:  # only a type here: pipeline.sources imports this module
    from pipeline.sources.base import Record


def num_valid(num_train_images: int, fraction: float) -> int:
    """Images taken from one class: rounded share, at least one when possible, never the whole class."""
    if fraction <= 0 or num_train_images < 2:
        return 0
    return min(max(1, round(num_train_images * fraction)), num_train_images - 1)


def carve(ids_by_class: dict[Hashable, list[int | str]], fraction: float, seed: int, purpose: str) -> set[int | str]:
    """The ids taken out of each class (num_valid of them), chosen by a seeded hash of (purpose, id)."""
    taken: set[int | str] = set()
    for label in sorted(ids_by_class):
        members = sorted(ids_by_class[label], key=lambda image_id: seeded_digest(seed, purpose, image_id))
        taken.update(members[: num_valid(len(members), fraction)])
    return taken


def assign_splits(records: list[Record], valid_fraction: float, seed: int) -> dict[str, list[Record]]:
    """Split records and shuffle each split (seeded) so every shard mixes classes. A source with its own
    valid records keeps them and nothing is carved from train."""
    valid_ids: set[int | str] = set()
    if not any(r.split == "valid" for r in records):
        by_class: dict[int, list[int | str]] = defaultdict(list)
        for record in records:
            if record.split == "train":
                by_class[record.label].append(record.image_id)
        valid_ids = carve(by_class, valid_fraction, seed, "valid")

    splits: dict[str, list[Record]] = {"train": [], "valid": [], "test": []}
    for record in records:
        splits["valid" if record.image_id in valid_ids else record.split].append(record)
    return {name: sorted(rs, key=lambda r: seeded_digest(seed, f"order-{name}", r.image_id)) for name, rs in splits.items()}
