"""Whether a checkpoint's files are whole: the structure of safetensors and torch files, the sha256 of each
file recorded when it was saved (a file damaged in place keeps its size and its structure), and weights that
hold only finite numbers (training never saves NaN or inf, so such a file is damaged).

`seal` flushes a finished checkpoint's files to disk and returns their sha256 for its metadata (trainer.json,
meta.json); `recorded_problem` checks them again. Checkpoints written before sha256 were recorded have none:
they still load, checked for structure and, for the weights, for finite numbers."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.errors import one_line
from pipeline.files import sha256_file

FILES = "files"  # the metadata key holding {file name: sha256}


def seal(folder: Path) -> dict[str, str]:
    """fsync every file of `folder` (so the rename that publishes it never exposes unwritten data after a
    crash) and return {name: sha256}, for its metadata."""
    hashes = {}
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            hashes[path.name] = sha256_file(path)
    return hashes


def sync_dir(folder: Path) -> None:
    """fsync a directory: its entries (a rename into it) are on disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recorded_problem(folder: Path, recorded: Any) -> str | None:
    """Why the files of `folder` are not those whose sha256 were recorded at save, or None."""
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        return f"the recorded file checksums ({FILES!r}) are damaged"
    for name, digest in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} is damaged (its sha256 differs from the one recorded when it was saved)"
    return None


def file_problem(path: Path) -> str | None:
    """Why a checkpoint file is unusable by its structure (missing, cut short, no zip directory), or None."""
    if not path.is_file():
        return "is missing"
    try:
        if path.suffix == ".safetensors":
            return _safetensors_problem(path)
        with zipfile.ZipFile(path) as archive:  # torch.save's format; a cut file has no central directory
            if not archive.namelist():
                return "is empty"
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        return f"is unreadable ({one_line(e)})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header of tensor offsets, then the data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8 or struct.unpack("<Q", head)[0] > size - 8:
            return f"is truncated ({size} bytes)"
        header = json.loads(f.read(struct.unpack("<Q", head)[0]))
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + struct.unpack("<Q", head)[0] + max(ends, default=0)
    if size != expected:
        return f"is truncated ({size} of {expected} bytes)"
    return None


def weights_problem(path: Path) -> str | None:
    """Why a safetensors file of weights is unusable: its structure, or tensors that are not all finite."""
    problem = file_problem(path)
    if problem:
        return problem
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        return f"is unreadable ({one_line(e)})"
    problem = nonfinite_problem(tensors)
    return f"{problem} (damaged: training never saves such weights)" if problem else None


def nonfinite_problem(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """'holds NaN or inf in N tensor(s) (first: NAME)' when some floating tensor is not all finite, or None."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not bad:
        return None
    return f"holds NaN or inf in {len(bad)} tensor(s) (first: {bad[0]})"
