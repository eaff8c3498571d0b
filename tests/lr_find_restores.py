"""Run by tests/test_lr_find.py in its own process (an Accelerator is process-wide state, so none is created
inside the test process): lr_finder.lr_find on fit's model, groups and stream, then once more with LRs so high
the loss turns NaN after one step. Writes OUT (JSON): what the sweep returned, the error of the second one,
and whether every model and optimizer tensor was restored after each."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from support import same_state

from pipeline.errors import UserError
from pipeline.manifest import load_manifest
from train import config as cfgmod
from train import engine, lr_finder, tracking


def main(out: Path, args: list[str]) -> None:
    parser = argparse.ArgumentParser()
    cfgmod.add_arguments(parser)
    config = cfgmod.make_config(parser.parse_args(args))
    manifest = load_manifest(config.shards)
    accelerator = tracking.make_accelerator(config, with_tracker=False)
    set_seed(config.seed)  # as the lr-find command does: the same init, so the same sweep, every run
    model, optimizer = engine.build_model_and_optimizer(accelerator, config, manifest)
    model, optimizer = accelerator.prepare(model, optimizer)
    model_before, optimizer_before = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())

    def restored() -> bool:
        return same_state(model.state_dict(), model_before) and same_state(optimizer.state_dict(), optimizer_before)

    result = lr_finder.lr_find(accelerator, model, optimizer, manifest, config)
    report: dict[str, Any] = {"lrs": result.lrs, "suggested_lr": result.suggested_lr, "restored": restored(),
                              "accelerator_step": accelerator.step}
    config = dataclasses.replace(config, lr_find_start=1e30, lr_find_end=1e31)  # finite first loss, then nan
    try:
        lr_finder.lr_find(accelerator, model, optimizer, manifest, config)
        report["nan_error"] = None
    except UserError as e:
        report["nan_error"] = str(e)
    report["restored_after_nan"] = restored()
    out.write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
