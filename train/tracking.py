"""What a run reports as it goes: the Accelerator (devices, processes, precision, the W&B tracker), the
lines only the main process prints, and metrics.jsonl with its W&B mirror."""

from __future__ import annotations

import json
import math
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from pipeline.errors import UserError
from pipeline.files import write_atomic
from train.config import Config, to_dict


def say(accelerator: Accelerator, text: str) -> None:
    """Print on the main process only: `accelerator.print` prints on every node's local main process, so a
    multi-node run would print each line once per node."""
    if accelerator.is_main_process:
        print(text, flush=True)


def wandb_mode(requested: str) -> str:
    """auto: online when an API key is configured (env or ~/.netrc), else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


def make_accelerator(config: Config, with_tracker: bool = True) -> Accelerator:
    if config.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
    tracker = with_tracker and wandb_mode(config.wandb) != "disabled"
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # several CPU processes need cpu=True
        mixed_precision=None if config.precision == "auto" else config.precision,  # None: launcher decides
        gradient_accumulation_steps=config.grad_accum,
        log_with="wandb" if tracker else None,
        project_dir=config.run_dir,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.dist_timeout))],
    )


def start_run_tracker(accelerator: Accelerator, config: Config, wandb_id: str) -> None:
    """fit's W&B run (when the accelerator has the tracker): named after the run directory, with the W&B id
    of run.json, so a resumed run continues the same W&B run."""
    if not accelerator.log_with:
        return
    from train.evaluation import eval_settings  # (evaluation imports this module)

    run_dir = Path(config.run_dir)
    recorded = {**to_dict(config), "eval": eval_settings(config)}  # how valid and test score, resolved
    accelerator.init_trackers(config.wandb_project, config=recorded, init_kwargs={"wandb": {
        "dir": str(run_dir), "mode": wandb_mode(config.wandb), "name": run_dir.name,
        "id": wandb_id, "resume": "allow"}})


class MetricsLog:
    """metrics.jsonl (main process) + the W&B tracker through Accelerate; one record per step/epoch."""

    def __init__(self, accelerator: Accelerator, path: Path, resume_step: int | None) -> None:
        """A fresh run (`resume_step` None) starts an empty file; a resumed one keeps the step and epoch
        records up to the checkpoint's step (what the run will write again goes)."""
        self.accelerator, self.path = accelerator, path
        if accelerator.is_main_process:
            kept = kept_records(path, resume_step) if resume_step is not None else []
            write_atomic(path, "".join(json.dumps(record) + "\n" for record in kept).encode())

    def write(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log(_flatten(record), step=record["step"])


def kept_records(path: Path, step: int) -> list[dict[str, Any]]:
    """The records of metrics.jsonl to keep when resuming at `step`: step and epoch records up to it. A line
    that does not parse (the partial last line of a killed run) is dropped, and so is the test record of
    an earlier ending (a resumed run writes its own)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("kind") != "test" and _step(record) <= step:
            kept.append(record)
    return kept


def _step(record: dict[str, Any]) -> float:
    step = record.get("step", 0)
    return step if isinstance(step, int | float) else math.inf


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and key != "step":
            flat[f"{prefix}{key}"] = value
    return flat
