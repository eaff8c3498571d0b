"""Split assignment: official test set exactly, stratified seeded valid, seeded order."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipeline.sources import Settings
from pipeline.sources import cub as cub_layout
from pipeline.splits import assign_splits, num_valid


def test_splits(cub_source: Path) -> None:
    records = cub_layout.read(cub_source / "CUB_200_2011", Settings()).records
    splits = assign_splits(records, valid_fraction=0.25, seed=0)
    ids = {name: [r.image_id for r in rs] for name, rs in splits.items()}

    assert set(ids["test"]) == {r.image_id for r in records if r.split == "test"}
    assert sorted(ids["train"] + ids["valid"] + ids["test"]) == [r.image_id for r in records]

    official_train = Counter(r.label for r in records if r.split == "train")
    valid = Counter(r.label for r in splits["valid"])
    for label, count in official_train.items():
        assert valid[label] == num_valid(count, 0.25) >= 1  # stratified: every class, its share

    assert ids["train"] != sorted(ids["train"])  # shuffled, not in id order
    assert assign_splits(records, 0.25, seed=0) == splits
    assert {r.image_id for r in assign_splits(records, 0.25, seed=1)["valid"]} != set(ids["valid"])


def test_num_valid_bounds() -> None:
    assert num_valid(30, 0.1) == 3
    assert num_valid(5, 0.1) == 1  # at least one per class
    assert num_valid(2, 0.9) == 1  # never the whole class
    assert num_valid(1, 0.5) == 0
    assert num_valid(30, 0.0) == 0
