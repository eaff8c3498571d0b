"""Subprocesses for multi-process tests, output to a log file, never left behind: every process a test
starts, and everything those start (launcher -> ranks in their own sessions -> DataLoader workers), carries
a tag in its environment, and cleanup SIGKILLs exactly the processes with that tag, by pid."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import warm
from support import ROOT, start_warm

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
# `accelerate launch` without the rest of accelerate's command line: the same launch_command, but the
# `accelerate` script loads all its subcommands first, and `estimate` imports timm and torchvision (2.7 s of
# CPU per launch here). tests/test_configs.py runs the `accelerate launch` script itself.
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
TAG = "CUBSTREAM_TEST_GROUP"


def launch_args(num_processes: int, port: int, num_machines: int = 1, machine_rank: int = 0) -> list[str]:
    """`accelerate launch` (LAUNCH) for N CPU processes: `--multi_gpu` with ACCELERATE_USE_CPU
    (support.launch_env); `--cpu --num_processes N` would silently run ONE process."""
    args = [*LAUNCH, "--multi_gpu", "--num_processes", str(num_processes), "--num_machines",
            str(num_machines), "--main_process_port", str(port), "--mixed_precision", "no",
            "--dynamo_backend", "no"]
    if num_machines > 1:
        args += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    return args


class Group:
    """Processes started together; `finish` waits for all of them; leaving the `with` kills what is left."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen | warm.Started] = []
        self.names: list[str] = []
        self.tag = uuid.uuid4().hex

    def start(self, name: str, command: Sequence[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "w") as log:
            proc = subprocess.Popen(list(command), env={**env, TAG: self.tag}, cwd=cwd, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self.names.append(name)
        return proc

    def start_warm(self, name: str, args: Sequence[str], env: dict[str, str]) -> warm.Started:
        """`python -m ARGS` (or `python SCRIPT.py ARGS`) forked from the warm interpreter (support.start_warm)
        in a session of its own, into the same kind of log; `kill` ends its process group (its environment
        has no tag to find)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        log.write_text("")
        proc = start_warm(*args, env=env, stdout=log, stderr=log, session=True)
        self.procs.append(proc)
        self.names.append(name)
        return proc

    def output(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def finish(self, timeout: float) -> list[int]:
        """Return codes of every process; AssertionError (with their output) if any runs past `timeout`."""
        deadline = time.monotonic() + timeout
        for name, proc in zip(self.names, self.procs, strict=True):
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.kill()
                tails = "\n".join(f"--- {n}:\n{self.output(n)[-2000:]}" for n in self.names)
                raise AssertionError(f"{name} still running after {timeout:.0f} s; killed all\n{tails}") from None
        return [proc.returncode for proc in self.procs]

    def tagged(self) -> list[psutil.Process]:
        """Every live process started by this group, directly or not."""
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.environ().get(TAG) == self.tag:
                    found.append(process)
        return found

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for process in self.tagged():
            with contextlib.suppress(psutil.Error):
                process.kill()
        for proc in self.procs:
            proc.wait()

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


@contextlib.contextmanager
def group(logs: Path) -> Iterator[Group]:
    with Group(logs) as g:
        yield g
