"""Helpers for the report / predict / export tests.

run_main: `python -m train ...` inside the test process (no interpreter start-up, no torch re-import), for
commands that fail before any work and for the single-process ones (predict, export).
assert_png: the file is a real plot. ONE_THREAD: env for test subprocesses.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

# One OpenMP thread per test subprocess: on the 2 shared cores, torch's 2 spinning threads run 2-3x slower
# as soon as another process is busy (measured: lr-find 27 s with 1 thread, 77 s with 2, next to a busy loop).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess:
    """main(args) with its exit status and captured output, shaped like `conftest.run_cli`'s result."""
    from train.__main__ import main

    capsys.readouterr()  # drop what earlier code printed
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse errors
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["train", *args], code, captured.out, captured.err)


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
