"""Dataset layouts as plug-ins. LAYOUTS maps a layout's name to its module (see base.Layout); `auto` tries
them in this order, so a layout whose files include another's (NABirds has CUB's and more) comes first.

To add a layout: write pipeline/sources/NAME.py with NAME, LOOKS_FOR, find_root() and read(), and add one
line here.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.archive import safe_extract
from pipeline.errors import UserError
from pipeline.sources import cub, imagefolder, nabirds
from pipeline.sources.base import Dataset, Layout, Record, Settings, check_records, image_sizes, sample_key

LAYOUTS: dict[str, Layout] = {
    "nabirds": nabirds,
    "cub": cub,
    "imagefolder": imagefolder,
}
AUTO = "auto"

__all__ = ["AUTO", "LAYOUTS", "Dataset", "Record", "Settings", "image_sizes", "open_dataset", "sample_key"]


@contextlib.contextmanager
def open_dataset(source: Path, layout: str = AUTO, settings: Settings | None = None) -> Iterator[Dataset]:
    """The parsed dataset at `source` (a directory, or a .tgz/.tar extracted safely to a temporary directory
    that lives as long as the context), in `layout` or the first layout that finds its files."""
    if layout != AUTO and layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r}: not one of {AUTO}, {', '.join(LAYOUTS)}")
    source = Path(source)
    if not source.exists():
        raise UserError(f"source {source}: no such file or directory")
    with _as_directory(source) as directory:
        name, root = _detect(directory, layout, source)
        settings = settings or Settings()
        dataset = LAYOUTS[name].read(root, settings)
        check_records(dataset, settings)
        yield dataset


@contextlib.contextmanager
def _as_directory(source: Path) -> Iterator[Path]:
    if source.is_dir():
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="cubstream-src-") as tmp:
        safe_extract(source, Path(tmp))
        yield Path(tmp)


def _detect(directory: Path, layout: str, source: Path) -> tuple[str, Path]:
    """(layout name, root): the named layout's root, or the first layout in LAYOUTS that finds its files."""
    for name in LAYOUTS if layout == AUTO else (layout,):
        root = LAYOUTS[name].find_root(directory)
        if root is not None:
            return name, root
    if layout != AUTO:
        raise UserError(f"{source}: not the {layout} layout: looked for {LAYOUTS[layout].LOOKS_FOR}")
    looked = "; ".join(module.LOOKS_FOR for module in LAYOUTS.values())
    raise UserError(f"{source}: no known layout: looked for {looked}")
