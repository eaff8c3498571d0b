"""Hostile or unlucky sources through the real `python -m pipeline build`: every row ends with a non-zero
exit, exactly one `error:` line naming the file (and line), no traceback and no manifest. Inputs that only
look odd (CRLF, trailing blanks, a UTF-8 BOM) build the same shards as clean ones."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_OPTIONS
from PIL import Image
from support import assert_one_line_error, run_cli

from pipeline.archive import pack_tgz

BUILD_ARGS = ("--resize-short", str(SMALL_OPTIONS.resize_short), "--shard-samples", str(SMALL_OPTIONS.shard_samples),
              "--workers", "1", "--quiet")


def _truncated_png() -> bytes:
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()[:400]


def _replace_line(path: Path, number: int, line: bytes) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[number - 1] = line + b"\n"
    path.write_bytes(b"".join(lines))


def _first_image(cub: Path) -> Path:
    return cub / "images" / (cub / "images.txt").read_text().split("\n", 1)[0].split()[1]


def _truncated_png_in_place_of_a_jpg(cub: Path) -> str:
    image = _first_image(cub)
    image.write_bytes(_truncated_png())
    return f"images/{image.relative_to(cub / 'images').as_posix()} (cannot decode"


def _latin1_class_name(cub: Path) -> str:
    _replace_line(cub / "classes.txt", 3, b"3 003.Gr\xe9be")
    return "classes.txt:3: not UTF-8 (bytes b'\\xe9'"


def _latin1_image_path(cub: Path) -> str:
    line = (cub / "images.txt").read_bytes().splitlines()[4]
    _replace_line(cub / "images.txt", 5, line.replace(b".jpg", b"\xe9.jpg"))
    return "images.txt:5: not UTF-8"


def _nan_box(cub: Path) -> str:
    _replace_line(cub / "bounding_boxes.txt", 2, b"2 NaN 10.0 40.0 30.0")
    return "bounding_boxes.txt:2: box values must be finite numbers"


def _infinite_box(cub: Path) -> str:
    _replace_line(cub / "bounding_boxes.txt", 6, b"6 1.0 2.0 inf 30.0")
    return "bounding_boxes.txt:6: box values must be finite numbers"


ROWS: dict[str, tuple[Callable[[Path], str], tuple[str, ...]]] = {
    "truncated-png": (_truncated_png_in_place_of_a_jpg, ()),
    "latin1-classes": (_latin1_class_name, ()),
    "latin1-image-path": (_latin1_image_path, ()),
    "nan-box-crop": (_nan_box, ("--crop-bbox",)),
    "inf-box": (_infinite_box, ()),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_source_is_one_line_and_no_manifest(row: str, cub_copy: Path, tmp_path: Path) -> None:
    damage, extra = ROWS[row]
    fragment = damage(cub_copy)
    out = tmp_path / "out"
    result = run_cli("pipeline", "build", "--source", str(cub_copy), "--out", str(out), *BUILD_ARGS, *extra)
    assert_one_line_error(result, fragment)
    assert not (out / "manifest.json").exists()


def test_truncated_png_is_skipped_with_skip_bad(cub_copy: Path, tmp_path: Path) -> None:
    image = _first_image(cub_copy)
    image.write_bytes(_truncated_png())
    out = tmp_path / "out"
    result = run_cli("pipeline", "build", "--source", str(cub_copy), "--out", str(out), "--skip-bad", *BUILD_ARGS)
    assert result.returncode == 0, result.stderr
    [skipped] = json.loads((out / "manifest.json").read_text())["skipped"]
    assert skipped["path"] == f"images/{image.relative_to(cub_copy / 'images').as_posix()}"
    assert skipped["reason"].startswith("cannot decode (OSError")


@pytest.mark.parametrize(("limit", "fragment"), [(("--max-extract-gb", "0.000001"), "unpacks to more than"),
                                                 (("--max-extract-files", "5"), "more than 5 members")])
def test_archive_over_the_extract_limit_is_one_line(cub_source: Path, tmp_path: Path, limit: tuple[str, str],
                                                    fragment: str) -> None:
    tgz = cub_source / "CUB_200_2011.tgz"
    out = tmp_path / "out"
    result = run_cli("pipeline", "build", "--source", str(tgz), "--out", str(out), *BUILD_ARGS, *limit)
    assert_one_line_error(result, str(tgz), fragment, "over the limit")
    assert not out.exists()


def test_crlf_blanks_and_bom_build_the_same_shards(cub_copy: Path, shard_set: Path, tmp_path: Path) -> None:
    for path in sorted(cub_copy.glob("*.txt")):
        lines = path.read_text().splitlines()
        path.write_bytes(b"\xef\xbb\xbf" + "".join(f"{line}  \t\r\n" for line in lines).encode())
    tgz = tmp_path / "padded.tgz"
    pack_tgz(cub_copy, tgz)  # and through the .tgz, like a downloaded archive
    out = tmp_path / "out"
    result = run_cli("pipeline", "build", "--source", str(tgz), "--out", str(out), *BUILD_ARGS)
    assert result.returncode == 0, result.stderr
    built, clean = (json.loads((d / "manifest.json").read_text()) for d in (out, shard_set))
    assert built["classes"] == clean["classes"]
    assert built["splits"] == clean["splits"]  # every shard's name, size and sha256


def test_sample_json_is_strict(tmp_path: Path) -> None:
    """No NaN can reach a sample's JSON: the listing refuses it, and the writer would rather fail."""
    from pipeline.encode import EncodeOptions
    from pipeline.sources import Record
    from pipeline.writer import SampleTask, encode_sample

    image = tmp_path / "x.jpg"
    Image.new("RGB", (64, 48)).save(image, "JPEG")
    record = Record(image_id=1, path="x.jpg", label=0, split="train", bbox=(math.nan, 0.0, 10.0, 10.0))
    task = SampleTask(record, str(image), "A", "train", EncodeOptions(resize_short=32))
    sample = encode_sample(task).sample
    with pytest.raises(ValueError, match="JSON compliant"):
        sample.members()  # what the shard writer writes
