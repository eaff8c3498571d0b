"""What tests share: CLI runs (as subprocesses or in-process), subprocess environments, free ports, and
loopback HTTP servers that a test starts and stops itself. Fixtures live in conftest.py; plain helpers here."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# One OpenMP thread per test subprocess: on the 2 shared cores, torch's 2 spinning threads run 2-3x slower
# as soon as another process is busy (measured: lr-find 27 s with 1 thread, 77 s with 2, next to a busy loop).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- processes and CLIs


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `python -m ...` test subprocess: this checkout importable, no update checks."""
    return {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(ROOT), **extra}


def launch_env(tmp: Path, **extra: str) -> dict[str, str]:
    """For multi-process runs: CPU only, one thread per process (2 shared cores), no W&B, and no user-level
    accelerate config (HF_HOME points into the test's directory)."""
    return cli_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true", WANDB_MODE="disabled",
                   WANDB_SILENT="true", HF_HOME=str(tmp / "hf_home"), PYTHONUNBUFFERED="1", **extra)


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m ...` as a user would; output captured as text."""
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(**(env or {})), cwd=cwd or ROOT)


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess:
    """`python -m train ARGS` inside the test process (no interpreter start-up, no torch re-import), for
    commands that fail before any work and for the single-process ones (predict, export); shaped like
    `run_cli`'s result."""
    from train.__main__ import main

    capsys.readouterr()  # drop what earlier code printed
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse errors
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["train", *args], code, captured.out, captured.err)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """A user error: non-zero exit, no traceback, one `error:` line naming the problem."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_png(path: Path, min_width: int = 200, min_height: int = 150) -> None:
    """A real plot: a PNG of a sensible size that is not a single colour."""
    from PIL import Image

    assert path.is_file(), f"{path} missing"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_width and image.height >= min_height, image.size
        low, high = image.convert("L").getextrema()
        assert low < high, f"{path} is a single colour"
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or range(1 << 20)) > 16


# ---------------------------------------------------------------- loopback HTTP


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory, with faults by file name: `missing` answers 404, `cut` sends the full
    Content-Length and hangs up after half the body, `stall` sends the headers and a few bytes, then nothing
    until the server stops. Every requested path is recorded in the server's `requests`."""

    server: LoopbackServer

    def log_message(self, *args: object) -> None:
        """Keep test output quiet."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self.server.requests.append(self.path)
        name = self.path.split("?")[0].rsplit("/", 1)[-1]
        if name in self.server.missing:
            self.send_error(404)
            return
        if name not in self.server.cut and name not in self.server.stall:
            super().do_GET()
            return
        payload = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if name in self.server.cut:
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload[:16])
        self.wfile.flush()
        self.server.stopping.wait()  # the stall: nothing more until the test stops the server
        self.close_connection = True


class LoopbackServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, directory: Path, handler: type[Handler] = Handler) -> None:
        super().__init__(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
        self.missing: set[str] = set()
        self.cut: set[str] = set()
        self.stall: set[str] = set()
        self.requests: list[str] = []
        self.stopping = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextlib.contextmanager
def serve(directory: Path, handler: type[Handler] = Handler) -> Iterator[LoopbackServer]:
    """A loopback HTTP server over `directory` for the duration of the `with`; stopped (stalled requests
    released) and its port closed on exit."""
    server = LoopbackServer(directory, handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def wait_for(condition: callable, timeout: float, what: str) -> None:
    """Poll `condition` until true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
