"""How fast `python -m train` answers: `fit --help`, a bad option and a bad --shards, each a fresh process,
against a process that only imports torch (the baseline, measured in the same run). The command line checks
its options and the shard set before importing torch, so each should take well under the baseline.

    python bench/cli.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wall(args: list[str], repeat: int) -> float:
    """Best wall time of `python ARGS` over `repeat` runs (output discarded)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="runs per row; the best is shown")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {"fit --help": ["-m", "train", "fit", "--help"],
                "fit, bad option": ["-m", "train", "fit", "--shards", tmp, "--optimizer", "adagrad"],
                "fit, bad --shards": ["-m", "train", "fit", "--shards", f"{tmp}/none", "--run-dir", f"{tmp}/r"]}
        baseline = wall(["-c", "import torch"], args.repeat)
        print(f"| command | seconds | vs `import torch` ({baseline:.2f} s) |\n|---|---:|---:|")
        for name, command in rows.items():
            seconds = wall(command, args.repeat)
            print(f"| `python -m train {name}` | {seconds:.2f} | {seconds / baseline:.2f}x |")


if __name__ == "__main__":
    main()
