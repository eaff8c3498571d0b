"""`python -m train {fit,lr-find,evaluate,predict,export}`; `accelerate launch -m train fit ...` (DESIGN 4)."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks online for updates otherwise

from pipeline.errors import UserError  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402
from train import config as cfgmod  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="train on a shard set; best-by-valid model evaluated on test",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cfgmod.add_arguments(fit)
    return parser


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> cfgmod.Config:
    """Defaults < YAML < command line, checked before any work (argparse-style errors, exit 2)."""
    try:
        config = cfgmod.make_config(args)
    except UserError as e:
        parser.error(str(e))
    problems = cfgmod.check(config)
    if problems:
        parser.error("; ".join(problems))
    return config


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "fit":
        config = _config(parser, args)
        load_manifest(config.shards)  # a bad --shards fails in a second, before torch is imported
        from train.engine import fit

        fit(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return run(parser, args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
