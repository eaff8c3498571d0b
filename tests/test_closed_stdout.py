"""A reader that stops early (`python -m train models | head`): the command ends quietly with the status of a
process SIGPIPE ended (141), no traceback on stderr, like other Unix tools."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support import ONE_THREAD, ROOT, cli_env

SIGPIPE_STATUS = 141


def test_models_piped_into_head(tmp_path: Path) -> None:
    """The listing (over 100 kB, more than a pipe holds) read up to its first line, then the pipe closed."""
    process = subprocess.Popen([sys.executable, "-m", "train", "models"], cwd=ROOT, env=cli_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == SIGPIPE_STATUS, stderr[-2000:]
    assert first.startswith("weights:") and stderr == ""


def test_predict_table_into_a_closed_pipe(fitted_run: Path, train_shards: Path) -> None:
    """predict's table into a pipe whose reader closed before the first line."""
    images = sorted((train_shards.parent / "CUB_200_2011" / "images").rglob("*.jpg"))[:3]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "train", "predict", "--checkpoint", str(fitted_run),
                                 *map(str, images)], cwd=ROOT, env=cli_env(**ONE_THREAD), stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert result.returncode == SIGPIPE_STATUS, result.stderr[-2000:]
    assert result.stderr == ""
