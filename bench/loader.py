"""Train-stream throughput against the notebook's input pipeline, measured in the same run.

    python bench/loader.py                         # synth images, shards at --resize-short 256 and 0
    python bench/loader.py --shards shards/cub256 --workers 16 --seconds 20   # ours only, any shard set

baseline: torchvision ImageFolder + PIL + the notebook's transforms (Resize 224, RandomRotation 5, flip,
          RandomCrop 224 pad 10, ToTensor, Normalize) over the original JPEGs of the train split; one
          DataLoader iterated epoch after epoch, as the notebook does (its workers start each epoch).
ours:     `train.data.train_loader` over the same train split (tar shards, simplejpeg, Albumentations
          "standard", uint8 out); one loader over many epochs, as `fit` reads it (workers start once).
decode:   the decode-only ceiling: simplejpeg decoding every train JPEG of the same shards at full size in a
          plain loop on one core (bytes already in memory: no tar, augmentation, batching or processes).
Same worker counts side by side, taking turns; the ratios are per core. Goals: >= 4.5x the notebook on
shards resized to 256, >= 2.5x on original-size shards; >= 0.8x the decode-only ceiling on 256-px shards
and > 1.0x on original-size ones (where the stream decodes at the smaller scale its crops need, the
ceiling at full size). Prints `loader img/s: X` (ours, last row) for scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

from pipeline.build import build  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402
from pipeline.plan import BuildOptions  # noqa: E402
from pipeline.shardformat.check import decode_rgb  # noqa: E402
from pipeline.shardformat.schema import IMAGE  # noqa: E402
from pipeline.shardformat.tarread import tar_members  # noqa: E402
from pipeline.sources import Settings  # noqa: E402
from pipeline.sources import cub as cub_layout  # noqa: E402
from pipeline.splits import assign_splits  # noqa: E402
from pipeline.synth import synth  # noqa: E402
from train import augment, data  # noqa: E402

BATCH = 64
REPEATS = 3
EPOCHS = 1000  # more than any measurement reads
WORKERS = (0, 1, 2)  # 0: everything in the main process, the stream's own per-core speed without IPC


def rate(batches: Iterator, seconds: float) -> float:
    """Images/s over `seconds`, after the first batch (worker start-up), across epochs."""
    with contextlib.closing(batches):  # stops the workers
        next(batches)
        images, start = 0, time.perf_counter()
        for batch in batches:
            images += len(batch[1] if isinstance(batch, list) else batch["label"])
            if time.perf_counter() - start >= seconds:
                break
        return images / (time.perf_counter() - start)


def notebook_batches(images_dir: Path, keep: set[str], size: int, workers: int) -> Iterator:
    tf = transforms.Compose([
        transforms.Resize((size, size)), transforms.RandomRotation(5), transforms.RandomHorizontalFlip(),
        transforms.RandomCrop(size, padding=10), transforms.ToTensor(),
        transforms.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD)])
    dataset = datasets.ImageFolder(str(images_dir), transform=tf, is_valid_file=lambda path: path in keep)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers)
    return (batch for _ in itertools.count() for batch in loader)


def our_batches(shards: str, size: int, workers: int) -> Iterator:
    manifest = load_manifest(shards)
    transform = augment.Augment(augment.train_transform("standard", size))
    return iter(data.train_loader(shards, manifest, transform=transform, batch_size=BATCH, workers=workers,
                                  seed=0, epoch=0, rank=0, world_size=1, epochs=EPOCHS))


def train_jpegs(shards: Path) -> list[bytes]:
    """Every train image's bytes in the shard set, in manifest order."""
    images = []
    for shard in load_manifest(str(shards))["splits"]["train"]["shards"]:
        with open(shards / shard["name"], "rb") as stream:
            images += [payload for name, payload in tar_members(stream) if name.endswith("." + IMAGE)]
    return images


def decode_rate(images: list[bytes], seconds: float) -> float:
    """Images/s of a full-size decode of `images`, round after round, for `seconds` on this core."""
    count, start = 0, time.perf_counter()
    for jpeg in itertools.cycle(images):
        decode_rgb(jpeg)
        count += 1
        if time.perf_counter() - start >= seconds:
            break
    return count / (time.perf_counter() - start)


def compare(work: Path, size: int, seconds: float, per_class: int, repeats: int = REPEATS) -> float:
    """Baseline and ours take turns, REPEATS times, best of each: both see the same machine state."""
    if not (work / "CUB_200_2011" / "images.txt").is_file():
        synth(work, classes=25, per_class=per_class, seed=0, progress=False)
    source = work / "CUB_200_2011"
    options = {r: BuildOptions(resize_short=r, shard_samples=64) for r in (256, 0)}
    for resize_short, option in options.items():
        build(source, work / f"shards-{resize_short}", option, progress=False)
    splits = assign_splits(cub_layout.read(source, Settings()).records, options[0].valid_fraction, options[0].seed)
    train_images = {str(source / r.path) for r in splits["train"]}  # the same images as our train split
    print(f"train split: {len(train_images)} images; {repeats} turns of {seconds:g} s per row, best of each\n")
    jpegs = {r: train_jpegs(work / f"shards-{r}") for r in options}
    best: dict[tuple[str, int], float] = {}
    for _ in range(repeats):
        for resize_short in options:
            key = ("decode", resize_short)
            best[key] = max(best.get(key, 0.0), decode_rate(jpegs[resize_short], seconds))
        for workers in WORKERS:
            pipelines = {"notebook": notebook_batches(source / "images", train_images, size, workers)}
            pipelines |= {str(r): our_batches(str(work / f"shards-{r}"), size, workers) for r in options}
            for name, batches in pipelines.items():  # each starts its workers when rate() first reads it
                best[name, workers] = max(best.get((name, workers), 0.0), rate(batches, seconds))
    print("| shards | workers | notebook img/s | ours img/s | ratio | decode-only img/s (1 core) | ours per core "
          "/ decode |\n|---|---:|---:|---:|---:|---:|---:|")
    for resize_short in options:
        label = f"resize-short {resize_short}" if resize_short else "original size"
        ceiling = best["decode", resize_short]
        for workers in WORKERS:
            ours, baseline = best[str(resize_short), workers], best["notebook", workers]
            per_core = ours / max(workers, 1)
            print(f"| {label} | {workers} | {baseline:.0f} | {ours:.0f} | {ours / baseline:.2f}x | {ceiling:.0f} | "
                  f"{per_core / ceiling:.2f}x |")
    return ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="measure only our stream on this shard set (dir or URL)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="with --shards")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per turn")
    parser.add_argument("--per-class", type=int, default=240,
                        help="synth images per class (25 classes; 240 gives a 2,700-image train split)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="turns per row (best of them)")
    parser.add_argument("--work", type=Path, help="scratch directory kept between runs (default: temp)")
    args = parser.parse_args()
    # Per core: the main process stacks batches with torch, whose intra-op threads would take the second core
    # (and, on a busy machine, spin against other processes: measured 3x slower); DataLoader workers run
    # one thread each anyway, and the ceiling is one core.
    torch.set_num_threads(1)
    if args.shards:
        ours = rate(our_batches(args.shards, args.image_size, args.workers), args.seconds)
        print(f"{args.shards}: {args.workers} workers")
    else:
        work = args.work or Path(tempfile.mkdtemp(prefix="cubstream-loader-"))
        ours = compare(work, args.image_size, args.seconds, args.per_class, args.repeats)
        if args.work is None:
            shutil.rmtree(work)
    print(f"loader img/s: {ours:.1f}")


if __name__ == "__main__":
    main()
