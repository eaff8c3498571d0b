"""What tests share: CLI runs (as subprocesses or in-process), subprocess environments, free ports, and
loopback HTTP servers that a test starts and stops itself. Fixtures live in conftest.py; plain helpers here."""

from __future__ import annotations

import atexit
import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import warm

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# One OpenMP thread per test subprocess: on the 2 shared cores, torch's 2 spinning threads run 2-3x slower
# as soon as another process is busy (measured: lr-find 27 s with 1 thread, 77 s with 2, next to a busy loop).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# The same for the test processes themselves and every subprocess they start, unless the caller chose: with
# `make test`'s two workers each core runs one test, and more threads per process only contend.
os.environ.setdefault("OMP_NUM_THREADS", "1")


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


def run_python(*args: str, timeout: float = 300, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python ARGS` (a script, or `-m MODULE`) in cli_env; output captured as text."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(**(env or {})), cwd=cwd or ROOT)


@functools.cache
def _warm_server() -> warm.Server:
    """This test process's warm server, started on first use and stopped (by PID) at exit."""
    server = warm.Server()
    atexit.register(server.stop)
    return server


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m ARGS` as a user would; output captured as text. `python -m train` is forked from a warm
    interpreter (tests/warm.py: torch is imported once per test process, not per command)."""
    if args[0] != "train":
        return run_python("-m", *args, timeout=timeout, env=env, cwd=cwd)
    return _warm_server().run(list(args), cli_env(**(env or {})), cwd or ROOT, timeout)


def run_script(script: Path, *args: str, timeout: float = 300, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` for a helper script of the tests (a process of its own for what must not run in
    the test process), forked from the warm interpreter like run_cli; output captured as text."""
    return _warm_server().run([str(script), *args], cli_env(**(env or {})), ROOT, timeout)


def start_warm(*args: str, env: dict[str, str], stdout: Path | str = os.devnull, stderr: Path | str = os.devnull,
               session: bool = False) -> warm.Started:
    """Start `python -m ARGS` (or `python SCRIPT.py ARGS`), forked from the warm interpreter like run_cli,
    without waiting for it: for tests that signal or kill it. `session`: in a process group of its own, with
    its DataLoader workers."""
    return _warm_server().start(list(args), cli_env(**env), ROOT, str(stdout), str(stderr), session)


def synth_shards(root: Path, synth_args: dict, options: object) -> Path:
    """A synth CUB under `root` built into `root/shards` (one worker, no progress bar); returns the set."""
    from pipeline.build import build
    from pipeline.synth import synth

    synth(root, progress=False, **synth_args)
    build(root / "CUB_200_2011", root / "shards", options, workers=1, progress=False)
    return root / "shards"


def samples(out: Path) -> dict[str, dict]:
    """key -> sample JSON of every sample in the shard set `out` (keys split from names as webdataset does)."""
    from webdataset.tariterators import base_plus_ext

    found = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, extension = base_plus_ext(member.name)
                if extension == "json":
                    found[key] = json.loads(tar.extractfile(member).read())
    return found


def paths_by_split(out: Path) -> dict[str, set[str]]:
    """split -> the source paths (as the samples record them) of the samples in the shard set `out`."""
    found: dict[str, set[str]] = {"train": set(), "valid": set(), "test": set()}
    for meta in samples(out).values():
        found[meta["split"]].add(meta["path"])
    return found


def run_in_process(capsys: pytest.CaptureFixture[str], main: callable, name: str, *args: str
                   ) -> subprocess.CompletedProcess:
    """A CLI's `main(args)` inside the test process, shaped like `run_cli`'s result (argparse's exit too)."""
    capsys.readouterr()  # drop what earlier code printed
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse errors
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return subprocess.CompletedProcess([name, *args], code, captured.out, captured.err)


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess:
    """`python -m train ARGS` inside the test process (no interpreter start-up, no torch re-import), for
    commands that fail before any work and for the single-process ones (predict, export); shaped like
    `run_cli`'s result."""
    from train.__main__ import main

    return run_in_process(capsys, main, "train", *args)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """A user error: non-zero exit, no traceback, one `error:` line naming the problem."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def same_state(a: object, b: object) -> bool:
    """Deep equality of state dicts (tensors compared exactly, shapes included)."""
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


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


TAIL, TAIL_PAUSE_S = 512, 0.3


class Handler(http.server.BaseHTTPRequestHandler):
    """GET of the server's in-memory `files` (URL path -> bytes) or else of a file under its `directory`;
    `Range: bytes=N-` is answered with 206 (416 from the end on) unless the server's `honour_range` is off
    (http.server's own file handler ignores Range). Faults by file name: `missing` answers 404, `cut` sends
    the full Content-Length and hangs up after half the body, `stall` sends the headers and 16 bytes, then
    nothing until the server stops, `slow_tail` sends the last TAIL bytes only after a pause (a tar ends in
    zero padding, so a reader that stops at the end-of-archive block has stopped reading by then);
    `unavailable[name] = N` answers the next N requests for it with 503;
    `cut_after = N` sends only N body bytes of the next answer, then hangs up. Every request is recorded in
    the server's `log` as (path, Range header, status)."""

    server: LoopbackServer

    def log_message(self, *args: object) -> None:
        """Keep test output quiet."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        path = urllib.parse.unquote(self.path.split("?", 1)[0])
        name = path.rsplit("/", 1)[-1]
        range_header = self.headers.get("Range")
        if self.server.unavailable.get(name, 0) > 0:  # a transient failure that clients may retry
            self.server.unavailable[name] -= 1
            self._answer(path, range_header, 503)
            self.send_error(503)
            return
        body = None if name in self.server.missing else self.server.body(path)
        if body is None:
            self._answer(path, range_header, 404)
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and self.server.honour_range:
            start = int(match.group(1))
            if start >= len(body):
                self._answer(path, range_header, 416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self._answer(path, range_header, 206 if start else 200)
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self._send_body(name, body[start:])

    def do_CONNECT(self) -> None:  # noqa: N802 - the name http.server dispatches to
        """As an https proxy that refuses every tunnel: the target is recorded, the answer is 502, so a client
        told to use this server as its proxy (https_proxy) fails at once, on loopback."""
        self._answer(self.path, None, 502)
        self.send_error(502)

    def _send_body(self, name: str, payload: bytes) -> None:
        cut_after, self.server.cut_after = self.server.cut_after, None
        if name in self.server.cut:
            cut_after = len(payload) // 2
        if name in self.server.stall:
            self.wfile.write(payload[:16])
            self.wfile.flush()
            self.server.stopping.wait()  # the stall: nothing more until the test stops the server
        elif name in self.server.slow_tail:
            self.wfile.write(payload[:-TAIL])
            self.wfile.flush()
            self.server.stopping.wait(TAIL_PAUSE_S)
            self.wfile.write(payload[-TAIL:])
        else:
            self.wfile.write(payload if cut_after is None else payload[:cut_after])
            self.wfile.flush()
        self.close_connection = cut_after is not None or name in self.server.stall

    def _answer(self, path: str, range_header: str | None, status: int) -> None:
        self.server.log.append((path, range_header, status))


class LoopbackServer(http.server.ThreadingHTTPServer):
    """See Handler. `url` is the base URL; `requests` the paths asked for so far, in order."""

    daemon_threads = True

    def __init__(self, directory: Path | None = None, files: dict[str, bytes] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.directory = None if directory is None else Path(directory).resolve()
        self.files: dict[str, bytes] = dict(files or {})
        self.missing: set[str] = set()
        self.cut: set[str] = set()
        self.stall: set[str] = set()
        self.slow_tail: set[str] = set()
        self.unavailable: dict[str, int] = {}  # name -> how many more requests get 503 Service Unavailable
        self.honour_range = True
        self.cut_after: int | None = None
        self.log: list[tuple[str, str | None, int]] = []
        self.stopping = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def requests(self) -> list[str]:
        return [path for path, _, _ in self.log]

    def body(self, path: str) -> bytes | None:
        """The bytes served at URL `path`, or None (404)."""
        if path in self.files:
            return self.files[path]
        if self.directory is None:
            return None
        target = (self.directory / path.lstrip("/")).resolve()
        if not target.is_relative_to(self.directory) or not target.is_file():
            return None
        return target.read_bytes()


@contextlib.contextmanager
def serve(directory: Path | None = None, files: dict[str, bytes] | None = None) -> Iterator[LoopbackServer]:
    """A loopback HTTP server over `directory` and/or the in-memory `files` for the duration of the `with`;
    stopped (stalled requests released) and its port closed on exit."""
    server = LoopbackServer(directory, files)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def apt_install(packages: tuple[str, ...], commands: tuple[str, ...]) -> str:
    """Install the Debian `packages` when one of `commands` is missing (as root, with apt-get; the package
    lists updated if the first try fails: a fresh container has none). Returns why the commands are still
    missing, or "" when they are all there."""
    def missing() -> list[str]:
        return [c for c in commands if shutil.which(c) is None]

    def apt_get(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", *args], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})

    if not missing():
        return ""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{', '.join(missing())} not installed, and no apt-get as root to install {' '.join(packages)}"
    result = apt_get("install", "-y", "-q", *packages)
    if result.returncode != 0 and apt_get("update", "-q").returncode == 0:
        result = apt_get("install", "-y", "-q", *packages)
    if result.returncode != 0 or missing():
        last = (result.stderr.strip() or result.stdout.strip() or "?").splitlines()[-1]
        return f"`apt-get install -y {' '.join(packages)}` failed ({last})"
    return ""


def wait_for(condition: callable, timeout: float, what: str) -> None:
    """Poll `condition` until true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def damage_inside(path: Path, byte: int, count: int = 16) -> None:
    """Overwrite `count` bytes in the middle of a file with `byte`, keeping its size and structure (in a
    safetensors file, in the middle of the tensor data past its header): damage only a checksum can see."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little") if path.suffix == ".safetensors" else 0
    middle = (start + (len(data) - start) // 2) // 4 * 4  # float32-aligned: 0xff bytes make a NaN
    assert data[middle:middle + count] != bytes([byte]) * count, path
    data[middle:middle + count] = bytes([byte]) * count
    path.write_bytes(bytes(data))


def max_ema_difference(a: Path, b: Path) -> float:
    """The largest difference between the EMA states (train/ema.py) of two step checkpoints, which must both
    hold one (parameters and BatchNorm statistics)."""
    import torch

    from train.ema import EMA_STATE

    first, second = (torch.load(path / EMA_STATE, weights_only=True) for path in (a, b))
    assert first.keys() == second.keys() and any("running_mean" in k for k in first)
    return max((first[k].double() - second[k].double()).abs().max().item() for k in first)
