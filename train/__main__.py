"""`python -m train {fit,lr-find,evaluate,predict,export,models}`; `accelerate launch -m train fit ...`."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks online for updates otherwise

from pipeline.errors import UserError, print_error, report_errors  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402
from pipeline.outputs import output_dir_problem, output_file_problem  # noqa: E402
from pipeline.remote import set_io_timeout  # noqa: E402
from train import config as cfgmod  # noqa: E402
from train import names  # noqa: E402
from train.validate import eval_size_range_problem  # noqa: E402


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one `error:` line naming the option (exit status 2, as argparse's), not a usage
    block; `--help` still prints the whole usage."""

    command = ""  # set once parsed, so that errors found later point at the command's own --help

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {' '.join(filter(None, (self.prog, self.command)))} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="train on a shard set; best-by-valid model evaluated on test",
                              formatter_class=cfgmod.HelpFormatter)
    cfgmod.add_arguments(fit)
    _add_lr_find(commands)
    _add_evaluate(commands)
    _add_predict(commands)
    _add_export(commands)
    p = commands.add_parser("models", help="the models --arch takes, per source, with input size and weights",
                            formatter_class=cfgmod.HelpFormatter)
    p.add_argument("pattern", nargs="?", default="*", metavar="PATTERN",
                   help="fnmatch pattern or substring of the --arch name (e.g. convnext, 'timm/vit_*')")
    return parser


def _add_lr_find(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("lr-find", help="LR range test on fit's data, model and groups; plot, suggestion",
                            formatter_class=cfgmod.HelpFormatter)
    cfgmod.add_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="writes OUT/lr_find.png and OUT/lr_find.json")
    hidden = argparse.SUPPRESS  # not given: the YAML's or the default
    p.add_argument("--start-lr", dest="lr_find_start", type=float, default=hidden,
                   help="first LR of the exponential sweep (same as --lr-find-start)")
    p.add_argument("--end-lr", dest="lr_find_end", type=float, default=hidden,
                   help="last LR of the sweep (same as --lr-find-end)")
    p.add_argument("--steps", dest="lr_find_steps", type=int, default=hidden,
                   help="optimizer steps, fewer if the loss diverges (same as --lr-find-steps)")


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("evaluate", help="a run's best model on one split: metrics.json, predictions, plots",
                            formatter_class=cfgmod.HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory of `fit` (or its checkpoints/best)")
    p.add_argument("--shards", required=True, help=cfgmod.HELP["shards"])
    p.add_argument("--split", choices=("train", "valid", "test"), default="test", help="which split to score")
    p.add_argument("--out", type=Path, required=True, help="report directory")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--workers", type=int, default=2, help="data loader processes per process")
    p.add_argument("--precision", choices=cfgmod.PRECISIONS, default="auto", help=cfgmod.HELP["precision"])
    p.add_argument("--wandb", choices=cfgmod.WANDB_MODES, default="disabled", help="log the report to W&B")
    p.add_argument("--wandb-project", default="cubstream", help="W&B project of the report")
    p.add_argument("--io-timeout", type=float, default=0.0, metavar="SECONDS", help=cfgmod.HELP["io_timeout"])
    p.add_argument("--cache-dir", default="", metavar="DIR", help=cfgmod.HELP["cache_dir"])
    p.add_argument("--cache-limit-gb", type=float, default=0.0, metavar="GB", help=cfgmod.HELP["cache_limit_gb"])
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the report's PNGs (confusion matrix, most-incorrect images, embeddings); --no-plots "
                        "writes metrics.json and predictions.csv only, without the minutes of CPU a t-SNE of "
                        "thousands of images takes")
    _add_eval_settings(p)


def _add_eval_settings(p: argparse.ArgumentParser) -> None:
    """evaluate's and predict's --eval-image-size and --tta: by default what the run recorded."""
    p.add_argument("--eval-image-size", type=int, default=0, metavar="N",
                   help="eval crop size in pixels (0: the one the run scored valid and test at)")
    p.add_argument("--tta", dest="eval_tta", choices=("run", *names.TTA_MODES), default="run",
                   help="test-time augmentation (run: the one the run scored valid and test with; flip also "
                        "scores each image's mirror and averages the logits)")


def _add_predict(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("predict", help="top-5 species of image files, folders or globs",
                            formatter_class=cfgmod.HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory of `fit` (or its checkpoints/best)")
    p.add_argument("--json", action="store_true", help="one JSON line per image instead of a table")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    _add_eval_settings(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders (recursive) or globs")


def _add_export(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("export", help="TorchScript or ONNX file of a run's best model, checked on reload",
                            formatter_class=cfgmod.HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory of `fit` (or its checkpoints/best)")

    p.add_argument("--format", default="auto", choices=names.EXPORT_FORMATS,
                   help="file format (auto: the one --out's suffix names, .onnx or .pt/.pth/.ts; for another "
                        "name TorchScript when the model traces and its reload matches, else ONNX)")
    p.add_argument("--out", type=Path, required=True, help="file to write (.pt / .onnx)")


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> cfgmod.Config:
    """Defaults < YAML < command line, checked before any work (one `error:` line, exit 2); for fit, also
    that --run-dir can be written (nothing is created here)."""
    try:
        config = cfgmod.make_config(args)
    except UserError as e:
        parser.error(str(e))
    problems = cfgmod.check(config)
    if not problems and args.command == "fit":
        problems = [p for p in [output_dir_problem(Path(config.run_dir), "--run-dir")] if p]
    if problems:
        parser.error("; ".join(problems))
    return config


def _check_output(parser: argparse.ArgumentParser, problem: str | None) -> None:
    if problem:
        parser.error(problem)


def _shard_set(parser: argparse.ArgumentParser, config: cfgmod.Config) -> dict:
    """The shard set's manifest (a bad --shards is one line), then the model's own checks (--arch, and whether
    the model takes --image-size), which are the first to import torch."""
    set_io_timeout(config.io_timeout or None)  # inherited by DataLoader workers and launched processes
    manifest = load_manifest(config.shards)
    _check_output(parser, cfgmod.model_problem(config))
    return manifest


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Check what argparse cannot (one `error:` line, exit 2), then hand over to train.commands. Nothing
    imports torch before the options and the shard set are checked."""
    if args.command in ("fit", "lr-find"):
        config = _config(parser, args)
        if args.command == "lr-find":
            _check_output(parser, output_dir_problem(args.out, "--out"))
        manifest = _shard_set(parser, config)
        from train import commands

        if args.command == "fit":
            return commands.fit(config, manifest)
        return commands.lr_find(config, manifest, args.out)
    from train import commands

    if args.command == "evaluate":
        if not (math.isfinite(args.cache_limit_gb) and args.cache_limit_gb >= 0):
            parser.error(f"--cache-limit-gb must be a number >= 0, got {args.cache_limit_gb}")
        if args.batch_size < 1 or args.workers < 0:
            parser.error(f"evaluate needs --batch-size >= 1 and --workers >= 0, got {args.batch_size} and "
                         f"{args.workers}")
        _check_output(parser, eval_size_range_problem(args.eval_image_size))
        _check_output(parser, output_dir_problem(args.out, "--out"))
        return commands.evaluate(args.checkpoint, args.shards, args.split, args.out, args.batch_size, args.workers,
                                 args.precision, args.wandb, args.wandb_project, args.io_timeout,
                                 args.cache_dir, args.cache_limit_gb, args.eval_image_size, _tta(args), args.plots)
    if args.command == "models":
        return commands.models(args.pattern)
    if args.command == "predict":
        if args.batch_size < 1:
            parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
        _check_output(parser, eval_size_range_problem(args.eval_image_size))
        return commands.predict(args.checkpoint, args.images, as_json=args.json, batch_size=args.batch_size,
                                eval_size=args.eval_image_size, tta=_tta(args))
    _check_output(parser, output_file_problem(args.out, "--out"))
    return commands.export(args.checkpoint, args.format, args.out)


def _tta(args: argparse.Namespace) -> str:
    """evaluate's and predict's --tta for train.commands: "" for the run's own."""
    return "" if args.eval_tta == "run" else args.eval_tta


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    parser.command = args.command
    try:
        status = report_errors(lambda: _run_reporting_lost_peers(parser, args))
        sys.stdout.flush()  # here, not at exit: a reader gone by now is still caught below
    except BrokenPipeError:
        return _stdout_closed()
    return status


def _stdout_closed() -> int:
    """The reader of our output has gone (`python -m train models | head`): stop quietly with the status a
    shell shows for a process that SIGPIPE ended, as other Unix tools do. stdout is pointed at /dev/null so
    that Python's own flush at exit does not fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _run_reporting_lost_peers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        return run(parser, args)
    except RuntimeError as e:
        line = _lost_peer(e)
        if line is None:
            raise
        print_error(line)
        return 1


def _lost_peer(error: RuntimeError) -> str | None:
    """One line when a collective failed because another process of the run died (gloo: connection reset)
    or hung past --dist-timeout; None for any other error (its traceback is kept)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    text = str(error).strip()
    if not (isinstance(error, getattr(dist, "DistError", ())) or "gloo" in text or "NCCL" in text):
        return None
    reason = text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text  # drop "[file.cc:545]"
    reason = reason.splitlines()[0].split(". ", 1)[0]
    return (f"process {dist.get_rank()} of {dist.get_world_size()} lost another process of the run ({reason}); "
            "the run stops: fix the failed process or node, then rerun the same command with --resume auto")


if __name__ == "__main__":
    sys.exit(main())
