"""Checkpoints that never lose work: temp dir + rename, last K kept, the best model kept apart.

run_dir/checkpoints/step-00000120/   accelerate state (model, optimizer, scheduler, RNG) + trainer.json
run_dir/checkpoints/best/            model.safetensors + meta.json: self-describing (arch, classes, transform)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import UserError
from pipeline.manifest import replace_dir, write_json_atomic

TRAINER_STATE = "trainer.json"
BEST = "best"
META_KEYS = ("arch", "classes", "image_size", "crop_pct", "mean", "std")  # what load_model needs


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Step checkpoints whose rename happened (so every file is there), oldest first."""
    found = [p for p in checkpoints_dir(run_dir).glob("step-*") if (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator: Any, run_dir: Path, state: dict[str, Any], keep: int) -> Path:
    """Every process writes its part into a temp dir; the main process renames it and prunes old ones."""
    final = checkpoints_dir(run_dir) / f"step-{state['global_step']:08d}"
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / TRAINER_STATE, state)
        if final.exists():  # re-saving the same step after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def save_best(run_dir: Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Replace checkpoints/best atomically (main process only): the previous best stays until the new one is whole."""
    best = checkpoints_dir(run_dir) / BEST
    tmp = best.with_name(f".tmp-{BEST}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    write_json_atomic(tmp / "meta.json", meta)
    replace_dir(tmp, best)


def load_best(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The best model of a run (a run dir, or its checkpoints/best dir); one-line errors otherwise."""
    run_dir = Path(run_dir)
    best = run_dir if (run_dir / "meta.json").is_file() else checkpoints_dir(run_dir) / BEST
    if not run_dir.is_dir():
        raise UserError(f"--checkpoint {run_dir}: no such run directory")
    if not (best / "model.safetensors").is_file() or not (best / "meta.json").is_file():
        raise UserError(f"--checkpoint {run_dir}: no complete best checkpoint ({best}/model.safetensors "
                        "and meta.json); is it a run dir of `python -m train fit`?")
    try:
        state, meta = load_file(str(best / "model.safetensors")), json.loads((best / "meta.json").read_text())
    except (SafetensorError, ValueError, OSError) as e:  # truncated or garbled files
        raise UserError(f"--checkpoint {run_dir}: unreadable best checkpoint in {best} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    missing = [key for key in META_KEYS if key not in meta] if isinstance(meta, dict) else list(META_KEYS)
    if missing:
        raise UserError(f"--checkpoint {run_dir}: {best}/meta.json lacks {', '.join(missing)}")
    return state, meta


def load_model(run_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The best model of a run, built from its meta.json alone, in eval mode on the CPU; and that meta."""
    from train.model import build_model

    state, meta = load_best(run_dir)
    model = build_model(meta["arch"], len(meta["classes"]), "none")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"--checkpoint {run_dir}: the weights do not fit {meta['arch']} with "
                        f"{len(meta['classes'])} classes ({str(e).splitlines()[0]})") from None
    return model.eval(), meta
