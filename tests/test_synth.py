"""pipeline.synth: official layout, consistent listings, the real download's quirks, determinism."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline.errors import UserError
from pipeline.synth import synth

CLASSES, PER_CLASS = 3, 6
LISTINGS = ("classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")


def _rows(root: Path, name: str) -> dict[int, list[str]]:
    rows = {}
    for line in (root / name).read_text(encoding="utf-8").splitlines():
        key, *fields = line.split(" ")
        rows[int(key)] = fields
    return rows


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    root = synth(out, classes=CLASSES, per_class=PER_CLASS, seed=0, tgz=True, progress=False)
    assert root == out / "CUB_200_2011"
    return out


def test_layout_and_listings_are_consistent(made: Path) -> None:
    root = made / "CUB_200_2011"
    for name in LISTINGS:
        assert (root / name).is_file(), name
    assert not [p.name for p in made.iterdir() if p.name.startswith(".")], "temporary directories left behind"

    classes = _rows(root, "classes.txt")
    assert sorted(classes) == list(range(1, CLASSES + 1))
    assert all(fields[0].startswith(f"{label:03d}.") for label, fields in classes.items())

    images = _rows(root, "images.txt")
    labels = _rows(root, "image_class_labels.txt")
    split = _rows(root, "train_test_split.txt")
    boxes = _rows(root, "bounding_boxes.txt")
    n = CLASSES * PER_CLASS
    assert list(images) == list(range(1, n + 1))
    assert set(labels) == set(split) == set(boxes) == set(images)
    assert sorted(p.relative_to(root / "images").as_posix() for p in (root / "images").rglob("*.jpg")) \
        == sorted(fields[0] for fields in images.values())

    previous_label = 0
    for image_id, (relpath,) in images.items():
        label = int(labels[image_id][0])
        assert label >= previous_label, "images.txt is ordered by class"
        previous_label = label
        assert relpath.split("/")[0] == classes[label][0]
        x, y, w, h = (float(v) for v in boxes[image_id])
        assert all("." in v for v in boxes[image_id])
        width, height = Image.open(root / "images" / relpath).size
        assert 300 <= width <= 500 and 300 <= height <= 500
        assert x >= 0 and y >= 0 and w > 20 and h > 20 and x + w <= width and y + h <= height

    for label in classes:
        flags = [int(split[i][0]) for i in images if int(labels[i][0]) == label]
        assert set(flags) == {0, 1} and abs(sum(flags) - PER_CLASS / 2) <= 1


def test_quirks_of_the_real_download_are_present(made: Path) -> None:
    root = made / "CUB_200_2011"
    found = {"L": 0, "CMYK": 0, "PNG": 0}
    for (relpath,) in _rows(root, "images.txt").values():
        with Image.open(root / "images" / relpath) as image:
            assert relpath.endswith(".jpg")
            if image.format == "PNG":
                found["PNG"] += 1
            else:
                assert image.format == "JPEG"
                if image.mode in found:
                    found[image.mode] += 1
    assert found["L"] >= 1 and found["CMYK"] >= 1 and found["PNG"] == 1


def test_tgz_unpacks_like_the_official_archive(made: Path) -> None:
    with tarfile.open(made / "CUB_200_2011.tgz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] == "CUB_200_2011"
    assert all(name.split("/")[0] == "CUB_200_2011" for name in names)
    assert "CUB_200_2011/images.txt" in names
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
    assert len([m for m in members if m.isfile()]) == len(_tree_digest(made / "CUB_200_2011"))


def test_same_seed_is_byte_identical_and_another_seed_differs(made: Path, tmp_path: Path) -> None:
    again = synth(tmp_path / "again", classes=CLASSES, per_class=PER_CLASS, seed=0, tgz=True, progress=False)
    assert _tree_digest(again) == _tree_digest(made / "CUB_200_2011")
    tgz_digest = hashlib.sha256((made / "CUB_200_2011.tgz").read_bytes()).hexdigest()
    assert hashlib.sha256((tmp_path / "again" / "CUB_200_2011.tgz").read_bytes()).hexdigest() == tgz_digest

    other = synth(tmp_path / "other", classes=CLASSES, per_class=PER_CLASS, seed=1, progress=False)
    a, b = _tree_digest(made / "CUB_200_2011"), _tree_digest(other)
    assert a.keys() == b.keys()
    assert a["classes.txt"] == b["classes.txt"], "class names do not depend on the seed"
    differing = [k for k in a if k.endswith(".jpg") and a[k] != b[k]]
    assert len(differing) == CLASSES * PER_CLASS


def test_rerun_replaces_its_own_dataset_but_not_someone_elses(tmp_path: Path) -> None:
    synth(tmp_path, classes=1, per_class=2, progress=False)
    root = synth(tmp_path, classes=2, per_class=2, progress=False)
    assert len((root / "images.txt").read_text().splitlines()) == 4
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]

    foreign = tmp_path / "real" / "CUB_200_2011"
    foreign.mkdir(parents=True)
    (foreign / "images.txt").write_text("1 001.A/a.jpg\n")
    with pytest.raises(UserError, match="not a synthetic dataset"):
        synth(tmp_path / "real", classes=1, per_class=2, progress=False)
    assert (foreign / "images.txt").read_text() == "1 001.A/a.jpg\n"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"classes": 0}, "--classes"),
    ({"classes": 1000}, "--classes"),
    ({"per_class": 1}, "--per-class"),
    ({"seed": -1}, "--seed"),
])
def test_bad_arguments_are_user_errors(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(UserError, match=message):
        synth(tmp_path, progress=False, **kwargs)
    assert not any(tmp_path.iterdir())


def test_other_layouts_hold_the_same_images_and_are_byte_identical(made: Path, tmp_path: Path) -> None:
    cub = {digest for name, digest in _tree_digest(made / "CUB_200_2011").items() if name.startswith("images/")}
    for layout, folder in (("nabirds", "nabirds"), ("imagefolder", "imagefolder")):
        root = synth(tmp_path / "a", classes=CLASSES, per_class=PER_CLASS, seed=0, tgz=True, progress=False,
                     layout=layout)
        again = synth(tmp_path / "b", classes=CLASSES, per_class=PER_CLASS, seed=0, tgz=True, progress=False,
                      layout=layout)
        assert root.name == folder and _tree_digest(root) == _tree_digest(again)
        assert (tmp_path / "a" / f"{folder}.tgz").read_bytes() == (tmp_path / "b" / f"{folder}.tgz").read_bytes()
        images = {name: digest for name, digest in _tree_digest(root).items() if not name.endswith((".txt", "README"))}
        assert len(images) == CLASSES * PER_CLASS
        jpgs = {digest for name, digest in images.items() if name.endswith(".jpg")}
        assert jpgs <= cub and len(jpgs) == (len(images) if layout == "nabirds" else len(images) - 3)  # ids 3, 7, 11


def test_unknown_layout_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--layout must be one of cub, nabirds, imagefolder"):
        synth(tmp_path, progress=False, layout="coco")
    assert not any(tmp_path.iterdir())
