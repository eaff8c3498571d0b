"""Run by tests/test_lr_find.py in its own process (an Accelerator is process-wide state, so none is created
inside the test process): engine.lr_find on fit's model, groups and stream, then once more with LRs so high
the loss turns NaN after one step. Writes OUT (JSON): what the sweep returned, the error of the second one,
and whether every model and optimizer tensor was restored after each."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.manifest import load_manifest
from train import config as cfgmod
from train import engine


def same(a: Any, b: Any) -> bool:
    """Deep equality of state dicts (tensors compared exactly)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def main(out: Path, args: list[str]) -> None:
    parser = argparse.ArgumentParser()
    cfgmod.add_arguments(parser)
    config = cfgmod.make_config(parser.parse_args(args))
    manifest = load_manifest(config.shards)
    accelerator = engine.make_accelerator(config, with_tracker=False)
    model, optimizer = engine.build_model_and_optimizer(accelerator, config, manifest)
    model, optimizer = accelerator.prepare(model, optimizer)
    model_before, optimizer_before = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())

    def restored() -> bool:
        return same(model.state_dict(), model_before) and same(optimizer.state_dict(), optimizer_before)

    result = engine.lr_find(accelerator, model, optimizer, manifest, config)
    report: dict[str, Any] = {"lrs": result.lrs, "suggested_lr": result.suggested_lr, "restored": restored(),
                              "accelerator_step": accelerator.step}
    config.lr_find_start, config.lr_find_end = 1e30, 1e31  # finite first loss, then nan
    try:
        engine.lr_find(accelerator, model, optimizer, manifest, config)
        report["nan_error"] = None
    except UserError as e:
        report["nan_error"] = str(e)
    report["restored_after_nan"] = restored()
    out.write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
