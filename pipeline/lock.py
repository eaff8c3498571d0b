"""Advisory locks on a directory's lock file, held for a whole command, refusals naming the holder.

`acquire(path, "exclusive", info)` admits one process. `acquire(path, "shared", info)` admits any number of
processes that pass equal `info` (the jobs of one multi-job build, the ranks of one run) and refuses every
other. The locks are `flock`s, so the kernel drops them when a process dies: a killed command never blocks
a rerun, and no stale-lock cleanup exists. Linux emulates `flock` on NFS with POSIX locks, so jobs on
several hosts sharing a filesystem see each other's locks.

Files next to `path`: `path` itself (the lock), `path.meta` (a short lock serialising every decision, so a
lock is never seen half-taken or half-converted) and `path.holder` (JSON: `info`, mode, host, pid and
command of the process that took the lock first, for error messages). None is ever deleted while in use:
deleting a lock file that others hold open would let a newcomer lock a fresh file beside them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import UserError
from pipeline.files import write_json_atomic

Mode = Literal["exclusive", "shared"]
META_WAIT_S = 60.0  # the decision lock is held only while deciding; only a stopped process keeps it longer
MAX_COMMAND_CHARS = 160


class LockHeld(UserError):
    """Another process holds the lock in a way that excludes this one; the message names it."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)  # args stay (message,), so the error pickles like any UserError
        self.holder = holder or {}


@dataclass
class Held:
    """What `acquire` yields: `first` is true when this process found the lock free (nobody else held it)."""

    path: Path
    mode: Mode
    first: bool


_held: dict[int, int] = {}  # lock fd -> pid of the process that took the lock


def _forget_in_child() -> None:
    """A forked child (a pool or DataLoader worker) closes its copies of the lock fds: a flock belongs to the
    open file, so a child outliving a killed parent would otherwise keep the lock taken."""
    for fd in list(_held):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def holder_path(path: Path) -> Path:
    return path.with_name(path.name + ".holder")


@contextlib.contextmanager
def acquire(path: str | os.PathLike[str], mode: Mode, info: dict[str, Any], *, what: str = "",
            when_alone: Callable[[], None] | None = None) -> Iterator[Held]:
    """Hold the lock at `path` for the `with` block, or raise LockHeld naming the holder and what differs.

    `info` must be JSON-serialisable; in "shared" mode it decides who may join (equal `info` only).
    `when_alone` runs once, before the block, in the process that found the lock free, while no other
    process can hold or join it (e.g. to remove temporary files that only a dead process can have left).
    `what` names the guarded thing in messages (default: the lock's directory). The parent directory is
    created if needed.
    """
    path = Path(path)
    what = what or str(path.parent)
    _make_parent(path)
    fd = open_lock(path)
    _held[fd] = os.getpid()
    try:
        with _decision(path) as decided:
            if not decided:
                raise UserError(f"{path}.meta: still locked after {META_WAIT_S:.0f} s by a stopped or hung process")
            held = _take(fd, path, mode, info, what)
            if held.first and when_alone is not None:
                when_alone()
            if held.first and mode == "shared":
                fcntl.flock(fd, fcntl.LOCK_SH)  # a downgrade; safe because every newcomer waits on _decision
        yield held
    finally:
        _release(fd, path)


def read_holder(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The holder record next to the lock at `path` (None if absent or unreadable)."""
    try:
        record = json.loads(holder_path(Path(path)).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path.parent}: cannot create ({e.strerror or e})") from None


def open_lock(path: Path) -> int:
    """The lock file at `path`, opened (created if missing); one line naming it if that fails."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"{path}: cannot open lock file ({e.strerror or e})") from None


@contextlib.contextmanager
def _decision(path: Path, wait_s: float = META_WAIT_S) -> Iterator[bool]:
    """Hold the decision lock; yields False if it stayed taken for `wait_s` (a stopped or hung process)."""
    meta = open_lock(path.with_name(path.name + ".meta"))
    try:
        deadline = time.monotonic() + wait_s
        while not (taken := _try_lock(meta, fcntl.LOCK_EX, path)) and time.monotonic() < deadline:
            time.sleep(0.02)
        yield taken
    finally:
        os.close(meta)  # closing drops the lock


def lock_fd(fd: int, path: Path, *, shared: bool, wait: bool) -> bool:
    """A plain `flock` on the open lock file `fd` (of `path`, for messages), shared or exclusive, converting a
    lock this fd already holds; with `wait` it blocks until granted, else False when another process holds
    a conflicting lock. No holder record: for short, frequent locks whose holders never need naming."""
    kind = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    if not wait:
        return _try_lock(fd, kind, path)
    try:
        fcntl.flock(fd, kind)
    except OSError as e:
        raise UserError(f"{path}: cannot lock ({e.strerror}); this filesystem may not support file locks") from None
    return True


def _try_lock(fd: int, kind: int, path: Path) -> bool:
    """Take the lock without waiting; False if another process holds it."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise UserError(f"{path}: cannot lock ({e.strerror}); this filesystem may not support file locks") from None
    return True


def _take(fd: int, path: Path, mode: Mode, info: dict[str, Any], what: str) -> Held:
    if _try_lock(fd, fcntl.LOCK_EX, path):
        _write_holder(path, mode, info)
        return Held(path, mode, first=True)
    holder = read_holder(path) or {}
    joinable = mode == "shared" and holder.get("mode") == "shared" and holder.get("info") == _normal(info)
    if joinable and _try_lock(fd, fcntl.LOCK_SH, path):
        return Held(path, mode, first=False)
    raise LockHeld(_refusal(path, what, holder, info), holder)


def _write_holder(path: Path, mode: Mode, info: dict[str, Any]) -> None:
    record = {"mode": mode, "info": _normal(info), "host": socket.gethostname(), "pid": os.getpid(),
              "command": _command(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json_atomic(holder_path(path), record)


def _normal(info: dict[str, Any]) -> Any:
    """`info` as it reads back from JSON (tuples become lists), so equal infos compare equal."""
    return json.loads(json.dumps(info))


def _refusal(path: Path, what: str, holder: dict[str, Any], info: dict[str, Any]) -> str:
    if not holder:
        return f"{what} is in use by another process ({holder_path(path)} does not say which)"
    command = str(holder.get("command", "?"))
    if len(command) > MAX_COMMAND_CHARS:
        command = command[:MAX_COMMAND_CHARS - 3] + "..."
    line = f"{what} is in use by pid {holder.get('pid')} on {holder.get('host')} ({command})"
    theirs = holder.get("info")
    if isinstance(theirs, dict) and theirs.keys() == info.keys():  # the same kind of holder: say what differs
        differences = _differences(theirs, _normal(info))
        line += f" with {', '.join(differences)}" if differences else " with the same settings"
    return line + "; wait for it to finish"


def _command() -> str:
    """This process's command line as typed (`python -m pkg ...` rather than the path of its __main__.py)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "__main__.py":
        argv[:1] = ["-m", Path(argv[0]).parent.name]
    return shlex.join([Path(sys.executable).name, *argv])


def _differences(theirs: Any, ours: Any, prefix: str = "") -> list[str]:
    """Readable differences between two JSON values: `key=theirs (here ours)`, nested keys dotted."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        found = []
        for key in list(dict.fromkeys([*theirs, *ours])):
            found += _differences(theirs.get(key), ours.get(key), f"{prefix}{key}.")
        return found
    if theirs == ours:
        return []
    name = prefix.rstrip(".") or "settings"
    if len(repr(theirs)) + len(repr(ours)) > 60:
        return [f"another {name}"]
    return [f"{name}={theirs!r} (here {ours!r})"]


def _release(fd: int, path: Path) -> None:
    """Drop the lock; the last holder out also removes the holder record, so a stale one never lingers."""
    if _held.pop(fd, None) != os.getpid():
        return  # a forked child leaving the block: the fd was closed at the fork, the lock is the parent's
    try:
        with _decision(path) as decided:
            fcntl.flock(fd, fcntl.LOCK_UN)
            if decided and _try_lock(fd, fcntl.LOCK_EX, path):  # without the decision lock, leave the record be
                holder_path(path).unlink(missing_ok=True)
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
