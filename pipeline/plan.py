"""What a build writes: the options that change shard bytes, and the plan (which samples go into which
shard, which shards into which job)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import manifest as mf
from pipeline.encode import EncodeOptions
from pipeline.errors import UserError
from pipeline.shardformat.schema import shard_name
from pipeline.sources.base import Record

DEFAULT_SHARD_SAMPLES = 160  # CUB's train split (~5,400 images) gets at least 32 shards


@dataclass(frozen=True)
class BuildOptions:
    """Every option that changes shard bytes; recorded in the manifest and compared on re-runs."""

    valid_fraction: float = 0.1
    seed: int = 0
    resize_short: int = 256
    crop_bbox: bool = False
    quality: int = 95
    shard_samples: int = DEFAULT_SHARD_SAMPLES

    def __post_init__(self) -> None:
        if not 0 <= self.valid_fraction < 1:
            raise UserError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")
        if self.resize_short < 0:
            raise UserError(f"--resize-short must be >= 0, got {self.resize_short}")
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality must be in 1..100, got {self.quality}")
        if self.shard_samples < 1:
            raise UserError(f"--shard-samples must be >= 1, got {self.shard_samples}")

    @property
    def encode(self) -> EncodeOptions:
        return EncodeOptions(self.resize_short, self.crop_bbox, self.quality)


@dataclass(frozen=True)
class ShardPlan:
    split: str
    name: str
    records: tuple[Record, ...]


def plan_shards(splits: dict[str, list[Record]], shard_samples: int) -> list[ShardPlan]:
    """Each split's records, in order, cut into shards of `shard_samples` (the last one may be shorter)."""
    plan = []
    for split in mf.SPLITS:
        records = splits[split]
        for index, start in enumerate(range(0, len(records), shard_samples)):
            plan.append(ShardPlan(split, shard_name(split, index), tuple(records[start:start + shard_samples])))
    return plan


def job_shards(plan: list[ShardPlan], num_jobs: int, job_index: int) -> list[ShardPlan]:
    """Round-robin over the whole plan, so every job gets a similar amount of work."""
    return plan[job_index::num_jobs]
