"""The run directory: its lock, config.yaml, run.json (shard-set identity, W&B id), the choice of the
checkpoint to resume from, and the refusal to mix runs."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import lock
from pipeline.errors import UserError, one_line
from pipeline.files import write_json_atomic
from train import config as cfgmod
from train.checkpoint import checkpoint_problem, complete_checkpoints, remove_temporaries

LOCK = ".lock"  # with .lock.meta and .lock.holder beside it (pipeline.lock)
# Options a resumed run may change without --force: how the global batch is split (the claim keeps the
# checkpoint's global batch, train.data.elastic.keep_global_batch).
LAYOUT_CHANGES = {"batch_size", "grad_accum"}


def shard_set_id(manifest: dict[str, Any]) -> str:
    """Identity of a shard set's content, the same whether it is read from disk or over http."""
    payload = json.dumps([manifest["classes"], manifest["splits"]], sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold the run directory for one `fit` (main process only), or a one-line error naming the process
    that holds it. The lock is an flock, so a killed run never blocks its `--resume auto`; temporaries that
    only an interrupted run can have left are removed once it is taken."""
    run_dir = Path(run_dir)
    with lock.acquire(run_dir / LOCK, "exclusive", {"run_dir": str(run_dir.resolve())},
                      what=f"run directory {run_dir}", when_alone=lambda: remove_temporaries(run_dir)):
        yield


def read_saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The config.yaml a run was started with (None when there is none); a damaged one is a one-line error."""
    return _read_mapping(Path(run_dir) / "config.yaml", yaml.safe_load, "a mapping of option: value",
                         "how the run was started")


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """run.json ({} when there is none); a damaged one is a one-line error."""
    return _read_mapping(Path(run_dir) / "run.json", json.loads, "a JSON object", "which shard set the run used") or {}


def _read_mapping(path: Path, parse: Callable[[str], Any], shape: str, what: str) -> dict[str, Any] | None:
    """A run file that must hold a mapping (None when absent); damaged: one line saying what is lost."""
    if not path.is_file():
        return None
    try:
        data = parse(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        problem = one_line(e)
    else:
        if isinstance(data, dict):
            return data
        problem = f"not {shape}"
    raise UserError(f"{path} is damaged ({problem}); cannot tell {what}: restore it, or train in another "
                    "--run-dir")


@dataclass
class Start:
    """How a `fit` starts: fresh (checkpoint None) or from a checkpoint, whose trainer.json is `state`;
    `skipped` holds one warning per newer checkpoint that could not be used."""

    checkpoint: Path | None = None
    state: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def resume_point(config: cfgmod.Config, manifest: dict[str, Any], trainer_keys: tuple[str, ...]) -> Start:
    """The checkpoint to resume from (the newest that loads), or a fresh start; refuses to overwrite a run,
    to mix runs, and what --force cannot change."""
    run_dir = Path(config.run_dir)
    checkpoints = complete_checkpoints(run_dir)
    if config.resume != "auto":
        if checkpoints:
            raise UserError(f"{run_dir} already holds a run with checkpoints; pass --resume auto to continue "
                            "it, or choose another --run-dir")
        return Start()
    if not checkpoints:
        return Start()
    check_changes(config, manifest, run_dir)
    start = Start()
    for candidate in reversed(checkpoints):
        problem = checkpoint_problem(candidate, trainer_keys)
        if problem is None:
            start.checkpoint, start.state = candidate, json.loads((candidate / "trainer.json").read_text())
            return start
        start.skipped.append(f"warning: skipping checkpoint {candidate}: {problem}")
    raise UserError(f"cannot resume {run_dir}: none of its {len(checkpoints)} checkpoint(s) loads (newest, "
                    f"{checkpoints[-1].name}: {start.skipped[0].split(': ', 2)[-1]}); remove them to start "
                    "again, or train in another --run-dir")


def check_changes(config: cfgmod.Config, manifest: dict[str, Any], run_dir: Path) -> None:
    """--force may change only cfgmod.FORCE_CHANGES and the shard set (with the same classes): what the run
    can follow exactly from the checkpoint on. Anything else is refused, with or without --force."""
    saved = read_saved_config(run_dir)
    if saved is None:
        raise UserError(f"{run_dir}/config.yaml is missing; cannot tell how the run was started: restore it, "
                        "or train in another --run-dir")
    info = read_run_info(run_dir)
    changed = [name for name in cfgmod.changed_fields(saved, config) if name not in LAYOUT_CHANGES]
    fixed = [name for name in changed if name not in cfgmod.FORCE_CHANGES]
    if fixed:
        raise UserError(f"cannot resume {run_dir}: config differs in {', '.join(fixed)}, which --force cannot "
                        f"change (it can change {', '.join(sorted(cfgmod.FORCE_CHANGES))} and the shard set); "
                        "train in another --run-dir")
    classes = info.get("classes")
    if classes is not None and classes != manifest["classes"]:
        raise UserError(f"cannot resume {run_dir}: the shard set has other classes than the run's "
                        f"({len(manifest['classes'])} vs {len(classes)}); train in another --run-dir")
    problems = [f"config differs in {', '.join(changed)}"] if changed else []
    if info.get("shard_set") not in (None, shard_set_id(manifest)):
        problems.append("another shard set")
    if problems and not config.force:
        raise UserError(f"cannot resume {run_dir}: {'; '.join(problems)} (pass --force to resume anyway)")


def write_run_info(config: cfgmod.Config, manifest: dict[str, Any], resuming: bool) -> dict[str, Any]:
    """run.json (main process only): the shard set's identity and classes, and the W&B id, which a resumed
    run keeps."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = read_run_info(run_dir) if resuming else {}
    info = {"shard_set": shard_set_id(manifest), "shards": config.shards, "classes": manifest["classes"],
            "wandb_id": previous.get("wandb_id") or uuid.uuid4().hex[:12]}
    write_json_atomic(run_dir / "run.json", info)
    return info


def resolve_auto_lr(config: cfgmod.Config) -> cfgmod.Config:
    """`--lr auto --resume auto` on a run with checkpoints: the config with the LR lr-find chose when the run
    started (else `config` as it is)."""
    run_dir = Path(config.run_dir)
    if config.lr != "auto" or config.resume != "auto" or not complete_checkpoints(run_dir):
        return config
    lr = (read_saved_config(run_dir) or {}).get("lr")
    if isinstance(lr, int | float) and not isinstance(lr, bool):
        return dataclasses.replace(config, lr=float(lr))
    return config
