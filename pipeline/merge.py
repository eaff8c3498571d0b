"""`python -m pipeline merge`: check every job's part and every shard against its record, then write
manifest.json (last, so a set with a manifest is complete)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import PIL

from pipeline import buildstate, files, lock
from pipeline import manifest as mf
from pipeline.errors import UserError


def merge(out: Path, rehash: bool = True) -> dict[str, Any]:
    """Check every job's part and every shard's size and sha256 (size only without `rehash`), then write
    manifest.json (last). Takes the lock on `out` alone: refused while any build job is writing there."""
    if not buildstate.state_path(out).is_file():  # checked before the lock, which would create the state dir
        raise UserError(f"{out}: no build state ({buildstate.state_path(out)} missing); run `pipeline build` first")
    with lock.acquire(buildstate.lock_path(out), "exclusive", {"command": "merge"}, what=str(out),
                      when_alone=lambda: buildstate.remove_temporaries(out)):
        return merge_locked(out, rehash)


def merge_locked(out: Path, rehash: bool) -> dict[str, Any]:
    """merge's work, for a caller already holding the lock on `out` (a one-job build)."""
    state = buildstate.load_state(out)
    _check_jobs(out)
    num_classes = len(state["classes"])
    splits: dict[str, Any] = {}
    skipped: list[dict[str, Any]] = []
    for split in mf.SPLITS:
        shards = [_checked_shard(out, name, rehash, num_classes) for name in state["plan"][split]]
        skipped += [s for shard in shards for s in shard["skipped"]]
        splits[split] = {
            "num_samples": sum(s["num_samples"] for s in shards),
            "class_counts": [sum(s["class_counts"][c] for s in shards) for c in range(num_classes)],
            "shards": [{k: s[k] for k in ("name", "num_samples", "bytes", "sha256")} for s in shards],
        }
    manifest = {
        "format": mf.FORMAT,
        "version": mf.VERSION,
        "classes": state["classes"],
        **{name: state[name] for name in mf.CLASS_FIELDS if name in state},
        "options": state["options"],
        "source": state["source"],
        "tool": {"cubstream": "0.1.0", "pillow": PIL.__version__},
        "splits": splits,
        "skipped": sorted(skipped, key=lambda s: s["image_id"]),
    }
    mf.validate(manifest, str(out / mf.MANIFEST))
    files.write_json_atomic(out / mf.MANIFEST, manifest)
    return manifest


def _check_jobs(out: Path) -> None:
    markers = buildstate.markers(out)
    if not markers:
        raise UserError(f"{out}: no finished build job found in {out / buildstate.STATE_DIR}")
    totals = {m.total for m in markers}
    if len(totals) != 1:
        raise UserError(f"{out}: parts from builds with different --num-jobs ({sorted(totals)}); rebuild one way")
    (total,) = totals
    missing = sorted(set(range(total)) - {m.index for m in markers})
    if missing:
        raise UserError(f"{out}: job(s) {', '.join(map(str, missing))} of {total} have not finished (no part file)")


def _checked_shard(out: Path, name: str, rehash: bool, num_classes: int) -> dict[str, Any]:
    record = buildstate.load_shard_record(out, name)
    if record is None or not (out / name).is_file():
        raise UserError(f"{out / name}: shard missing; re-run its build job")
    if len(record["class_counts"]) != num_classes or not all(_skip_entry(s) for s in record["skipped"]):
        raise UserError(f"{buildstate.record_path(out, name)}: malformed shard record (class_counts or skipped do "
                        f"not fit {num_classes} classes); re-run its build job")
    if not buildstate.matches(out / name, record, rehash):
        raise UserError(f"{out / name}: size or sha256 does not match its build record; re-run its build job")
    return record


def _skip_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and (mf.is_count(entry.get("image_id")) or isinstance(entry.get("image_id"), str))
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("reason"), str))
