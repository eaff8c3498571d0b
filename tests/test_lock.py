"""pipeline.lock between real processes: equal holders share, others are refused with one line naming the
holder and what differs, exclusive means alone, and a killed holder never blocks the next one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, assert_one_line_error, cli_env

from pipeline.errors import UserError
from pipeline.lock import acquire, read_holder

HOLD = """
import json, os, sys, time
from pipeline.errors import report_errors
from pipeline.lock import acquire

def run():
    with acquire(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), what="the set") as held:
        if len(sys.argv) > 4:  # a forked worker that outlives this process
            child = os.fork()
            if child == 0:
                for fd in (0, 1, 2):  # let go of the test's pipes
                    os.dup2(os.open(os.devnull, os.O_RDWR), fd)
                time.sleep(float(sys.argv[4]))
                os._exit(0)
            print(child, end=" ", flush=True)
        print("first" if held.first else "joined", flush=True)
        sys.stdin.read()  # hold until the test closes stdin
    return 0

sys.exit(report_errors(run))
"""


class Holder:
    """A process holding (or trying to take) the lock; `release` lets it go."""

    def __init__(self, path: Path, mode: str, info: dict[str, Any], *fork_for: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), mode, json.dumps(info), *fork_for],
                                     cwd=ROOT, env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        *child, self.state = self.proc.stdout.readline().split() or [""]  # "first", "joined", or "" if it exited
        self.child = int(child[0]) if child else None

    def release(self) -> subprocess.CompletedProcess:
        out, err = self.proc.communicate("", timeout=30)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.state + out, err)

    def refused(self) -> subprocess.CompletedProcess:
        assert self.state == "", f"took the lock ({self.state})"
        return self.release()


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    return tmp_path / "set" / ".build" / "lock"


def test_equal_holders_share_and_others_are_refused(lock_path: Path) -> None:
    info = {"options": {"quality": 95}, "num_jobs": 2}
    first = Holder(lock_path, "shared", info)
    assert first.state == "first"
    holder = read_holder(lock_path)
    assert (holder["pid"], holder["host"], holder["mode"], holder["info"]) == (
        first.proc.pid, socket.gethostname(), "shared", info)
    second = Holder(lock_path, "shared", info)
    assert second.state == "joined"

    other = Holder(lock_path, "shared", {"options": {"quality": 60}, "num_jobs": 2}).refused()
    assert_one_line_error(other, f"the set is in use by pid {first.proc.pid} on {socket.gethostname()} (python",
                          "with options.quality=95 (here 60); wait for it to finish")
    alone = Holder(lock_path, "exclusive", {"command": "merge"}).refused()
    line = assert_one_line_error(alone, f"pid {first.proc.pid}")
    assert " with " not in line  # another kind of holder: nothing to compare

    assert first.release().returncode == 0  # the second still holds it
    assert_one_line_error(Holder(lock_path, "shared", {"options": {"quality": 60}, "num_jobs": 3}).refused(),
                          "options.quality=95 (here 60), num_jobs=2 (here 3)")
    assert second.release().returncode == 0
    assert read_holder(lock_path) is None  # the last one out removed the record
    third = Holder(lock_path, "shared", {"options": {"quality": 60}, "num_jobs": 3})
    assert third.state == "first"
    assert third.release().returncode == 0


def test_exclusive_admits_one(lock_path: Path) -> None:
    first = Holder(lock_path, "exclusive", {"command": "merge"})
    assert first.state == "first"
    assert_one_line_error(Holder(lock_path, "exclusive", {"command": "merge"}).refused(),
                          f"pid {first.proc.pid}", "with the same settings")
    assert_one_line_error(Holder(lock_path, "shared", {"command": "merge"}).refused(), f"pid {first.proc.pid}")
    assert first.release().returncode == 0
    again = Holder(lock_path, "exclusive", {"command": "merge"})
    assert again.state == "first"
    again.release()


def test_a_killed_holder_never_blocks(lock_path: Path) -> None:
    first = Holder(lock_path, "exclusive", {"n": 1})
    assert first.state == "first"
    first.proc.send_signal(signal.SIGKILL)
    first.release()
    assert read_holder(lock_path)["pid"] == first.proc.pid  # a stale record stays, but the lock is free
    after = Holder(lock_path, "shared", {"n": 2})
    assert after.state == "first"
    assert read_holder(lock_path)["pid"] == after.proc.pid
    after.release()


def test_a_forked_child_does_not_keep_a_killed_parents_lock(lock_path: Path) -> None:
    first = Holder(lock_path, "exclusive", {"n": 1}, "60")
    assert first.state == "first" and first.child
    try:
        first.proc.send_signal(signal.SIGKILL)
        first.release()
        os.kill(first.child, 0)  # the child still runs (and still has the lock file open)...
        after = Holder(lock_path, "exclusive", {"n": 1})
        assert after.state == "first"  # ...but holds no lock
        after.release()
    finally:
        os.kill(first.child, signal.SIGKILL)


def test_when_alone_runs_only_in_the_first_holder(lock_path: Path) -> None:
    calls = []
    info = {"n": 1}
    other = Holder(lock_path, "shared", info)
    with acquire(lock_path, "shared", info, when_alone=lambda: calls.append("alone")) as held:
        assert not held.first
    assert calls == []
    other.release()
    with acquire(lock_path, "shared", info, when_alone=lambda: calls.append("alone")) as held:
        assert held.first
    assert calls == ["alone"]


def test_a_lock_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError) as error, acquire(tmp_path / "file" / ".build" / "lock", "exclusive", {}):
        pass
    assert str(error.value) == f"{tmp_path / 'file' / '.build'}: cannot create (Not a directory)"
