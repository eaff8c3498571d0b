"""`python -m train ARGS` (and the tests' helper scripts) without the interpreter start-up: a server process
imports torch, torchvision and Albumentations once (~3-4 s a cold `python -m train` pays before its first
line of work), then forks a fresh child for each command, which applies the command's environment, working
directory and output files, and runs `train` as `python -m train` does (runpy, `__main__`, its exit status).
Nothing of ours is imported before the fork: every child imports the checkout's modules itself, as a new
interpreter would.

Only what those libraries read when they are imported is shared, so a command that needs another value of it
runs cold: the OpenMP thread count is set again in each child from its OMP_NUM_THREADS (torch read the
server's at import). `start` leaves a command running (in a session of its own if asked), for tests that
signal or kill it; launchers, and processes a test looks up by their environment, start as real
interpreters (tests/procs.py).

    python tests/warm.py SOCKET      # the server; support.run_cli starts one per test process, stops it by PID
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

PRELOAD = ("torch", "torch._dynamo", "torchvision", "albumentations", "cv2", "simplejpeg", "numpy")


def serve(path: str) -> None:
    """Accept one request per connection: fork a reporter, which forks the command, sends its pid, waits for
    it and sends its exit status; the server itself goes straight back to accept (it never waits)."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # reporters are reaped by the kernel
    parent = os.getppid()
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(16)
        server.settimeout(5)
        print("ready", flush=True)
        while True:
            try:
                connection, _ = server.accept()
            except TimeoutError:
                if os.getppid() != parent:  # the test process died without stopping us: nobody will ask again
                    os.unlink(path)
                    return
                continue
            connection.settimeout(None)
            request = json.loads(connection.makefile().readline())
            sys.stdout.flush()
            sys.stderr.flush()
            if os.fork() == 0:
                server.close()
                _report(connection, request)  # never returns
            connection.close()


def _report(connection: socket.socket, request: dict) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # this process waits for its command
    pid = os.fork()
    if pid == 0:
        connection.close()
        _run_command(request)  # never returns
    connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    connection.sendall(json.dumps({"returncode": code}).encode() + b"\n")
    connection.close()
    os._exit(0)


def _run_command(request: dict) -> None:
    """This process becomes `python -m MODULE ARGS` (or `python SCRIPT.py ARGS`) in the request's directory,
    environment and files."""
    import runpy

    import torch

    for fd, path in ((0, os.devnull), (1, request["stdout"]), (2, request["stderr"])):
        if fd == 2 and path == request["stdout"]:  # one log for both, as stderr=subprocess.STDOUT gives
            os.dup2(1, 2)
            continue
        file = os.open(path, os.O_RDWR)
        os.dup2(file, fd)
        os.close(file)
    if request["session"]:  # a process group of its own (and its DataLoader workers'), as start_new_session
        os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:  # what torch would have read at import (else its default)
        torch.set_num_threads(int(threads))
    command, *sys.argv[1:] = request["args"]
    if command.endswith(".py"):  # `python SCRIPT`: the script's folder first on the path
        sys.argv[0] = command
        sys.path[0] = os.path.dirname(os.path.abspath(command))
        runpy.run_path(command, run_name="__main__")
    else:  # `python -m MODULE`: the working directory first
        sys.path[0] = os.getcwd()
        runpy.run_module(command, run_name="__main__", alter_sys=True)
    sys.exit(0)  # the interpreter ends here as after `python -m train`: atexit handlers, flushed streams


class Started:
    """A command the server forked, not waited for: what the tests use of subprocess.Popen (pid, poll, wait,
    returncode, send_signal, kill). Its exit status arrives on the connection."""

    def __init__(self, connection: socket.socket, args: list[str]) -> None:
        self.connection, self.args = connection, args
        self.replies = connection.makefile()
        self.pid: int = json.loads(self.replies.readline())["pid"]
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self.connection], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = json.loads(self.replies.readline())["returncode"]
            self.connection.close()
        return self.returncode

    def poll(self) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.wait(0)
        return None

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Server:
    """The warm server of this test process, started on first use and stopped at exit (by PID)."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="cubstream-warm-")
        self.path = os.path.join(self.folder, "socket")
        self.process = subprocess.Popen([sys.executable, __file__, self.path], stdout=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the warm server did not start (exit {self.process.wait()})")

    def start(self, args: list[str], env: dict[str, str], cwd: Path, stdout: str, stderr: str,
              session: bool = False) -> Started:
        """`python -m ARGS` (`python ARGS` for a script) forked, output to the files `stdout` and `stderr` (the
        same path: one file), in a session of its own if `session`; not waited for."""
        connection = socket.socket(socket.AF_UNIX)
        connection.connect(self.path)
        connection.sendall(json.dumps({"args": args, "env": env, "cwd": str(cwd), "stdout": stdout,
                                       "stderr": stderr, "session": session}).encode() + b"\n")
        command = [sys.executable, *args] if args[0].endswith(".py") else [sys.executable, "-m", *args]
        return Started(connection, command)

    def run(self, args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(dir=self.folder) as outputs:
            out, err = os.path.join(outputs, "stdout"), os.path.join(outputs, "stderr")
            Path(out).touch()
            Path(err).touch()
            process = self.start(args, env, cwd, out, err)
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                raise
            return subprocess.CompletedProcess(process.args, code, Path(out).read_text(), Path(err).read_text())

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.folder)


if __name__ == "__main__":
    serve(sys.argv[1])
