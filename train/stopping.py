"""Stopping `fit` cleanly on a signal: the handler only records the request; the training loop asks every
process at each optimizer step (one small all-reduce) so that all of them stop at the same step, write a
complete checkpoint there and exit with STOP_EXIT.

A second stop signal, or the --stop-grace deadline after the first, ends the process at once with status
128 + the signal's number, as a shell reports a process that signal killed (no stop checkpoint; the previous
complete checkpoint stays, since checkpoints are written to a temporary directory and renamed).

A process torchrun started whose launcher dies first stops as on its first stop signal."""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

from pipeline.errors import print_error

STOP_EXIT = 75  # EX_TEMPFAIL: stopped on request with a checkpoint written; rerun with --resume auto
DEFAULT_SIGNALS = "TERM,INT,USR1"

# The signals of the running fit, read by DataLoader workers (forked after install) to ignore them.
ACTIVE: tuple[int, ...] = ()
_REQUEST: StopRequest | None = None
# One shared byte, set to 1 when the training process got a stop signal: a forked worker reads it to tell a
# stop signal (sent to the whole process group) from its parent's own SIGTERM that ends it.
_SHARED = mmap.mmap(-1, 1)
WORKER_WAIT_S = 2.0  # how long a worker waits for its parent to take a SIGTERM as a stop request
_PARENT = os.getppid()  # at import, early in the process: the launcher, for a process torchrun started
LAUNCHER_POLL_S = 1.0


class Stopped(Exception):  # noqa: N818 - not an error: the run did what was asked
    """Raised by the training loop once the stop checkpoint is written, with the line to print (empty in
    processes other than the main one); main() turns it into STOP_EXIT."""


def parse_signals(text: str) -> list[signal.Signals]:
    """"TERM,INT,USR1" (SIG prefix optional, any case; empty: none) -> signals; ValueError naming a bad one."""
    found: list[signal.Signals] = []
    for name in filter(None, (part.strip().upper() for part in text.split(","))):
        full = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal.Signals, full, None)
        if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"{name!r} is not a signal that can be caught")
        if sig not in found:
            found.append(sig)
    return found


class StopRequest:
    """The first stop signal this process got (0: none yet)."""

    def __init__(self, grace: float) -> None:
        self.signum = 0
        self.grace = grace
        self.timer: threading.Timer | None = None

    def handle(self, signum: int, frame: object) -> None:
        if self.signum:  # the second stop signal
            _exit_now(signum, f"second stop signal ({signal.Signals(signum).name})")
        self.signum = signum
        _SHARED[0] = 1
        if self.grace > 0:
            self.timer = threading.Timer(self.grace, self._expire)
            self.timer.daemon = True
            self.timer.start()

    def _expire(self) -> None:
        """From the timer thread, so it works while the main thread waits in a collective or a read."""
        _exit_now(self.signum, f"--stop-grace {self.grace:g} s passed after {signal.Signals(self.signum).name}")


def _exit_now(signum: int, why: str) -> None:
    """End the process at once with status 128 + signum (a shell's status for a process the signal killed)."""
    print_error(f"{why}; exiting without a stop checkpoint (the last complete checkpoint stays)")
    sys.stdout.flush()
    os._exit(128 + signum)


@contextlib.contextmanager
def installed(names: str, grace: float) -> Iterator[StopRequest]:
    """Handle the stop signals `names` while the block runs (main thread only); restore the handlers after."""
    global ACTIVE, _REQUEST
    request = StopRequest(grace)
    signals = parse_signals(names)
    previous = {sig: signal.signal(sig, request.handle) for sig in signals}
    ACTIVE, _REQUEST = tuple(signals), request
    _SHARED[0] = 0
    done = threading.Event()
    if signals and "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun
        threading.Thread(target=_watch_launcher, args=(signals[0], done), daemon=True).start()
    try:
        yield request
    finally:
        done.set()
        if request.timer is not None:
            request.timer.cancel()
        ACTIVE, _REQUEST = (), None
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _watch_launcher(sig: int, done: threading.Event) -> None:
    """torchrun starts each process in a session of its own, out of reach of a signal sent to the launcher's
    process group: when the launcher dies first (killed, or by a signal it does not handle), this process
    sends itself `sig` (its first stop signal), once, and stops with a checkpoint instead of training on
    unwatched. (The kernel's parent-death signal would come once per thread of the dying launcher.)"""
    while not done.wait(LAUNCHER_POLL_S):
        if os.getppid() != _PARENT:
            if not requested():  # already stopping: a second signal would end it without the checkpoint
                os.kill(os.getpid(), sig)
            return


def requested() -> int:
    """The stop signal this process got (0: none, or outside `installed`)."""
    return _REQUEST.signum if _REQUEST is not None else 0


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: a terminal's Ctrl-C, or a scheduler's SIGTERM, reaches the whole process
    group; workers leave the stop to the training process, which ends them when it closes its loaders.

    SIGTERM is also how torch and multiprocessing end a worker that does not exit by itself, so a worker
    ignores one SIGTERM only when its parent took it as a stop request, and ends on any other."""
    for sig in ACTIVE:
        signal.signal(sig, _worker_sigterm if sig == signal.SIGTERM else signal.SIG_IGN)


def _worker_sigterm(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_DFL)  # the next SIGTERM ends the worker
    deadline = time.monotonic() + WORKER_WAIT_S
    while not _SHARED[0] and time.monotonic() < deadline:  # the parent may run its handler a little later
        time.sleep(0.01)
    if not _SHARED[0]:  # ended by its parent (or by a signal meant for it alone): exit as asked, status 0,
        os._exit(0)  # which torch's check of its workers takes as an orderly end
