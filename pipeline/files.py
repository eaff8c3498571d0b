"""Writing files so that nothing is ever half-written, and hashing them: the one home of temporary names,
temporary-then-rename, whole-directory swaps and file sha256s for both packages.

A file is written under `.NAME.tmp-PID` beside its final name (hidden, so globs for the real files never see
it; tagged with the writer's pid, so a cleanup can tell whose it is), synced, then renamed over the final
name. A directory being replaced is first moved aside to `.NAME.old-PID`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.errors import UserError

TEMPORARY_MARK = ".tmp-"  # `.NAME.tmp-PID`: what is written before the rename to NAME
ASIDE_MARK = ".old-"  # `.NAME.old-PID`: a directory moved aside by replace_dir until the new one is in place


def temporary_name(path: Path) -> Path:
    """The name a file is written under before it is renamed to `path` (hidden, tagged with this pid)."""
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")


def is_temporary(name: str) -> bool:
    return name.startswith(".") and TEMPORARY_MARK in name


def temporaries(directory: Path, name: str = "*", pid: int | str = "*") -> list[Path]:
    """The temporaries in `directory` of the file `name`, written by process `pid` (`*`: any)."""
    return sorted(directory.glob(f".{name}{TEMPORARY_MARK}{pid}"))


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` for the block to write to; renamed to `path` when the block ends
    normally. Whatever stops the block (an error, Ctrl-C) removes the temporary instead: `path` is always
    the old file or the whole new one."""
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:  # gone after the rename
        remove_quietly(tmp)


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to a temporary name in the same directory, fsync, then rename over `path`. A failed
    write (a full disk, a quota) removes the temporary and raises one line naming `path` and the reason."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def remove_quietly(path: Path) -> None:
    """Best-effort removal of a temporary while another error is being reported: that error is the news."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def replace_dir(src: Path, final: Path) -> None:
    """Rename the finished directory `src` to `final`; an old `final` is moved aside first, then deleted,
    so `final` is always either the old or the new whole directory."""
    old = final.with_name(f".{final.name}{ASIDE_MARK}{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(src, final)
    except OSError:
        if old.exists():
            os.replace(old, final)  # put the old one back rather than leave nothing
        raise
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return sha256_of(f)


def sha256_of(file: BinaryIO) -> str:
    """The sha256 of what is left to read in the open binary `file` (read to its end)."""
    digest = hashlib.sha256()
    for block in iter(lambda: file.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()
