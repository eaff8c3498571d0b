"""Reading CUB's listing files: parsing, cross-checks with file:line errors, directory vs .tgz."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SMALL, assert_one_line_error, run_cli

from pipeline.cub import Cub, fingerprint, image_sizes, open_source, read_cub
from pipeline.errors import UserError


def test_reads_synth_layout(cub_source: Path) -> None:
    cub = read_cub(cub_source / "CUB_200_2011")
    assert len(cub.classes) == SMALL["classes"]
    assert len(cub.records) == SMALL["classes"] * SMALL["per_class"]
    assert [r.image_id for r in cub.records] == sorted(r.image_id for r in cub.records)
    assert {r.label for r in cub.records} == set(range(SMALL["classes"]))
    assert all(cub.image_path(r).is_file() for r in cub.records)


def test_directory_and_tgz_read_the_same(cub_source: Path) -> None:
    directory = read_cub(cub_source / "CUB_200_2011")
    with open_source(cub_source / "CUB_200_2011.tgz") as root:
        packed = read_cub(root)
        assert _fingerprint(packed) == _fingerprint(directory)
    assert packed.records == directory.records and packed.classes == directory.classes
    with open_source(cub_source) as root:  # the folder holding CUB_200_2011/ works too
        assert root.name == "CUB_200_2011"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_missing_listing_file_is_named(cub_copy: Path) -> None:
    (cub_copy / "bounding_boxes.txt").unlink()
    with pytest.raises(UserError, match="bounding_boxes.txt is missing"):
        read_cub(cub_copy)


def test_missing_source(tmp_path: Path) -> None:
    result = run_cli("pipeline", "build", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "no such file or directory")


def test_not_cub_layout(tmp_path: Path) -> None:
    (tmp_path / "some_dir").mkdir()
    result = run_cli("pipeline", "build", "--source", str(tmp_path / "some_dir"), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "images.txt")


def test_id_missing_in_one_file(cub_copy: Path) -> None:
    lines = (cub_copy / "image_class_labels.txt").read_text().splitlines()
    (cub_copy / "image_class_labels.txt").write_text("\n".join(lines[:4] + lines[5:]) + "\n")
    with pytest.raises(UserError, match=r"images.txt:5: id 5 is missing from image_class_labels.txt"):
        read_cub(cub_copy)


def test_label_out_of_range(cub_copy: Path) -> None:
    _edit(cub_copy / "image_class_labels.txt", "3 1\n", "3 99\n")
    with pytest.raises(UserError, match=r"image_class_labels.txt:3: label 99 out of range 1..6"):
        read_cub(cub_copy)


def test_duplicate_id(cub_copy: Path) -> None:
    _edit(cub_copy / "train_test_split.txt", "2 ", "1 ")
    with pytest.raises(UserError, match=r"train_test_split.txt:2: duplicate id 1 \(first on line 1\)"):
        read_cub(cub_copy)


def test_malformed_line_via_cli(cub_copy: Path, tmp_path: Path) -> None:
    _edit(cub_copy / "bounding_boxes.txt", "4 ", "4 x ")
    result = run_cli("pipeline", "build", "--source", str(cub_copy), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "bounding_boxes.txt:4")
    assert not (tmp_path / "o").exists()


def test_fingerprint_changes_with_source(cub_copy: Path, cub_source: Path) -> None:
    before = _fingerprint(read_cub(cub_copy))
    image = next((cub_copy / "images").rglob("*.jpg"))
    image.write_bytes(image.read_bytes() + b"\0")
    assert _fingerprint(read_cub(cub_copy)) != before


def test_image_sizes_mark_missing_and_non_files(cub_copy: Path) -> None:
    cub = read_cub(cub_copy)
    first, second = cub.image_path(cub.records[0]), cub.image_path(cub.records[1])
    first.unlink()
    second.unlink()
    second.mkdir()
    sizes = image_sizes(cub)
    assert sizes[:2] == [-1, -1]
    assert sizes[2:] == [cub.image_path(r).stat().st_size for r in cub.records[2:]]


def _fingerprint(cub: Cub) -> str:
    return fingerprint(cub, image_sizes(cub))
