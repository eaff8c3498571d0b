"""Run by tests/test_distributed.py, once under `accelerate launch` as 2 CPU processes and once as one
process with --grad-accum 2: fit's model and optimizer (train.engine.build_model_and_optimizer, then
accelerator.prepare) take --steps optimizer steps of fit's train step (train.engine.train_step) on fixed,
seeded batches. Each optimizer step consumes one global batch of 2 x --batch-size images: process r of 2 gets
half r, the single process gets half 0 then half 1 as two accumulation micro-batches, so every BatchNorm
sees the same images in both runs and the averaged gradient is the same sum. Every process writes its
parameters after the last step to OUT/rank<R>.safetensors, and to OUT/rank<R>.json the losses it saw, the
optimizer steps taken and how far the parameters moved (the largest change of any one). With --ema-decay,
fit's EMA of the weights (train.ema) is updated after every optimizer step as fit does, and its whole state
(parameters and BatchNorm statistics) written to OUT/rank<R>-ema.safetensors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate.utils import set_seed
from safetensors.torch import save_file

from train import config as cfgmod
from train import ema, engine, tracking

CLASSES = 6
INPUT_SEED = 1234


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2)
    cfgmod.add_arguments(parser)
    args = parser.parse_args()
    config = cfgmod.make_config(args)
    accelerator = tracking.make_accelerator(config, with_tracker=False)
    world, rank = accelerator.num_processes, accelerator.process_index
    assert world * config.grad_accum == 2, (world, config.grad_accum)  # two half-batches per optimizer step

    set_seed(config.seed)
    manifest = {"classes": [f"{i:03d}.class_{i}" for i in range(CLASSES)]}
    model, optimizer = engine.build_model_and_optimizer(accelerator, config, manifest)
    model, optimizer = accelerator.prepare(model, optimizer)
    averaged = ema.create(accelerator, model, config.ema_decay)
    model.train()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}

    generator = torch.Generator().manual_seed(INPUT_SEED)  # the same global batches in every process
    size, batch = config.image_size, config.batch_size
    losses, optimizer_steps = [], 0
    for _ in range(args.steps):
        images = torch.randint(0, 256, (2, batch, 3, size, size), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, CLASSES, (2, batch), generator=generator)
        for half in ([rank] if world == 2 else [0, 1]):
            step = {"image": images[half], "label": labels[half]}
            _, _, loss = engine.train_step(accelerator, model, optimizer, step, config)
            losses.append(loss.item())
            optimizer_steps += accelerator.sync_gradients
            if averaged is not None and accelerator.sync_gradients:
                ema.update(accelerator, averaged, model, optimizer_steps)

    moved = max((p.detach() - initial[name]).abs().max().item() for name, p in model.named_parameters())
    weights = {name: p.detach().cpu().contiguous() for name, p in accelerator.unwrap_model(model).named_parameters()}
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(args.out / f"rank{rank}.safetensors"))
    if averaged is not None:
        state = {name: t.detach().cpu().contiguous() for name, t in averaged.module.state_dict().items()}
        save_file(state, str(args.out / f"rank{rank}-ema.safetensors"))
    (args.out / f"rank{rank}.json").write_text(json.dumps({"world": world, "losses": losses,
                                                            "optimizer_steps": optimizer_steps,
                                                            "max_update": moved}))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
