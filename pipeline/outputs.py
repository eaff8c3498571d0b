"""Checks of where a command will write, made before any work and without creating anything: a run that
would fail on its output path after an hour of work fails in its first second instead."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def output_dir_problem(path: Path, option: str) -> str | None:
    """Why `path` cannot be, or become, a directory this command writes into; found before any work and
    without creating it (a probe file is created and removed in its nearest existing ancestor)."""
    if path.exists() and not path.is_dir():
        return f"{option} {path}: exists and is not a directory"
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{option} {path}: {ancestor} is not a directory"
    try:
        handle, probe = tempfile.mkstemp(dir=ancestor, prefix=".write-probe-")
    except OSError as e:
        return f"{option} {path}: cannot write in {ancestor} ({e.strerror or e})"
    os.close(handle)
    os.unlink(probe)
    return None


def output_file_problem(path: Path, option: str) -> str | None:
    """Why a file cannot be written at `path` (replacing a regular file is fine), before any work."""
    if path.is_dir():
        return f"{option} {path}: is a directory (name the file to write)"
    if path.exists() and not path.is_file():
        return f"{option} {path}: exists and is not a regular file"
    return output_dir_problem(path.parent, option) if str(path.parent) else None
