"""One rank of the two-process loader test (run by tests/test_data.py under torchrun): reads its train
epoch with a collective per batch (a rank with fewer batches would hang the others) and its eval share,
then writes rank<R>.json into --out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.manifest import load_manifest
from train.data import eval_loader, train_loader


def transform(image: np.ndarray, seed: int) -> np.ndarray:
    """Top-left 8x8 patch (HWC): tiny, deterministic, enough to check shapes."""
    return np.ascontiguousarray(image[:8, :8])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    manifest = load_manifest(args.shards)
    common = {"transform": transform, "batch_size": args.batch_size, "workers": args.workers, "rank": rank,
              "world_size": world_size}

    train_batches, full = 0, True
    for batch in train_loader(args.shards, manifest, seed=0, epoch=0, **common):
        dist.all_reduce(torch.ones(1))  # what DDP does every step
        train_batches += 1
        full = full and len(batch["key"]) == args.batch_size
    eval_keys = [key for batch in eval_loader(args.shards, manifest, "valid", **common) for key in batch["key"]]

    result = {"rank": rank, "world_size": world_size, "train_batches": train_batches, "full_batches": full,
              "eval_keys": eval_keys}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
