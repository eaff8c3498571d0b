"""Shard-build throughput against the per-core ceiling measured in the same run.

    python bench/shards.py [--classes 25 --per-class 80] [--work DIR]

The ceiling is `encode_image` on the same images in a plain loop, bytes already in memory (no file I/O,
no tar, no hashing, no processes). Goals (issue 2): per worker >= 0.8x the ceiling; 2 workers >= 1.7x one.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.cub import read_cub
from pipeline.encode import EncodeOptions, encode_image
from pipeline.synth import synth
from pipeline.writer import BuildOptions, build

REPEATS = 3  # best of, with ceiling and builds interleaved so that both sample the same machine state


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
    cub = read_cub(source)
    n = len(cub.records)
    print(f"{n} synth images, {work}")
    print("| resize-short | per-core ceiling img/s | workers | build img/s | per worker / ceiling | vs 1 worker |")
    print("|---:|---:|---:|---:|---:|---:|")
    images = [(cub.image_path(r).read_bytes(), r.bbox) for r in cub.records]
    for resize_short in (0, 256):
        best = {"ceiling": 0.0, 1: 0.0, 2: 0.0}
        for _ in range(REPEATS):
            best["ceiling"] = max(best["ceiling"], ceiling_rate(images, resize_short))
            for workers in (1, 2):
                rate = build_rate(source, work / f"out-{resize_short}", resize_short, workers, n)
                best[workers] = max(best[workers], rate)
        for workers in (1, 2):
            print(f"| {resize_short} | {best['ceiling']:.0f} | {workers} | {best[workers]:.0f} "
                  f"| {best[workers] / workers / best['ceiling']:.2f}x | {best[workers] / best[1]:.2f}x |")
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
