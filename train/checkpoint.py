"""Checkpoints that never lose work: temp dir + rename, last K kept, the best model kept apart.

run_dir/checkpoints/step-00000120/   accelerate state (model, optimizer, scheduler, EMA of the weights with
                                     --ema-decay, RNG) + trainer.json
run_dir/checkpoints/best/            model.safetensors + meta.json: self-describing (arch, classes, transform)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import UserError, one_line
from pipeline.files import ASIDE_MARK, is_temporary, replace_dir, write_json_atomic
from train.integrity import FILES, file_problem, recorded_problem, seal, sync_dir, weights_problem

TRAINER_STATE = "trainer.json"
BEST = "best"
TEMPORARY_DIR = ".tmp-"  # `.tmp-step-N`, `.tmp-best`: a checkpoint directory being written (see _temporary_dir)
STEP_NAME = re.compile(r"step-(\d+)")
MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
# What accelerator.load_state reads besides the model and the per-process RNG states: the optimizer and the
# schedule (registered for checkpointing, so saved as a custom object).
TORCH_FILES = ("optimizer.bin", "custom_checkpoint_0.pkl")
META_KEYS = ("arch", "classes", "image_size", "crop_pct", "mean", "std")  # what load_model needs


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_of(path: Path) -> int | None:
    """The step of a checkpoint directory named step-NNNNNNNN; None for any other name (e.g. "step-old")."""
    match = STEP_NAME.fullmatch(path.name)
    return int(match[1]) if match else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Step checkpoints whose rename happened (trainer.json is written last, inside the temporary directory),
    oldest first; names that are not step-<number> are ignored."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if step_of(p) is not None and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=step_of)


def checkpoint_problem(checkpoint: Path, trainer_keys: tuple[str, ...]) -> str | None:
    """Why `accelerator.load_state` (and the trainer) could not use this checkpoint, or None when every file
    it needs is there and intact: trainer.json parses, safetensors headers match the file sizes, the torch
    files' zip directories (at their ends) are read, and every file has the sha256 trainer.json recorded
    at save. A checkpoint from before sha256 were recorded has its weights checked for NaN and inf instead."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{TRAINER_STATE} is unreadable ({one_line(e)})"
    if not isinstance(state, dict) or [key for key in trainer_keys if key not in state]:
        missing = [key for key in trainer_keys if not isinstance(state, dict) or key not in state]
        return f"{TRAINER_STATE} lacks {', '.join(missing)}"
    if state.get("global_step") != step_of(checkpoint):
        return f"{TRAINER_STATE} says step {state.get('global_step')!r}, not {step_of(checkpoint)}"
    world = state.get("world_size")
    ranks = range(world) if isinstance(world, int) and world >= 1 else range(1)
    needed = [MODEL_FILE, *TORCH_FILES, *(f"random_states_{rank}.pkl" for rank in ranks)]
    present = [p.name for p in sorted(checkpoint.iterdir()) if p.suffix in (".bin", ".pkl", ".pt", ".safetensors")]
    for name in dict.fromkeys([*needed, *present]):
        problem = file_problem(checkpoint / name)
        if problem:
            return f"{name} {problem}"
    if FILES in state:
        return recorded_problem(checkpoint, state[FILES])
    problem = weights_problem(checkpoint / MODEL_FILE)
    return f"{MODEL_FILE} {problem}" if problem else None


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Delete what an interrupted write leaves (temporary checkpoint directories, renamed-away old best
    models, temporary files); call only while no other process can write the run (under its lock).

    A kill between the two renames of `replace_dir` leaves no checkpoints/best but a complete old one
    beside it: that one is put back first, so the best model is never lost."""
    folder = checkpoints_dir(run_dir)
    best = folder / BEST
    if not best.exists():
        for old in sorted(folder.glob(f".{BEST}{ASIDE_MARK}*")):
            if (old / "model.safetensors").is_file() and (old / "meta.json").is_file():
                os.replace(old, best)
                break
    stale = [p for where in (run_dir, folder) if where.is_dir() for p in where.iterdir() if _is_temporary(p.name)]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return stale


def _is_temporary(name: str) -> bool:
    """Names this code gives things before a rename: .tmp-step-N, .tmp-best (TEMPORARY_DIR), .best.old-PID
    (replace_dir's), .NAME.tmp-PID (pipeline.files')."""
    return name.startswith(TEMPORARY_DIR) or is_temporary(name) or (name.startswith(".") and ASIDE_MARK in name)


def _temporary_dir(final: Path) -> Path:
    """Where a checkpoint directory is written before its rename. Not pipeline.files' `.NAME.tmp-PID`: every
    process of the run writes its part into the same directory, so its name cannot hold one process's pid."""
    return final.with_name(f"{TEMPORARY_DIR}{final.name}")


def save_checkpoint(accelerator: Any, run_dir: Path, state: dict[str, Any], keep: int) -> Path:
    """Every process writes its part into a temp dir; the main process renames it and prunes old ones.

    A failed write (a full disk) is one error in every process naming the checkpoint; the temp dir is
    removed and the previous checkpoints stay as they were."""
    final = checkpoints_dir(run_dir) / f"step-{state['global_step']:08d}"
    tmp = _temporary_dir(final)
    problem = None
    if accelerator.is_main_process:
        problem = _attempt(lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)))
    _agree(accelerator, problem, final, tmp)
    problem = _attempt(lambda: accelerator.save_state(str(tmp), safe_serialization=True))
    _agree(accelerator, problem, final, tmp)
    if accelerator.is_main_process:
        problem = _attempt(lambda: _publish(run_dir, tmp, final, state, keep))
    _agree(accelerator, problem, final, tmp)
    return final


def _publish(run_dir: Path, tmp: Path, final: Path, state: dict[str, Any], keep: int) -> None:
    """trainer.json (with every file's sha256, the files flushed to disk first), then the rename."""
    write_json_atomic(tmp / TRAINER_STATE, {**state, FILES: seal(tmp)})
    sync_dir(tmp)
    if final.exists():  # re-saving the same step after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    sync_dir(final.parent)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)


# What a failed write raises: OSError from Python, SafetensorError from safetensors, RuntimeError from
# torch.save's zip writer ("unexpected pos ..."), which does not say why.
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


def _attempt(action: Any) -> str | None:
    try:
        action()
    except WRITE_ERRORS as e:
        return one_line(e)
    return None


def _agree(accelerator: Any, problem: str | None, final: Path, tmp: Path) -> None:
    """Every process learns whether any failed; then all raise the same one-line error."""
    from accelerate.utils import gather_object

    problems = [p for p in gather_object([problem]) if p]
    if not problems:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = [p for p in complete_checkpoints(final.parent.parent) if p.name != final.name]
    if final.name == BEST:
        kept = "the previous best model is intact" if final.exists() else "there is no earlier best model"
    else:
        kept = (f"the newest complete checkpoint, {previous[-1].name}, is intact" if previous
                else "there is no earlier checkpoint")
    raise UserError(f"cannot write checkpoint {final} ({problems[0]}; {_free_space(final.parent)}); {kept}")


def _free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 1e6:.0f} MB free there"
    except OSError:
        return "free space unknown"


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def save_best(accelerator: Any, run_dir: Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Replace checkpoints/best atomically (the main process writes; call it in every process): the previous
    best stays until the new one is whole, and a failed write is the same one-line error everywhere."""
    best = checkpoints_dir(run_dir) / BEST
    tmp = _temporary_dir(best)
    problem = None
    if accelerator.is_main_process:
        problem = _attempt(lambda: _write_best(tmp, best, model, meta))
    _agree(accelerator, problem, best, tmp)


def _write_best(tmp: Path, best: Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / MODEL_FILE))
    write_json_atomic(tmp / META_FILE, {**meta, FILES: seal(tmp)})
    sync_dir(tmp)
    replace_dir(tmp, best)
    sync_dir(best.parent)


def best_dir(run_dir: Path) -> Path:
    """A run's best model directory (`run_dir` itself when it is one)."""
    return run_dir if (run_dir / META_FILE).is_file() else checkpoints_dir(run_dir) / BEST


def load_best(run_dir: Path, flag: str = "--checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The best model of a run (a run dir, or its checkpoints/best dir) and its meta (without the recorded
    sha256); one-line errors otherwise, starting with `flag` (the option that named the run; "" for none)."""
    run_dir = Path(run_dir)
    named = f"{flag} {run_dir}".strip()
    best = best_dir(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{named}: no such run directory")
    if not (best / MODEL_FILE).is_file() or not (best / META_FILE).is_file():
        raise UserError(f"{named}: no complete best checkpoint ({best}/{MODEL_FILE} and {META_FILE}); is it a "
                        "run dir of `python -m train fit`?")
    try:
        meta = json.loads((best / META_FILE).read_text())
        problem = _best_weights_problem(best, meta.get(FILES) if isinstance(meta, dict) else None)
        state = None if problem else load_file(str(best / MODEL_FILE))
    except (SafetensorError, ValueError, OSError) as e:  # truncated or garbled files
        problem = one_line(e, typed=True)
    if problem:
        raise UserError(f"{named}: unreadable best checkpoint in {best} ({problem})")
    missing = [key for key in META_KEYS if key not in meta] if isinstance(meta, dict) else list(META_KEYS)
    if missing:
        raise UserError(f"{named}: {best}/{META_FILE} lacks {', '.join(missing)}")
    meta.pop(FILES, None)
    return state, meta


def best_problem(run_dir: Path) -> str | None:
    """Why a run has no usable best model ("... is missing", "... is damaged ..."), or None."""
    best = checkpoints_dir(run_dir) / BEST
    if not (best / META_FILE).is_file():
        return f"{best}/{META_FILE} is missing"
    try:
        meta = json.loads((best / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{best}/{META_FILE} is unreadable ({one_line(e)})"
    problem = _best_weights_problem(best, meta.get(FILES) if isinstance(meta, dict) else None)
    return f"{best}: {problem}" if problem else None


def _best_weights_problem(best: Path, recorded: Any) -> str | None:
    """The weights checked against the sha256 recorded at save, or (a best model saved before sha256 were
    recorded) for their structure and finite numbers."""
    if recorded is not None:
        problem = file_problem(best / MODEL_FILE)
        return f"{MODEL_FILE} {problem}" if problem else recorded_problem(best, recorded)
    problem = weights_problem(best / MODEL_FILE)
    return f"{MODEL_FILE} {problem}" if problem else None


def load_model(run_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The best model of a run, built from its meta.json alone, in eval mode on the CPU; and that meta."""
    from train.model import build_model

    state, meta = load_best(run_dir)
    model = build_model(meta["arch"], len(meta["classes"]), "none", meta["image_size"])
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"--checkpoint {run_dir}: the weights do not fit {meta['arch']} with "
                        f"{len(meta['classes'])} classes ({one_line(e)})") from None
    return model.eval(), meta
