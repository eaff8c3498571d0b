"""Training-step throughput (images/s) of our loop against the notebook's plain loop, same run, same device.

    python bench/train_step.py [--arch resnet50] [--image-size 224] [--precision bf16] [--batch-size 64]

baseline: torchvision's ResNet, float32, contiguous, one Adam group (the notebook's loop).
ours:     our ResNet, channels_last, --precision autocast, discriminative groups, uint8 batch normalised on
          the device (what `train fit` does per step).
Prints a table and a line `train_step img/s: X` (ours) for scripts.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

from train.augment import normalize  # noqa: E402
from train.model import build_model  # noqa: E402
from train.optim import build_optimizer, lr_multipliers, param_groups  # noqa: E402

DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def images_per_second(step, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def baseline_step(args: argparse.Namespace, device: torch.device):
    model = getattr(torchvision.models, args.arch)(num_classes=200).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, 200, (args.batch_size,), device=device)

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def our_step(args: argparse.Namespace, device: torch.device):
    model = build_model(args.arch, 200).to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer("adam", param_groups(model, 1e-3, 0.0, lr_multipliers("notebook")), 1e-3)
    if args.compile:
        model = torch.compile(model)
    batch = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8)
    labels = torch.randint(0, 200, (args.batch_size,), device=device)
    dtype = DTYPES[args.precision]

    def step() -> None:
        images = normalize(batch.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    base = images_per_second(baseline_step(args, device), args.batch_size, args.steps, args.warmup, device)
    ours = images_per_second(our_step(args, device), args.batch_size, args.steps, args.warmup, device)
    print(f"{args.arch} at {args.image_size} px, batch {args.batch_size}, on {name}")
    print("| loop | img/s | ratio |\n|---|---:|---:|")
    print(f"| notebook (fp32, contiguous) | {base:.1f} | 1.00x |")
    print(f"| ours ({args.precision}, channels_last{', compiled' if args.compile else ''}) | {ours:.1f} "
          f"| {ours / base:.2f}x |")
    print(f"train_step img/s: {ours:.1f}")


if __name__ == "__main__":
    main()
