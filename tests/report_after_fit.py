"""Run by tests/test_report.py in its own process, as a notebook that calls the commands would: `fit` with
DataLoader workers whose mistakes plot fails (simulated), then `evaluate` with workers, then the report of
features a collapsed model gives (all equal), all in this one process. Prints a JSON line: each command's exit
status and what the report directories hold."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from train import report
from train.__main__ import main


def _broken_plot(*args: object) -> None:
    raise RuntimeError("simulated plot failure")


def run(shards: str, tmp: Path, fit_args: list[str]) -> dict:
    drawn = report.plot_most_incorrect
    report.plot_most_incorrect = _broken_plot
    fit = main(["fit", "--shards", shards, *fit_args, "--workers", "2", "--run-dir", str(tmp / "run")])
    report.plot_most_incorrect = drawn
    evaluate = main(["evaluate", "--checkpoint", str(tmp / "run"), "--shards", shards, "--workers", "2",
                     "--out", str(tmp / "eval")])
    labels = np.repeat(np.arange(3), 10)
    records = [{"key": f"{i:06d}", "label": int(label), "pred": 0, "conf": 0.5, "features": np.full(16, 0.5)}
               for i, label in enumerate(labels)]
    report.write_report(tmp / "collapsed", {"top1": 1 / 3, "top5": 1.0, "loss": 1.1, "num_samples": 30}, records,
                        [], ["a", "b", "c"])
    return {"fit": fit, "evaluate": evaluate,
            **{name: sorted(p.name for p in (tmp / name).iterdir()) for name in ("run/report", "eval", "collapsed")},
            "results": (tmp / "run" / "results.json").is_file()}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])))
