"""The run directory: config.yaml, run.json (shard-set identity, W&B id), refusal to mix runs."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError
from pipeline.manifest import write_json_atomic
from train import config as cfgmod
from train.checkpoint import complete_checkpoints


def shard_set_id(manifest: dict[str, Any]) -> str:
    """Identity of a shard set's content, the same whether it is read from disk or over http."""
    payload = json.dumps([manifest["classes"], manifest["splits"]], sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()


def resume_point(config: cfgmod.Config, manifest: dict[str, Any]) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to overwrite or mix runs."""
    run_dir = Path(config.run_dir)
    checkpoints = complete_checkpoints(run_dir)
    if config.resume != "auto":
        if checkpoints:
            raise UserError(f"{run_dir} already holds a run with checkpoints; pass --resume auto to continue "
                            "it, or choose another --run-dir")
        return None
    if not checkpoints:
        return None
    problems = []
    saved_config = run_dir / "config.yaml"
    if saved_config.is_file():
        changed = cfgmod.changed_fields(yaml.safe_load(saved_config.read_text()) or {}, config)
        if changed:
            problems.append(f"config differs in {', '.join(changed)}")
    info = read_run_info(run_dir)
    if info.get("shard_set") not in (None, shard_set_id(manifest)):
        problems.append("another shard set")
    if problems and not config.force:
        raise UserError(f"cannot resume {run_dir}: {'; '.join(problems)} (pass --force to resume anyway)")
    return checkpoints[-1]


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_run_files(config: cfgmod.Config, manifest: dict[str, Any]) -> dict[str, Any]:
    """config.yaml and run.json (main process only). The W&B id survives resumes."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = read_run_info(run_dir)
    info = {"shard_set": shard_set_id(manifest), "shards": config.shards,
            "wandb_id": info.get("wandb_id") or uuid.uuid4().hex[:12]}
    cfgmod.save(config, run_dir / "config.yaml")
    write_json_atomic(run_dir / "run.json", info)
    return info


def resolve_auto_lr(config: cfgmod.Config) -> None:
    """`--lr auto --resume auto` on a run with checkpoints: reuse the LR lr-find chose when it started."""
    run_dir = Path(config.run_dir)
    if config.lr != "auto" or config.resume != "auto" or not complete_checkpoints(run_dir):
        return
    saved = run_dir / "config.yaml"
    lr = (yaml.safe_load(saved.read_text()) or {}).get("lr") if saved.is_file() else None
    if isinstance(lr, int | float) and not isinstance(lr, bool):
        config.lr = float(lr)
