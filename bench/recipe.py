"""The recipe ablation: the notebook's recipe, then one technique added at a time, each row trained at the same
budget (model, weights, epochs, image size, batch, train images) on a synthetic bird set, several seeds each;
prints the test top-1 of every row (mean, spread) with its fit time and its gain over the notebook.

    python bench/recipe.py                                    # every row, seeds 0 1 2 (long: run it on a GPU)
    python bench/recipe.py --first-last --seeds 0             # the notebook and fit's defaults only
    python bench/recipe.py --rows notebook,smoothing --epochs 2 --json runs.json
    python bench/recipe.py --dry-run                          # the fit commands, nothing run

The data: `python -m pipeline synth` (--classes x --per-class images, --seed) and `python -m pipeline build`
(--resize-short), in --work (kept and reused there; default a temporary directory, removed afterwards).
Each run is `python -m train fit ... --wandb disabled` in its own run directory, read back from its
results.json; its log is beside it (runs/ROW/seedN.log). The fit time is the whole process (start, epochs with
their validation, the final test), the cost a user pays for the row.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import yaml

from pipeline.files import write_json_atomic
from pipeline.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "configs/notebook.yaml"  # relative to ROOT, where every fit runs
# The rows: each adds its `fit` options to those of every row above it (a later option wins), so a row is the
# recipe so far. The first is the notebook's recipe: configs/notebook.yaml, whose model, size, batch and epochs
# the budget options then replace. Adding a technique is one line here.
ROWS: list[tuple[str, list[str]]] = [
    ("notebook", ["--config", NOTEBOOK]),
    ("augment", ["--augment", "standard"]),
    ("flat-lr", ["--lr-scheme", "flat"]),
    ("adamw", ["--optimizer", "adamw", "--weight-decay", "0.05"]),
    ("smoothing", ["--label-smoothing", "0.1"]),
    ("ema", ["--ema-decay", "0.9998"]),
    ("tta", ["--tta", "flip"]),
]
# Not cumulative: `fit` with no recipe option at all, only the budget. It shows what a user gets by default,
# which should equal the best cumulative row.
DEFAULTS = "defaults"
# The budget's options (every row the same): the YAML keys they replace are not the notebook's recipe.
BUDGET_KEYS = {"shards", "arch", "pretrained", "image_size", "batch_size", "epochs", "workers", "run_dir"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, as the project's commands say it
        self.exit(2, f"error: {message} (see python bench/recipe.py --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("the synthetic set")
    data.add_argument("--classes", type=int, default=40)
    data.add_argument("--per-class", type=int, default=30)
    data.add_argument("--seed", type=int, default=11, help="seed of the drawn images and of the valid split")
    data.add_argument("--resize-short", type=int, default=80, help="short side of the shards' images")
    budget = parser.add_argument_group("the budget (the same for every row)")
    budget.add_argument("--arch", default="resnet18")
    budget.add_argument("--pretrained", default="none")
    budget.add_argument("--image-size", type=int, default=64)
    budget.add_argument("--batch-size", type=int, default=32)
    budget.add_argument("--epochs", type=int, default=6)
    budget.add_argument("--workers", type=int, default=1, help="data loader processes per fit")
    budget.add_argument("--fit-args", default="", help="more fit options for every row, e.g. '--precision bf16'")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one fit per row and seed")
    parser.add_argument("--rows", help="comma-separated row names to run (default: all): " +
                        ", ".join(name for name, _ in ROWS))
    parser.add_argument("--first-last", action="store_true", help="only the notebook and fit's defaults")
    parser.add_argument("--work", type=Path, help="data and runs, kept (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="write every run's numbers to this file")
    parser.add_argument("--fresh", action="store_true", help="train every run again, even one --work holds")
    parser.add_argument("--dry-run", action="store_true", help="print the fit commands only")
    args = parser.parse_args(argv)
    names = [name for name, _ in ROWS] + [DEFAULTS]
    chosen = args.rows.split(",") if args.rows else names
    unknown = [name for name in chosen if name not in names]
    if unknown:
        parser.error(f"--rows: unknown row {unknown[0]!r}; rows: {', '.join(names)}")
    if args.first_last:
        chosen = [names[0], names[-1]]
    args.chosen = [name for name in names if name in chosen]  # table order, each once
    return args


def row_options(name: str) -> list[str]:
    """The fit options of row `name`: its own and those of every row above it (none for DEFAULTS)."""
    options: list[str] = []
    if name == DEFAULTS:
        return options
    for row, adds in ROWS:
        options += adds
        if row == name:
            return options
    raise KeyError(name)


def budget_options(args: argparse.Namespace) -> list[str]:
    return ["--arch", args.arch, "--pretrained", args.pretrained, "--image-size", str(args.image_size),
            "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--workers", str(args.workers),
            *shlex.split(args.fit_args)]


def fit_command(args: argparse.Namespace, row: str, seed: int, shards: Path, run_dir: Path) -> list[str]:
    """The row's options first, then the budget's and the run's (later options win: no row changes them); no
    report PNGs, only results.json is read."""
    return [sys.executable, "-m", "train", "fit", *row_options(row), *budget_options(args), "--seed", str(seed),
            "--shards", str(shards), "--run-dir", str(run_dir), "--wandb", "disabled", "--no-plots"]


def run(command: list[str], log: Path | None = None) -> subprocess.CompletedProcess:
    """`command` from the project's root with this checkout importable; output to `log` (or captured)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}
    if log is None:
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    with open(log, "w") as out:
        return subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def make_data(args: argparse.Namespace, work: Path) -> Path:
    """The synthetic shard set for these settings, built once per --work directory; returns it."""
    data = work / f"synth-c{args.classes}-p{args.per_class}-s{args.seed}-r{args.resize_short}"
    shards = data / "shards"
    if (shards / "manifest.json").is_file():  # written last: the set is complete
        return shards
    shutil.rmtree(data, ignore_errors=True)
    steps = [["-m", "pipeline", "synth", "--out", str(data), "--classes", str(args.classes),
              "--per-class", str(args.per_class), "--seed", str(args.seed)],
             ["-m", "pipeline", "build", "--source", str(data / "CUB_200_2011"), "--out", str(shards),
              "--resize-short", str(args.resize_short), "--seed", str(args.seed), "--quiet"]]
    for step in steps:
        done = run([sys.executable, *step])
        if done.returncode != 0:
            sys.exit(f"error: {' '.join(step[1:3])} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return shards


def fit_once(args: argparse.Namespace, row: str, seed: int, shards: Path, runs: Path) -> dict[str, Any]:
    """One fit's test metrics and wall time, or its error line. A finished fit of the same command in --work
    (its record beside the run: seedN.json) is reused, so an interrupted or extended ablation goes on where
    it stopped; `--fresh` trains everything again."""
    run_dir = runs / row / f"seed{seed}"
    command = fit_command(args, row, seed, shards, run_dir)
    saved = runs / row / f"seed{seed}.json"
    if not args.fresh and saved.is_file():
        record = json.loads(saved.read_text())
        if record.get("command") == command[1:]:
            return record
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = runs / row / f"seed{seed}.log"
    start = time.perf_counter()
    done = run(command, log)
    record = {"seed": seed, "wall_s": round(time.perf_counter() - start, 2), "log": str(log), "command": command[1:]}
    if done.returncode != 0:
        lines = [line for line in log.read_text().splitlines() if line.startswith("error:")]
        return {**record, "error": lines[-1] if lines else f"exit status {done.returncode}"}
    results = json.loads((run_dir / "results.json").read_text())
    record = {**record, **{key: results["test"][key] for key in ("top1", "top5", "loss")},
              "best_epoch": results["best_epoch"]}
    write_json_atomic(saved, record)
    return record


def summary(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean, sample std, min and max of test top-1 in percent, mean wall time; None if every run failed."""
    top1 = [100 * r["top1"] for r in runs if "error" not in r]
    if not top1:
        return None
    return {"mean": statistics.mean(top1), "std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
            "min": min(top1), "max": max(top1), "wall_s": statistics.mean(r["wall_s"] for r in runs),
            "failed": len(runs) - len(top1)}


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: each row's options, top-1 over seeds, fit time, gain over the first row run."""
    base = rows[0]["summary"]
    lines = [f"| row | adds | test top-1 % mean | std | min-max | fit s | vs {rows[0]['name']} |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        s = row["summary"]
        adds = "none: fit's defaults" if row["name"] == DEFAULTS else f"`{shlex.join(row['adds'])}`"
        if s is None:
            lines.append(f"| {row['name']} | {adds} | failed | | | | |")
            continue
        gain = f"{s['mean'] - base['mean']:+.1f}" if base else ""
        failed = f" ({s['failed']} failed)" if s["failed"] else ""
        lines.append(f"| {row['name']} | {adds} | {s['mean']:.1f}{failed} | {s['std']:.1f} | "
                     f"{s['min']:.1f}-{s['max']:.1f} | {s['wall_s']:.0f} | {gain} |")
    return "\n".join(lines)


def describe(args: argparse.Namespace, shards: Path) -> str:
    """What was measured: the data, the budget and what the notebook row is."""
    splits = load_manifest(str(shards))["splits"]
    counts = " / ".join(f"{splits[s]['num_samples']} {s}" for s in ("train", "valid", "test"))
    notebook = {k: v for k, v in yaml.safe_load((ROOT / NOTEBOOK).read_text()).items() if k not in BUDGET_KEYS}
    return (f"synth birds: {args.classes} classes x {args.per_class}, seed {args.seed}, resize-short "
            f"{args.resize_short} ({counts} images)\nbudget: {shlex.join(budget_options(args))}; seeds "
            f"{' '.join(map(str, args.seeds))}\nnotebook ({NOTEBOOK}): "
            + ", ".join(f"{k} {v}" for k, v in notebook.items())
            + "\neach row adds its options to those of every row above it in bench/recipe.py's ROWS, run or not")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        for row in args.chosen:
            print(f"{row}: {shlex.join(fit_command(args, row, args.seeds[0], Path('SHARDS'), Path('RUN_DIR'))[1:])}")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="cubstream-recipe-"))
    try:
        shards = make_data(args, work)
        rows = []
        for row in args.chosen:
            runs = []
            for seed in args.seeds:
                runs.append(fit_once(args, row, seed, shards, work / "runs"))
                result = runs[-1].get("error") or f"test top-1 {runs[-1]['top1']:.4f}"
                print(f"{row} seed {seed}: {result} ({runs[-1]['wall_s']:.0f} s)", file=sys.stderr, flush=True)
            rows.append({"name": row, "adds": dict(ROWS).get(row, []), "options": row_options(row), "runs": runs,
                         "summary": summary(runs)})
        print(describe(args, shards) + "\n\n" + table(rows))
        if args.json:
            settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            write_json_atomic(args.json, {"settings": settings, "rows": rows})
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    failed = sum("error" in r for row in rows for r in row["runs"])
    if failed:
        print(f"error: {failed} fit(s) failed (their error lines above and in the table's row)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
