"""`python -m pipeline {synth,download,build,merge,verify,inspect}`: datasets to checked WebDataset shards."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import NoReturn

from pipeline.errors import UserError, report_errors
from pipeline.sources import AUTO, LAYOUTS
from pipeline.synth_layouts import LAYOUTS as SYNTH_LAYOUTS


class _Parser(argparse.ArgumentParser):
    """argparse with the house error format: the usage, then one `error:` line naming the option."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {self.prog}: {message}\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it (or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser = functools.partial(commands.add_parser, formatter_class=_Help)

    p = commands.add_parser("synth", help="make a small dataset of drawn, learnable birds in CUB's (or another) layout")
    p.add_argument("--out", type=Path, required=True,
                   help="leaves OUT/CUB_200_2011/ (OUT/nabirds/, OUT/imagefolder/; and the .tgz with --tgz)")
    p.add_argument("--layout", choices=SYNTH_LAYOUTS, default="cub",
                   help="the dataset layout to write")
    p.add_argument("--classes", type=int, default=20, help="species to draw")
    p.add_argument("--per-class", type=int, default=40, help="images per species")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--tgz", action="store_true", help="also pack the dataset as OUT/<its folder>.tgz, like the "
                   "official archive")

    p = commands.add_parser("download", help="fetch and unpack the official CUB_200_2011.tgz")
    p.add_argument("--out", type=Path, required=True, help="leaves OUT/CUB_200_2011/ and OUT/CUB_200_2011.tgz")
    p.add_argument("--url", default=None, help="a mirror (default: the official Caltech address)")
    p.add_argument("--md5", default=None, help="expected MD5 of the archive (default: the official one)")
    _add_extract_limits(p)
    _add_io_timeout(p)

    p = commands.add_parser("build", help="write WebDataset shards + manifest.json from CUB (or another layout)")
    p.add_argument("--source", type=Path, required=True,
                   help="the dataset directory (or the folder holding it), or its .tgz, e.g. CUB_200_2011.tgz")
    p.add_argument("--layout", choices=(AUTO, *LAYOUTS), default=AUTO,
                   help=f"the source's layout: {AUTO} (default: detected from its files, trying "
                        f"{', '.join(LAYOUTS)} in this order) or one of them")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="stratified, seeded test share for sources without their own test split (imagefolder "
                        "with class folders only; default 0.2)")
    p.add_argument("--out", type=Path, required=True, help="shards/NAME")
    p.add_argument("--valid-fraction", type=float, default=0.1,
                   help="stratified share of the train split (unused when the source has its own valid split)")
    p.add_argument("--seed", type=int, default=0, help="seeds the valid split and the shuffle across shards")
    p.add_argument("--resize-short", type=int, default=256, help="short side in px; 0 keeps originals")
    p.add_argument("--crop-bbox", action="store_true", help="crop to the bounding box plus a 10%% margin")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    p.add_argument("--shard-samples", type=int, default=160, help="samples per shard (CUB's train split gets 34 shards at 160)")
    p.add_argument("--workers", type=int, default=0, help="encoding processes (0 = all cores)")
    p.add_argument("--num-jobs", type=int, default=1, help="split the build into J independent jobs")
    p.add_argument("--job-index", type=int, default=0, help="which job this is, 0..J-1")
    p.add_argument("--skip-bad", action="store_true", help="leave out bad images, recorded in manifest.skipped")
    p.add_argument("--overwrite", action="store_true", help="replace a shard set built with other options")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_extract_limits(p)

    p = commands.add_parser("merge", help="after J build jobs: check every part and shard, write manifest.json")
    p.add_argument("out", type=Path)

    p = commands.add_parser("verify", help="exit 0 only if every shard's sha256, members and JPEGs are "
                            "good, keys are unique and splits and class counts agree")
    p.add_argument("location", help="shards/NAME, an http(s) base URL, or 'pipe:COMMAND {}' (e.g. "
                   "'pipe:aws s3 cp s3://BUCKET/PREFIX/{} -')")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_io_timeout(p)

    p = commands.add_parser("inspect", help="per split: samples, shards, bytes, classes")
    p.add_argument("location", help="shards/NAME, an http(s) base URL, or 'pipe:COMMAND {}' (e.g. "
                   "'pipe:aws s3 cp s3://BUCKET/PREFIX/{} -')")
    _add_io_timeout(p)
    return parser


def _add_io_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--io-timeout", type=float, default=None, metavar="SECONDS",
                   help="a remote read that makes no progress for this long stops with an error "
                        "(default: $CUBSTREAM_IO_TIMEOUT, else 60)")


def _add_extract_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-extract-gb", type=float, default=None, metavar="GB",
                   help="refuse a .tgz that unpacks to more (default: $CUBSTREAM_MAX_EXTRACT_GB, else 5)")
    p.add_argument("--max-extract-files", type=int, default=None, metavar="N",
                   help="refuse a .tgz with more members (default: $CUBSTREAM_MAX_EXTRACT_FILES, else 50000)")


def _set_limits(args: argparse.Namespace) -> None:
    """--io-timeout and --max-extract-* become environment variables, read where files are opened or
    unpacked (and inherited by every process started from here)."""
    import os

    from pipeline.archive import MAX_EXTRACT_FILES_ENV, MAX_EXTRACT_GB_ENV, extract_limits
    from pipeline.remote import set_io_timeout

    set_io_timeout(getattr(args, "io_timeout", None))
    for option, name in (("max_extract_gb", MAX_EXTRACT_GB_ENV), ("max_extract_files", MAX_EXTRACT_FILES_ENV)):
        value = getattr(args, option, None)
        if value is not None:
            os.environ[name] = str(value)
    extract_limits()  # a bad value is refused before any work


def run(args: argparse.Namespace) -> int:
    _set_limits(args)
    if args.command == "synth":
        from pipeline.synth import synth

        root = synth(args.out, classes=args.classes, per_class=args.per_class, seed=args.seed, tgz=args.tgz,
                     layout=args.layout)
        print(f"wrote {root}" + (f" and {root}.tgz" if args.tgz else ""))
    elif args.command == "download":
        from pipeline import download

        kwargs = {k: v for k, v in (("url", args.url), ("md5", args.md5)) if v}
        print(f"wrote {download.download(args.out, **kwargs)}")
    elif args.command == "build":
        from pipeline.build import build, check_job_args, check_out
        from pipeline.plan import BuildOptions

        check_job_args(args.num_jobs, args.job_index, args.workers)  # every option checked before any work
        check_out(args.out)
        options = BuildOptions(args.valid_fraction, args.seed, args.resize_short, args.crop_bbox, args.quality,
                               args.shard_samples)
        manifest = build(args.source, args.out, options, workers=args.workers, num_jobs=args.num_jobs,
                         job_index=args.job_index, skip_bad=args.skip_bad, overwrite=args.overwrite,
                         progress=not args.quiet, layout=args.layout, test_fraction=args.test_fraction)
        print(_summary(args.out, manifest) if manifest else
              f"job {args.job_index} of {args.num_jobs} done; run `python -m pipeline merge {args.out}` after all")
    elif args.command == "merge":
        from pipeline.merge import merge

        print(_summary(args.out, merge(args.out)))
    elif args.command == "verify":
        from pipeline.verify import summary, verify

        problems = verify(args.location, progress=not args.quiet)
        for line in problems:
            print(f"BAD {line}", file=sys.stderr)
        if problems:
            raise UserError(summary(args.location, problems))
        print(f"OK {args.location}: every shard's size, sha256 and samples check out; keys are unique, splits "
              "and class counts agree")
    elif args.command == "inspect":
        from pipeline.verify import inspect

        print(inspect(args.location))
    return 0


def _summary(out: Path, manifest: dict) -> str:
    counts = ", ".join(f"{s} {manifest['splits'][s]['num_samples']}" for s in ("train", "valid", "test"))
    skipped = f", {len(manifest['skipped'])} skipped" if manifest["skipped"] else ""
    return f"wrote {out}/manifest.json: {counts}{skipped}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
