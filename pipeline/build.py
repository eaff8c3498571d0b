"""`python -m pipeline build`: read the source, plan the shards, write this job's shards under the build
lock; with one job also merge them into the manifest."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline import buildstate, lock
from pipeline import manifest as mf
from pipeline.errors import UserError
from pipeline.merge import merge_locked
from pipeline.outputs import output_dir_problem
from pipeline.plan import BuildOptions, ShardPlan, job_shards, plan_shards
from pipeline.sources import AUTO, Dataset, Record, Settings, image_sizes, open_dataset
from pipeline.splits import assign_splits
from pipeline.writer import write_shards

MAX_LISTED_BAD = 20


def build(source: Path, out: Path, options: BuildOptions, *, workers: int = 0, num_jobs: int = 1,
          job_index: int = 0, skip_bad: bool = False, overwrite: bool = False, progress: bool = True,
          layout: str = AUTO, test_fraction: float | None = None) -> dict[str, Any] | None:
    """Write this job's shards; with one job also merge and return the manifest.

    The whole build holds the lock on `out`: jobs of one `num_jobs` build with the same options and source
    share it (they may run at once, on several hosts); any other build or a merge is refused meanwhile."""
    check_job_args(num_jobs, job_index, workers)
    check_out(out)
    workers = workers or os.cpu_count() or 1
    with open_dataset(source, layout, Settings(options.seed, test_fraction, options.crop_bbox)) as dataset:
        sizes = image_sizes(dataset)
        missing = [r for r, size in zip(dataset.records, sizes, strict=True) if size < 0]
        if missing and not skip_bad:
            raise UserError(_bad_files_line([(r, "missing") for r in missing], dataset))
        plan = plan_shards(assign_splits(dataset.records, options.valid_fraction, options.seed), options.shard_samples)
        state = _state(dataset, sizes, options, plan)
        identity = {"options": state["options"], "source": state["source"]["fingerprint"], "num_jobs": num_jobs}
        with lock.acquire(buildstate.lock_path(out), "shared" if num_jobs > 1 else "exclusive", identity,
                          what=str(out), when_alone=lambda: buildstate.prepare_out(out, state, overwrite, num_jobs)):
            mine = job_shards(plan, num_jobs, job_index)
            bad = write_shards(out, dataset, [s for s in mine if not buildstate.complete(out, s.name)], options,
                               workers, skip_bad, progress)
            if bad and not skip_bad:
                raise UserError(_bad_files_line(bad, dataset) + " (no manifest written; --skip-bad leaves them out)")
            buildstate.write_marker(out, job_index, num_jobs, [s.name for s in mine])
            # This run hashed every shard it wrote, and every one it kept: merge need not read them again.
            return merge_locked(out, rehash=False) if num_jobs == 1 else None


def check_job_args(num_jobs: int, job_index: int, workers: int) -> None:
    """Range checks of the options that are not BuildOptions (those check themselves)."""
    if num_jobs < 1:
        raise UserError(f"--num-jobs must be >= 1, got {num_jobs}")
    if not 0 <= job_index < num_jobs:
        raise UserError(f"--job-index must be in 0..{num_jobs - 1} (--num-jobs {num_jobs}), got {job_index}")
    if workers < 0:
        raise UserError(f"--workers must be >= 0 (0 = all cores), got {workers}")


def check_out(out: Path) -> None:
    """Refuse an --out that can never hold a shard set (a file, a path through a file, a place this user
    cannot write) before any work. Nothing is created here."""
    problem = output_dir_problem(out, "--out")
    if problem:
        raise UserError(problem)


def _bad_files_line(bad: list[tuple[Record, str]], dataset: Dataset) -> str:
    listed = "; ".join(f"{r.path} ({reason})" for r, reason in bad[:MAX_LISTED_BAD])
    more = f"; and {len(bad) - MAX_LISTED_BAD} more" if len(bad) > MAX_LISTED_BAD else ""
    return f"{len(bad)} bad image(s) in {dataset.root}: {listed}{more}"


def _state(dataset: Dataset, sizes: list[int], options: BuildOptions, plan: list[ShardPlan]) -> dict[str, Any]:
    """What build.json records: the options, the source's identity, the classes (with the layout's per-class
    fields) and the plan."""
    return {
        "options": asdict(options),
        "source": {"fingerprint": dataset.fingerprint(sizes), "num_images": len(dataset.records),
                   "num_classes": len(dataset.classes), "layout": dataset.layout, **dataset.info},
        "classes": dataset.classes,
        **dataset.class_fields,
        "plan": {split: [s.name for s in plan if s.split == split] for split in mf.SPLITS},
    }
