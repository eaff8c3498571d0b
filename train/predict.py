"""`predict`: top-5 species of image files with a run's best model; everything else comes from the checkpoint.

Images are read with PIL as the pipeline reads them (EXIF orientation applied; grayscale, CMYK, palette,
16-bit and alpha converted to RGB), then go through the eval transform stored with the run (resize the
short side, centre crop, at the eval size) and its normalisation, and score with its test-time augmentation. A file that cannot be read is reported on stderr and the
others are still predicted; the exit status is 1 when any failed.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.encode import to_rgb
from pipeline.errors import print_error
from pipeline.sources.imagefolder import IMAGE_EXTENSIONS
from train import augment, checkpoint, evaltime
from train.metrics import TOP_K


@dataclass(frozen=True)
class Failure:
    image: str
    reason: str


def expand(inputs: list[str]) -> tuple[list[str], list[Failure]]:
    """Files as given; folders -> their image files (recursively, sorted); globs -> their matches (sorted).
    An input that names nothing, or names something other than a regular file or folder (a FIFO, a device),
    is a failure. Within one folder or glob each file counts once (by its resolved path), and symlinked
    folders are followed except where they lead back into a folder already being searched."""
    files: list[str] = []
    failures: list[Failure] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = _unique(p for p in _walk(path) if p.suffix.lower() in IMAGE_EXTENSIONS)
            files += found
            if not found:
                failures.append(Failure(item, "folder holds no image files"))
        elif path.exists() and not path.is_file():
            failures.append(Failure(item, "not a regular file"))
        elif path.exists() or not glob.has_magic(item):
            files.append(item)  # a missing file fails when it is read, in its place in the output
        else:
            found = _unique(_glob(item))
            files += found
            if not found:
                failures.append(Failure(item, "no file matches this pattern"))
    return files, failures


def _unique(paths: Iterable[Path]) -> list[str]:
    """Sorted, each file once: of several paths to the same file, the first in sorted order is kept."""
    seen: set[Path] = set()
    kept = []
    for path in sorted(paths, key=str):
        real = path.resolve()
        if real not in seen:
            seen.add(real)
            kept.append(str(path))
    return kept


def _walk(root: Path) -> Iterator[Path]:
    """Regular files under `root`, following symlinked folders but never into a folder already searched
    (which includes every folder on the way down: a loop). Folders are searched in name order, so which
    of two paths to one folder is used does not depend on the file system's order."""
    seen: set[Path] = set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = Path(folder).resolve()
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if (Path(folder) / d).resolve() not in seen)  # sorted: deterministic
        yield from (Path(folder) / n for n in names if (Path(folder) / n).is_file())


def _glob(pattern: str) -> Iterator[Path]:
    """glob.glob's matches (hidden names only for patterns that start with a dot), but `**` searches
    with `_walk`, so a symlink loop is not followed round and round."""
    if "**" not in pattern:
        yield from (Path(p) for p in glob.glob(pattern) if Path(p).is_file())
        return
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    rest = parts[fixed:]
    for path in _walk(root) if root.is_dir() else ():
        relative = path.relative_to(root).parts
        if _matches(relative, rest):
            yield path if fixed else Path(*relative)


def _matches(names: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Whether path components `names` match glob components `parts` (`**`: any number of folders)."""
    if not parts:
        return not names
    if parts[0] == "**":
        return any(_matches(names[i:], parts[1:]) for i in range(len(names) + 1)
                   if not any(n.startswith(".") for n in names[:i]))
    if not names:
        return False
    hidden_ok = parts[0].startswith(".") or not glob.has_magic(parts[0])
    if names[0].startswith(".") and not hidden_ok:
        return False
    return fnmatch.fnmatchcase(names[0], parts[0]) and _matches(names[1:], parts[1:])


def load_rgb(path: str) -> np.ndarray:
    """HWC uint8 RGB; OSError / ValueError with a short reason for anything that is not a whole image."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here
            return np.asarray(to_rgb(ImageOps.exif_transpose(image)))
    except UnidentifiedImageError:
        raise ValueError("not an image (or in a format PIL cannot read)") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise OSError(e.strerror or type(e).__name__) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode: {e}") from None


class Predictor:
    """A run's best model with its eval transform and TTA (the recorded ones unless `eval_size` / `tta` are
    given: 0 / "")."""

    def __init__(self, run: str, device: str | None = None, eval_size: int = 0, tta: str = "") -> None:
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, meta = checkpoint.load_model(Path(run))
        self.meta = evaltime.with_overrides(meta, eval_size, tta)
        self.model = model.to(self.device)
        self.transform = augment.run_eval_transform(self.meta)

    def prepare(self, path: str) -> np.ndarray:
        return self.transform(load_rgb(path), 0)

    @torch.inference_mode()
    def top_k(self, images: list[np.ndarray], k: int = TOP_K) -> list[list[dict[str, Any]]]:
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(self.device)  # HWC images
        _, logits = evaltime.forward(self.model, augment.normalize(batch, self.meta["mean"], self.meta["std"]),
                                     self.meta["tta"])
        probs = logits.float().softmax(dim=1)
        values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        classes = self.meta["classes"]
        return [[{"class": classes[i], "prob": p} for i, p in zip(row_i, row_p, strict=True)]
                for row_i, row_p in zip(indices.tolist(), values.tolist(), strict=True)]


def _batches(predictor: Predictor, files: list[str], batch_size: int,
             err: TextIO) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    """Loaded and transformed images, `batch_size` at a time; failures reported as they are met."""
    names: list[str] = []
    images: list[np.ndarray] = []
    for path in files:
        try:
            images.append(predictor.prepare(path))
        except (OSError, ValueError) as e:
            report_failure(Failure(path, str(e)), err)
            continue
        names.append(path)
        if len(names) == batch_size:
            yield names, images
            names, images = [], []
    if names:
        yield names, images


def report_failure(failure: Failure, err: TextIO) -> None:
    print_error(f"{failure.image}: {failure.reason}", err)


def format_table(image: str, top: list[dict[str, Any]]) -> str:
    width = max(len(entry["class"]) for entry in top)
    lines = [image] + [f"  {rank}. {entry['class']:<{width}}  {entry['prob']:7.2%}"
                       for rank, entry in enumerate(top, start=1)]
    return "\n".join(lines)


def predict(run: str, inputs: list[str], *, as_json: bool = False, batch_size: int = 32,
            out: TextIO | None = None, err: TextIO | None = None, eval_size: int = 0, tta: str = "") -> int:
    """Print the top-5 of every readable image (stdout), failures on stderr; returns how many failed."""
    out, err = out or sys.stdout, err or sys.stderr
    predictor = Predictor(run, eval_size=eval_size, tta=tta)
    files, failures = expand(inputs)
    for failure in failures:
        report_failure(failure, err)
    done = 0
    for names, images in _batches(predictor, files, batch_size, err):
        for name, top in zip(names, predictor.top_k(images), strict=True):
            print(json.dumps({"image": name, "top5": top}) if as_json else format_table(name, top), file=out,
                  flush=True)
        done += len(names)
    failed = len(failures) + len(files) - done
    if failed:
        print(f"{done} image(s) predicted, {failed} failed", file=err)
    return failed
