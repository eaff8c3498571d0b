"""The build state in `OUT/.build/`: the build's options, source and plan (`build.json`), one record per
finished shard (`<shard>.json`), one part marker per finished job (`job-III-of-JJJ.json`), the lock; and
the temporaries a killed build leaves behind. Every reader checks what it reads: a damaged file is one line
naming it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import files
from pipeline import manifest as mf
from pipeline.errors import UserError
from pipeline.shardformat.schema import SHARD_GLOB

STATE_DIR = ".build"
LOCK = "lock"  # in STATE_DIR: held by every build job and merge for their whole run (see pipeline.lock)
BUILD_STATE = "build.json"
MARKER = re.compile(r"job-(\d+)-of-(\d+)\.json")


def state_path(out: Path) -> Path:
    return out / STATE_DIR / BUILD_STATE


def lock_path(out: Path) -> Path:
    return out / STATE_DIR / LOCK


# ---------------------------------------------------------------- build.json: options, source, classes, plan


def prepare_out(out: Path, state: dict[str, Any], overwrite: bool, num_jobs: int) -> None:
    """Runs with the lock held by this process alone. Refuse an --out holding another shard set (other
    options or source) unless told to overwrite it; remove what dead builds left (their temporaries, and
    part markers of a build with another --num-jobs: the shards are the same whatever the number of jobs,
    and each is checked by sha256 before it is kept); record this build's state."""
    previous = _previous_state(out, overwrite)
    other = previous is not None and (previous["options"], previous["source"]["fingerprint"]) != (
        state["options"], state["source"]["fingerprint"])
    if other and not overwrite:
        raise UserError(f"{out} holds a shard set built with {_difference(previous, state)}; "
                        "pass --overwrite to replace it or choose another --out")
    remove_temporaries(out)
    if other:
        _remove_shard_set(out)
    for marker in markers(out):
        if marker.total != num_jobs:
            marker.path.unlink()
    files.write_json_atomic(state_path(out), state)


def _previous_state(out: Path, overwrite: bool) -> dict[str, Any] | None:
    """The options and source of what `out` holds: its build state, or the manifest of a set copied without
    one. An unreadable one is an error unless it is to be overwritten anyway."""
    for path in (state_path(out), out / mf.MANIFEST):
        if path.is_file():
            state = _parse_state(path)
            if state is not None:
                return state
            if overwrite:
                return {"options": None, "source": {"fingerprint": None}}
            raise UserError(f"{path}: not a readable build record ({path.stat().st_size} bytes); remove it or "
                            "pass --overwrite")
    return None


def _parse_state(path: Path) -> dict[str, Any] | None:
    """A build state or manifest with options and a source fingerprint; None if it is anything else."""
    try:
        state = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    readable = (isinstance(state, dict) and isinstance(state.get("options"), dict)
                and isinstance(state.get("source"), dict) and isinstance(state["source"].get("fingerprint"), str))
    return state if readable else None


def _difference(previous: dict[str, Any], state: dict[str, Any]) -> str:
    changed = [f"{k}={previous['options'].get(k)!r} (now {v!r})"
               for k, v in state["options"].items() if previous["options"].get(k) != v]
    if previous["source"]["fingerprint"] != state["source"]["fingerprint"]:
        changed.append("another source")
    return ", ".join(changed) or "other settings"


def _remove_shard_set(out: Path) -> None:
    """Delete only what a build writes (manifest first, so the set stops looking complete)."""
    (out / mf.MANIFEST).unlink(missing_ok=True)
    for path in sorted(out.glob(SHARD_GLOB)) + sorted((out / STATE_DIR).glob("*.json")):
        path.unlink()


def load_state(out: Path) -> dict[str, Any]:
    """build.json, with every field merge uses checked; one line naming the file otherwise."""
    path = state_path(out)
    state = _parse_state(path)
    problem = "not JSON with options and a source fingerprint" if state is None else _state_problem(state)
    if problem:
        raise UserError(f"{path}: not a readable build state ({problem}); rebuild with --overwrite")
    return state


def _state_problem(state: dict[str, Any]) -> str:
    classes, plan = state.get("classes"), state.get("plan")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return "'classes' is not a list of names"
    if not isinstance(plan, dict) or sorted(plan) != sorted(mf.SPLITS):
        return f"'plan' is not an object with the splits {', '.join(mf.SPLITS)}"
    for split, names in plan.items():
        if not isinstance(names, list) or not all(isinstance(n, str) and mf.PLAIN_NAME.fullmatch(n) for n in names):
            return f"plan of {split!r} is not a list of shard file names"
    return ""


# ---------------------------------------------------------------- temporaries


def remove_temporaries(out: Path) -> list[str]:
    """Delete the temporaries in `out` and its build state (only safe while holding the lock alone: then
    no live build is writing any); returns their names."""
    found = temporaries(out)
    for name in found:
        (out / name).unlink(missing_ok=True)
    return found


def temporaries(out: Path) -> list[str]:
    """Names (relative to `out`) of temporaries a killed or failed build left in `out` and its build state."""
    names = []
    for directory in (out, out / STATE_DIR):
        if directory.is_dir():
            names += [str(p.relative_to(out)) for p in sorted(directory.iterdir()) if files.is_temporary(p.name)]
    return names


# ---------------------------------------------------------------- shard records


def record_path(out: Path, name: str) -> Path:
    return out / STATE_DIR / f"{name}.json"


def complete(out: Path, name: str) -> bool:
    """A shard from an earlier (killed) run is kept only if its record and sha256 match the file."""
    try:
        record = load_shard_record(out, name)
    except UserError:  # unreadable or malformed: the build rewrites the shard
        return False
    return record is not None and matches(out / name, record, rehash=True)


def matches(path: Path, record: dict[str, Any], rehash: bool) -> bool:
    return (path.is_file() and path.stat().st_size == record["bytes"]
            and (not rehash or files.sha256_file(path) == record["sha256"]))


def load_shard_record(out: Path, name: str) -> dict[str, Any] | None:
    """The record a build wrote for shard `name`: None if absent; UserError naming the file if unreadable
    or malformed."""
    path = record_path(out, name)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable shard record ({e}); re-run its build job") from None
    problem = _record_problem(record, name)
    if problem:
        raise UserError(f"{path}: malformed shard record ({problem}); re-run its build job")
    return record


def _record_problem(record: Any, name: str) -> str:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    missing = [k for k in ("name", "num_samples", "bytes", "sha256", "class_counts", "skipped") if k not in record]
    if missing:
        return f"missing {', '.join(missing)}"
    if record["name"] != name:
        return f"it names {record['name']!r}"
    if not (mf.is_count(record["num_samples"]) and mf.is_count(record["bytes"])
            and isinstance(record["sha256"], str) and mf.SHA256_HEX.fullmatch(record["sha256"])):
        return "num_samples, bytes or sha256 of the wrong type"
    if not (isinstance(record["class_counts"], list) and all(map(mf.is_count, record["class_counts"]))
            and isinstance(record["skipped"], list)):
        return "class_counts or skipped of the wrong type"
    return ""


# ---------------------------------------------------------------- part markers


@dataclass(frozen=True)
class Marker:
    """A finished job's part file, `job-III-of-JJJ.json`."""

    path: Path
    index: int
    total: int


def write_marker(out: Path, job_index: int, num_jobs: int, shards: list[str]) -> None:
    files.write_json_atomic(out / STATE_DIR / f"job-{job_index:03d}-of-{num_jobs:03d}.json", {"shards": shards})


def markers(out: Path) -> list[Marker]:
    """Every part marker; a file named like one but not parseable is an error naming it."""
    found = []
    for path in sorted((out / STATE_DIR).glob("job-*")):
        match = MARKER.fullmatch(path.name)
        index, total = (int(match[1]), int(match[2])) if match else (-1, 0)
        if not 0 <= index < total:
            raise UserError(f"{path}: not a part marker of this tool (expected job-III-of-JJJ.json with "
                            "III < JJJ); remove it and re-run the build job that should have written it")
        found.append(Marker(path, index, total))
    return found
