"""Reading CUB's listing files: parsing, cross-checks with file:line errors, directory vs .tgz."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SMALL
from support import assert_one_line_error, run_cli

from pipeline.errors import UserError
from pipeline.sources import Dataset, Settings, image_sizes, open_dataset
from pipeline.sources import cub as cub_layout


def test_reads_synth_layout(cub_source: Path) -> None:
    cub = read_cub(cub_source / "CUB_200_2011")
    assert len(cub.classes) == SMALL["classes"]
    assert len(cub.records) == SMALL["classes"] * SMALL["per_class"]
    assert [r.image_id for r in cub.records] == sorted(r.image_id for r in cub.records)
    assert {r.label for r in cub.records} == set(range(SMALL["classes"]))
    assert all(cub.image_path(r).is_file() for r in cub.records)


def test_directory_and_tgz_read_the_same(cub_source: Path) -> None:
    directory = read_cub(cub_source / "CUB_200_2011")
    with open_dataset(cub_source / "CUB_200_2011.tgz", "cub") as packed:
        assert _fingerprint(packed) == _fingerprint(directory)
    assert packed.records == directory.records and packed.classes == directory.classes
    with open_dataset(cub_source, "cub") as dataset:  # the folder holding CUB_200_2011/ works too
        assert dataset.root.name == "CUB_200_2011"


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


def _fingerprint(cub: Dataset) -> str:
    return cub.fingerprint(image_sizes(cub))

def read_cub(root: Path) -> Dataset:
    return cub_layout.read(Path(root), Settings())



# ---------------------------------------------------------------- encodings and whitespace


def test_latin1_class_name_is_refused_with_file_line_and_bytes(cub_copy: Path) -> None:
    lines = (cub_copy / "classes.txt").read_bytes().splitlines(keepends=True)
    lines[2] = b"3 003.Gr\xe9be\n"  # Latin-1 e-acute
    (cub_copy / "classes.txt").write_bytes(b"".join(lines))
    with pytest.raises(UserError) as caught:
        read_cub(cub_copy)
    assert str(caught.value) == ("classes.txt:3: not UTF-8 (bytes b'\\xe9' at byte 9 of the line); listing files "
                                 "must be UTF-8: convert it, e.g. `iconv -f latin1 -t utf-8`")


def test_non_utf8_image_path_is_refused(cub_copy: Path) -> None:
    lines = (cub_copy / "images.txt").read_bytes().splitlines(keepends=True)
    lines[6] = lines[6].replace(b".jpg", b"\xff\xfe.jpg")
    (cub_copy / "images.txt").write_bytes(b"".join(lines))
    with pytest.raises(UserError, match=r"^images.txt:7: not UTF-8 \(bytes b'\\xff' at byte "):
        read_cub(cub_copy)


def test_utf8_bom_and_utf8_names_are_read(cub_copy: Path) -> None:
    path = cub_copy / "classes.txt"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b" Gr\xc3\xa9be\n", 1))
    cub = read_cub(cub_copy)
    assert cub.classes[0].endswith(" Gr\u00e9be") and " " in cub.classes[0]  # inner spaces of the last field kept
    assert not cub.classes[0].startswith("\ufeff")


def test_trailing_whitespace_tabs_and_crlf_are_ignored(cub_copy: Path) -> None:
    clean = read_cub(cub_copy)
    for name in ("classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt",
                 "bounding_boxes.txt"):
        path = cub_copy / name
        lines = path.read_text().splitlines()
        path.write_text("".join(f" {line.replace(' ', chr(9) + ' ', 1)} \t \r\n" for line in lines))
    padded = read_cub(cub_copy)
    assert padded.classes == clean.classes and padded.records == clean.records
    assert image_sizes(padded) == image_sizes(clean) and -1 not in image_sizes(padded)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_non_finite_box_is_refused(cub_copy: Path, value: str) -> None:
    lines = (cub_copy / "bounding_boxes.txt").read_text().splitlines()
    fields = lines[4].split()
    lines[4] = " ".join([fields[0], fields[1], value, *fields[3:]])
    (cub_copy / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"^bounding_boxes.txt:5: box values must be finite numbers"):
        read_cub(cub_copy)
