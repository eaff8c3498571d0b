"""Shard-build throughput against the per-core ceiling measured in the same run.

    python bench/shards.py [--classes 25 --per-class 80] [--work DIR]

The ceiling is `encode_image` on the same images in a plain loop, bytes already in memory (no file I/O,
no tar, no hashing, no processes). Goals: per worker >= 0.8x the ceiling; 2 workers >= 1.7x one.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

from pipeline.build import build
from pipeline.encode import EncodeOptions, encode_image
from pipeline.plan import BuildOptions
from pipeline.sources import Settings
from pipeline.sources import cub as cub_layout
from pipeline.synth import synth

TURNS = 5  # each turn measures the ceiling, then the builds: ratios are taken within a turn, then the median


def ceiling_rate(images: list[tuple[bytes, tuple]], resize_short: int) -> float:
    """Images/s of decode + fix + resize + encode on one core, no I/O."""
    options = EncodeOptions(resize_short=resize_short)
    start = time.perf_counter()
    for data, bbox in images:
        encode_image(data, bbox, options)
    return len(images) / (time.perf_counter() - start)


def build_rate(source: Path, out: Path, resize_short: int, workers: int, num_images: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    build(source, out, BuildOptions(resize_short=resize_short), workers=workers, progress=False)
    return num_images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=25)
    parser.add_argument("--per-class", type=int, default=80)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="cubstream-bench-"))
    source = work / "CUB_200_2011"
    if not (source / "images.txt").is_file():
        synth(work, classes=args.classes, per_class=args.per_class, seed=0, progress=False)
    cub = cub_layout.read(source, Settings())
    n = len(cub.records)
    print(f"{n} synth images, {work}")
    print(f"medians of {TURNS} turns (range of the ratio in brackets)")
    print("| resize-short | per-core ceiling img/s | workers | build img/s | per worker / ceiling | vs 1 worker |")
    print("|---:|---:|---:|---:|---:|---:|")
    images = [(cub.image_path(r).read_bytes(), r.bbox) for r in cub.records]
    for resize_short in (0, 256):
        turns = []
        for _ in range(TURNS):
            turn = {"ceiling": ceiling_rate(images, resize_short)}
            for workers in (1, 2):
                turn[workers] = build_rate(source, work / f"out-{resize_short}", resize_short, workers, n)
            turns.append(turn)
        for workers in (1, 2):
            efficiency = sorted(t[workers] / workers / t["ceiling"] for t in turns)
            print(f"| {resize_short} | {median(t['ceiling'] for t in turns):.0f} | {workers} "
                  f"| {median(t[workers] for t in turns):.0f} | {median(efficiency):.2f}x "
                  f"({efficiency[0]:.2f}-{efficiency[-1]:.2f}) | {median(t[workers] / t[1] for t in turns):.2f}x |")
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
