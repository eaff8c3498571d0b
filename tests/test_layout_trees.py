"""Which tree is read as what, through the real `python -m pipeline build`: split folders never become
classes (train/ with val/ and no test/ carves test from train; partial split trees are refused), a CUB or
NABirds tree with a listing file missing names the file instead of becoming an ImageFolder, and empty
listing files say "0 images" and leave nothing behind."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from support import assert_one_line_error, paths_by_split, run_cli, samples

from pipeline.errors import UserError
from pipeline.sources import Dataset, Settings
from pipeline.sources.base import check_records
from pipeline.splits import carve, num_valid
from pipeline.synth import synth

CLASSES, PER_CLASS = 3, 8
SPECIES = ["Blue Plain Boxbill", "Lime Plain Wedgewing", "Red Plain Plover"]  # the synth classes, sorted
BUILD = ("--resize-short", "32", "--shard-samples", "6", "--workers", "1", "--quiet")
CUB_FILES = ("classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same synth birds in each layout: layout -> its dataset folder (CUB_200_2011/, nabirds/, imagefolder/)."""
    out = tmp_path_factory.mktemp("trees")
    return {layout: synth(out / layout, CLASSES, PER_CLASS, seed=0, progress=False, layout=layout)
            for layout in ("cub", "nabirds", "imagefolder")}


def build(source: Path, out: Path, *extra: str) -> dict:
    result = run_cli("pipeline", "build", "--source", str(source), "--out", str(out), *BUILD, *extra)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "manifest.json").read_text())


def refused(source: Path, out: Path, *fragments: str, extra: tuple[str, ...] = ()) -> None:
    """One error line holding every fragment, and nothing written: not even the --out folder."""
    result = run_cli("pipeline", "build", "--source", str(source), "--out", str(out), *BUILD, *extra)
    assert_one_line_error(result, *fragments)
    assert not out.exists()


def images(folder: Path) -> dict[str, list[str]]:
    """class folder name -> the image paths below it, relative to folder's parent (as the samples record them)."""
    return {c.name: sorted(p.relative_to(folder.parent).as_posix() for p in c.iterdir())
            for c in sorted(folder.iterdir())}


def copy_tree(sources: dict[str, Path], tmp_path: Path, **renames: str) -> Path:
    """A private copy of the synth ImageFolder tree, its split folders renamed (old name -> new name)."""
    root = Path(shutil.copytree(sources["imagefolder"], tmp_path / "src"))
    for old, new in renames.items():
        (root / old).rename(root / new)
    return root


# ---------------------------------------------------------------- split folders


@pytest.mark.parametrize("valid_folder", ["val", "valid", "Validation"])
def test_train_and_val_without_test_carve_the_test_split_from_train(
        valid_folder: str, sources: dict[str, Path], tmp_path: Path) -> None:
    root = copy_tree(sources, tmp_path, test=valid_folder)
    train, valid = images(root / "train"), images(root / valid_folder)
    manifest = build(root, tmp_path / "out")
    assert manifest["classes"] == SPECIES  # never "train" and "val"
    assert manifest["source"]["layout"] == "imagefolder" and manifest["source"]["test_fraction"] == 0.2
    split = paths_by_split(tmp_path / "out")
    assert split["valid"] == {p for found in valid.values() for p in found}  # exactly the val/ files
    carved = carve(train, 0.2, 0, "test")  # seeded and stratified, as for class folders
    assert split["test"] == carved and split["train"] == {p for found in train.values() for p in found} - carved
    assert manifest["splits"]["test"]["class_counts"] == [num_valid(len(train[c]), 0.2) for c in SPECIES] == [1] * 3
    assert manifest["splits"]["valid"]["class_counts"] == [len(valid[c]) for c in SPECIES] == [4] * 3
    assert manifest["splits"]["train"]["class_counts"] == [3] * 3


def test_train_folder_alone_carves_test_and_valid(sources: dict[str, Path], tmp_path: Path) -> None:
    root = copy_tree(sources, tmp_path)
    shutil.rmtree(root / "test")
    train = images(root / "train")
    manifest = build(root, tmp_path / "out", "--test-fraction", "0.5", "--seed", "3")
    assert manifest["classes"] == SPECIES and manifest["source"]["test_fraction"] == 0.5
    split = paths_by_split(tmp_path / "out")
    assert split["test"] == carve(train, 0.5, 3, "test")
    assert split["train"] | split["valid"] | split["test"] == {p for found in train.values() for p in found}
    assert [manifest["splits"][s]["class_counts"] for s in ("train", "valid", "test")] == [[1] * 3, [1] * 3, [2] * 3]


def test_split_folder_names_in_any_case(sources: dict[str, Path], tmp_path: Path) -> None:
    root = copy_tree(sources, tmp_path, train="Train", test="TEST")
    manifest = build(root, tmp_path / "out")
    assert manifest["classes"] == SPECIES and "test_fraction" not in manifest["source"]
    split = paths_by_split(tmp_path / "out")
    assert split["test"] == {p for found in images(root / "TEST").values() for p in found}
    assert split["train"] | split["valid"] == {p for found in images(root / "Train").values() for p in found}


def _val_only(root: Path) -> tuple[str, ...]:
    shutil.rmtree(root / "train")
    (root / "test").rename(root / "val")
    return (f"{root}: split folder val/ without a train/ folder",)


def _test_and_val_only(root: Path) -> tuple[str, ...]:
    (root / "train").rename(root / "val")
    return (f"{root}: split folder test/, val/ without a train/ folder",)


def _nested_one_level_too_deep(root: Path) -> tuple[str, ...]:
    shutil.rmtree(root / "test")
    (root / "train").rename(root / "inner")
    (root / "train").mkdir()
    (root / "inner").rename(root / "train" / "train")
    return (f"{root / 'train' / 'train'}: a class folder named like a split folder",)


def _split_folders_inside_class_folders(root: Path) -> tuple[str, ...]:
    for split in ("train", "test"):
        for folder in sorted((root / split).iterdir()):
            (root / "flat" / folder.name).mkdir(parents=True, exist_ok=True)
            folder.rename(root / "flat" / folder.name / split)
        (root / split).rmdir()
    (root / "README").unlink()  # the lone folder flat/ is the root then
    return (f"{root / 'flat' / SPECIES[0] / 'test'}: a split folder inside class folder {SPECIES[0]!r}",)


def _image_directly_in_a_split_folder(root: Path) -> tuple[str, ...]:
    image = sorted((root / "train").rglob("*.jpg"))[0]
    image.rename(root / "train" / image.name)
    return (f"{root / 'train' / image.name}: an image directly in a split folder has no class",)


def _val_and_valid(root: Path) -> tuple[str, ...]:
    shutil.copytree(root / "test", root / "val")
    (root / "test").rename(root / "valid")
    return (f"{root}: both val/ and valid/ are valid folders",)


PARTIAL: list[tuple[str, Callable[[Path], tuple[str, ...]]]] = [
    ("val only", _val_only), ("test and val, no train", _test_and_val_only),
    ("nested one level too deep", _nested_one_level_too_deep),
    ("split folders inside class folders", _split_folders_inside_class_folders),
    ("image directly in a split folder", _image_directly_in_a_split_folder), ("val and valid", _val_and_valid),
]


@pytest.mark.parametrize("damage", [p[1] for p in PARTIAL], ids=[p[0] for p in PARTIAL])
def test_partial_split_trees_are_refused(damage: Callable[[Path], tuple[str, ...]], sources: dict[str, Path],
                                         tmp_path: Path) -> None:
    root = copy_tree(sources, tmp_path)
    refused(root, tmp_path / "out", *damage(root))


# ---------------------------------------------------------------- listing trees


@pytest.mark.parametrize(("layout", "missing", "title"), [
    ("cub", "images.txt", "CUB's"), ("cub", "image_class_labels.txt", "CUB's"), ("cub", "classes.txt", "CUB's"),
    ("nabirds", "hierarchy.txt", "NABirds'"), ("nabirds", "images.txt", "NABirds'"),
])
def test_a_missing_listing_file_is_named(layout: str, missing: str, title: str, sources: dict[str, Path],
                                         tmp_path: Path) -> None:
    """Given as the folder that holds the dataset's folder (the README's form), or that folder renamed."""
    root = Path(shutil.copytree(sources[layout], tmp_path / "holder" / sources[layout].name))
    (root / missing).unlink()
    refused(root.parent, tmp_path / "out", f"not {title} layout: {root / missing} is missing")
    renamed = root.rename(tmp_path / "holder" / "birds")
    refused(renamed.parent, tmp_path / "out", f"not {title} layout: {renamed / missing} is missing")


@pytest.mark.parametrize("layout", ["cub", "nabirds"])
def test_layout_imagefolder_refuses_a_listing_tree(layout: str, sources: dict[str, Path], tmp_path: Path) -> None:
    found = ", ".join(name for name in (*CUB_FILES, "hierarchy.txt") if (sources[layout] / name).is_file())
    says = f"{sources[layout]}: holds {found} (listing files of the cub and nabirds layouts)"
    for source in (sources[layout], sources[layout].parent):
        refused(source, tmp_path / "out", says, extra=("--layout", "imagefolder"))


def test_a_listing_tree_under_another_name_is_read_as_its_layout(sources: dict[str, Path], tmp_path: Path) -> None:
    root = Path(shutil.copytree(sources["cub"], tmp_path / "holder" / "my birds"))
    manifest = build(root.parent, tmp_path / "out")
    assert manifest["source"]["layout"] == "cub"
    assert manifest["classes"] == ["001.Red_Plain_Plover", "002.Blue_Plain_Boxbill", "003.Lime_Plain_Wedgewing"]
    flags = dict(line.split() for line in (root / "train_test_split.txt").read_text().splitlines())
    found = samples(tmp_path / "out")
    assert sorted(found) == sorted(f"{int(i):05d}" for i in flags)
    assert {key for key, meta in found.items() if meta["split"] == "test"} == \
        {f"{int(i):05d}" for i, flag in flags.items() if flag == "0"}


# ---------------------------------------------------------------- empty listings


@pytest.mark.parametrize("layout", ["cub", "nabirds"])
def test_empty_listing_files_say_0_images_and_leave_nothing(layout: str, sources: dict[str, Path],
                                                            tmp_path: Path) -> None:
    root = Path(shutil.copytree(sources[layout], tmp_path / sources[layout].name))
    for name in (*CUB_FILES, "hierarchy.txt"):
        if (root / name).is_file():
            (root / name).write_bytes(b"\n")
    refused(root, tmp_path / "out", f"{root / 'images.txt'}: 0 images")
    refused(root, tmp_path / "out", f"{root / 'images.txt'}: 0 images", extra=("--overwrite",))


def test_a_layout_that_yields_no_images_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="0 images: nothing to build"):
        check_records(Dataset("cub", tmp_path, ["a"], []), Settings())
