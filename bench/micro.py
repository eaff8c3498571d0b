"""The measurements behind the code's design choices: each choice against the alternative it replaced,
both timed in the same run on the same data.

    python bench/micro.py [--repeat 5]

Rows (per item; best of --repeat turns):
  tar members    our header reader vs `tarfile` in stream mode (what webdataset uses), per member
  sample seeding PCG64 state from splitmix64 vs numpy's SeedSequence (np.random.default_rng), per image
  batch memory   stacking into a reused shared buffer vs fresh shared memory per batch, per 224-px image
  colour jitter  brightness+saturation vs brightness+saturation+contrast (Albumentations), per 224-px image
  pool start     fork vs spawn: a process pool's first answer
  t-SNE          2,000 vs 1,000 points of 50 dims, one thread (the evaluation report's embedding plot)
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import tarfile
import time
from collections.abc import Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.shardformat.tarread import tar_members  # noqa: E402
from train.augment import pcg64_state  # noqa: E402


def best_seconds(work: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def a_tar(members: int) -> bytes:
    """A tar of `members` small regular files, like a shard's jpg/cls/json members."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(members):
            data = bytes(200)
            info = tarfile.TarInfo(f"{i // 3:08d}.{('jpg', 'cls', 'json')[i % 3]}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def tar_row(repeat: int) -> tuple[str, str, float, float, int]:
    data, n = a_tar(3000), 3000

    def ours() -> None:
        for _ in tar_members(io.BytesIO(data)):
            pass

    def theirs() -> None:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            for info in tar:
                tar.extractfile(info).read()

    return "tar members", "tarfile stream", best_seconds(theirs, repeat), best_seconds(ours, repeat), n


def seeding_row(repeat: int) -> tuple[str, str, float, float, int]:
    n, generator = 5000, np.random.Generator(np.random.PCG64())

    def ours() -> None:
        for seed in range(n):
            generator.bit_generator.state = pcg64_state(seed)

    def theirs() -> None:
        for seed in range(n):
            np.random.default_rng(seed)

    return "sample seeding", "SeedSequence", best_seconds(theirs, repeat), best_seconds(ours, repeat), n


def batch_row(repeat: int) -> tuple[str, str, float, float, int]:
    images = [torch.zeros(224, 224, 3, dtype=torch.uint8) for _ in range(64)]
    buffer = torch.empty(64, 224, 224, 3, dtype=torch.uint8).share_memory_()

    def ours() -> None:
        torch.stack(images, out=buffer)

    def theirs() -> None:
        torch.stack(images).share_memory_()

    return "batch memory", "fresh shared", best_seconds(theirs, repeat), best_seconds(ours, repeat), len(images)


def jitter_row(repeat: int) -> tuple[str, str, float, float, int]:
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    ours_t = A.ColorJitter(brightness=0.2, contrast=0.0, saturation=0.2, hue=0.0, p=1.0)
    theirs_t = A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.0, p=1.0)
    n = 200
    return ("colour jitter", "with contrast", best_seconds(lambda: [theirs_t(image=image) for _ in range(n)], repeat),
            best_seconds(lambda: [ours_t(image=image) for _ in range(n)], repeat), n)


def pool_row(repeat: int) -> tuple[str, str, float, float, int]:
    def first_answer(method: str) -> Callable[[], object]:
        def start() -> None:
            with multiprocessing.get_context(method).Pool(1) as pool:
                pool.apply(abs, (-1,))
        return start

    return ("pool start", "spawn", best_seconds(first_answer("spawn"), min(repeat, 3)),
            best_seconds(first_answer("fork"), min(repeat, 3)), 1)


def tsne_row(repeat: int) -> tuple[str, str, float, float, int]:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    points = np.random.default_rng(0).normal(size=(2000, 50)).astype(np.float32)

    def embed(n: int) -> Callable[[], object]:
        def run() -> None:
            with threadpool_limits(limits=1):
                TSNE(n_components=2, perplexity=30.0, init="pca", random_state=0).fit_transform(points[:n])
        return run

    # "ours" is the report's cap (2,000 points), against half of it: how the cost grows with the cap.
    return "t-SNE", "1,000 points", best_seconds(embed(1000), 1), best_seconds(embed(2000), 1), 1


def duration(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        if seconds >= scale:
            return f"{seconds / scale:,.2f} {unit}"
    return f"{seconds * 1e6:,.1f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="turns per measurement, best kept (default: 5)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| measurement | baseline | baseline per item | ours per item | speed-up |")
    print("|---|---|---:|---:|---:|")
    for row in (tar_row, seeding_row, batch_row, jitter_row, pool_row, tsne_row):
        name, baseline, theirs, ours, n = row(args.repeat)
        print(f"| {name} | {baseline} | {duration(theirs / n)} | {duration(ours / n)} | {theirs / ours:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
