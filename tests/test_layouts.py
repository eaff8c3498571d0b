"""Dataset layouts as plug-ins: NABirds and ImageFolder sources synthesised, built (auto-detected and named),
verified and inspected; sample keys safe whatever the ids; hostile sources refused with one line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import FIT_ARGS
from support import (
    ONE_THREAD,
    assert_one_line_error,
    paths_by_split,
    run_cli,
    run_in_process,
    run_main,
    samples,
)
from webdataset.tariterators import base_plus_ext

from pipeline.__main__ import main as pipeline_main
from pipeline.sources import LAYOUTS, sample_key
from pipeline.splits import num_valid
from pipeline.synth import synth

CLASSES, PER_CLASS = 3, 6
BUILD = ("--resize-short", "48", "--shard-samples", "5", "--workers", "1", "--quiet")


def pipeline(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in this process, shaped like a subprocess result."""
    return run_in_process(capsys, pipeline_main, "pipeline", *args)


def build(capsys: pytest.CaptureFixture[str], source: Path, out: Path, *extra: str) -> dict:
    result = pipeline(capsys, "build", "--source", str(source), "--out", str(out), *BUILD, *extra)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "manifest.json").read_text())


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


@pytest.fixture(scope="module")
def nabirds_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth(tmp_path_factory.mktemp("nabirds"), CLASSES, PER_CLASS, seed=0, tgz=True, progress=False,
                 layout="nabirds")


@pytest.fixture(scope="module")
def folder_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth(tmp_path_factory.mktemp("folder"), CLASSES, PER_CLASS, seed=0, tgz=True, progress=False,
                 layout="imagefolder")


def test_sample_keys_are_safe_distinct_and_stable() -> None:
    hostile = ["a.b", "a_b", "a b", "a/b", "../x", "ü-bird", "Grünfink.jpg", "", ".", "a" * 200, "x\udcff",
               "0000139e-21dc-4d0c-bfe1-4cae3c85c829", "00042"]
    keys = [sample_key(raw) for raw in hostile]
    assert len(set(keys)) == len(hostile)
    for raw, key in zip(hostile, keys, strict=True):
        assert key.isascii() and "." not in key and "/" not in key and 0 < len(key) <= 73, (raw, key)
        assert base_plus_ext(f"{key}.json") == (key, "json"), raw  # webdataset splits at the first dot
    assert keys[-2:] == hostile[-2:]  # already safe: kept (CUB's zero-padded ids, NABirds' UUIDs)
    assert sample_key("a.b") == "a_b_" + hashlib.sha256(b"a.b").hexdigest()[:12]


def test_nabirds_builds_verifies_and_keeps_its_taxonomy(nabirds_src: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    auto = build(capsys, nabirds_src.parent, tmp_path / "auto")  # the folder holding nabirds/ is found too
    named = build(capsys, Path(f"{nabirds_src}.tgz"), tmp_path / "named", "--layout", "nabirds")
    assert digests(tmp_path / "auto") == digests(tmp_path / "named") and auto == named  # dir and .tgz alike
    assert auto["source"]["layout"] == "nabirds"
    # Leaf ids descend with the synth class index, so labels follow class ids, not the listing order.
    assert auto["class_ids"] == [4993, 4996, 4999]
    assert auto["classes"] == ["Lime Plain Wedgewing", "Blue Plain Boxbill", "Red Plain Plover"]
    assert auto["class_parents"] == [["Wedgewings", "Birds"], ["Boxbills and Kin", "Birds"],
                                     ["Plovers, Dotterels, and Allies", "Birds"]]
    flags = [line.split()[1] for line in (nabirds_src / "train_test_split.txt").read_text().splitlines()]
    assert auto["splits"]["test"]["num_samples"] == flags.count("0")
    labels = dict(line.split() for line in (nabirds_src / "image_class_labels.txt").read_text().splitlines())
    found = samples(tmp_path / "auto")
    assert sorted(found) == sorted(labels)  # the UUIDs are the keys
    for key, meta in found.items():
        assert meta["image_id"] == key and meta["class_id"] == int(labels[key])
        assert auto["class_ids"][meta["class_index"]] == meta["class_id"] and len(meta["bbox"]) == 4
    assert pipeline(capsys, "verify", str(tmp_path / "auto"), "--quiet").returncode == 0
    inspected = pipeline(capsys, "inspect", str(tmp_path / "auto"))
    assert inspected.returncode == 0 and f"{CLASSES} classes" in inspected.stdout


def test_imagefolder_split_folders(folder_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    auto = build(capsys, folder_src, tmp_path / "auto")
    named = build(capsys, Path(f"{folder_src}.tgz"), tmp_path / "named", "--layout", "imagefolder")  # top folder
    assert digests(tmp_path / "auto") == digests(tmp_path / "named") and auto == named
    assert auto["classes"] == sorted(p.name for p in (folder_src / "train").iterdir())
    assert auto["source"]["layout"] == "imagefolder" and "test_fraction" not in auto["source"]
    test_files = [p for p in (folder_src / "test").rglob("*") if p.is_file()]
    assert auto["splits"]["test"]["num_samples"] == len(test_files)
    found = samples(tmp_path / "auto")
    assert len(found) == CLASSES * PER_CLASS and not auto["skipped"]  # .png, .webp and .bmp files included
    assert {Path(m["path"]).suffix for m in found.values()} == {".jpg", ".png", ".webp", ".bmp"}
    for key, meta in found.items():
        assert meta["image_id"] == meta["path"] and key == sample_key(meta["path"]) and meta["bbox"] is None
        assert (folder_src / meta["path"]).parent.name == auto["classes"][meta["class_index"]]
    assert pipeline(capsys, "verify", str(tmp_path / "auto"), "--quiet").returncode == 0
    assert pipeline(capsys, "inspect", str(tmp_path / "auto")).returncode == 0


def test_imagefolder_hostile_names(folder_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Unicode, spaces, dots, a leading dash and a file name that is not UTF-8 become safe, distinct keys."""
    images = sorted(p for p in (folder_src / "train").rglob("*.jpg"))
    names = {"Grünfink": ["bild ä.b.jpg", "bild_ä_b.JPG", "-x..y.jpeg"], "a.b c": [".hidden.jpg", "ok.jpg"]}
    root = tmp_path / "hostile"
    for (folder, files), start in zip(names.items(), (0, 3), strict=True):
        (root / folder).mkdir(parents=True)
        for name, image in zip(files, images[start:], strict=False):
            shutil.copy(image, root / folder / name)
    shutil.copy(images[5], os.path.join(os.fsencode(root / "a.b c"), b"\xff\xfe.jpg"))
    (root / "a.b c" / "notes.txt").write_text("not an image\n")
    manifest = build(capsys, root, tmp_path / "out", "--test-fraction", "0.3")
    assert manifest["classes"] == ["Grünfink", "a.b c"]
    found = samples(tmp_path / "out")
    assert len(found) == 5  # hidden files and other extensions are left out
    assert all(key.isascii() and "." not in key for key in found)
    assert sorted(m["class_name"] for m in found.values()) == ["Grünfink"] * 3 + ["a.b c"] * 2
    assert "a.b c/\udcff\udcfe.jpg" in {m["path"] for m in found.values()}
    assert pipeline(capsys, "verify", str(tmp_path / "out"), "--quiet").returncode == 0


def _flat_copy(folder_src: Path, root: Path) -> Path:
    """ROOT/<class>/* holding all of the synth set's images."""
    for path in sorted(folder_src.glob("*/*/*")):
        (root / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / path.parent.name / path.name)
    return root


def test_imagefolder_class_folders_get_a_seeded_stratified_test_split(
        folder_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flat = _flat_copy(folder_src, tmp_path / "flat")
    manifest = build(capsys, flat, tmp_path / "out", "--test-fraction", "0.25")
    assert manifest["source"]["test_fraction"] == 0.25
    assert manifest["splits"]["test"]["class_counts"] == [num_valid(PER_CLASS, 0.25)] * CLASSES
    train = PER_CLASS - num_valid(PER_CLASS, 0.25)
    assert manifest["splits"]["valid"]["class_counts"] == [num_valid(train, 0.1)] * CLASSES
    default = build(capsys, flat, tmp_path / "default")
    assert default["splits"]["test"]["class_counts"] == [num_valid(PER_CLASS, 0.2)] * CLASSES
    other_seed = build(capsys, flat, tmp_path / "seed", "--test-fraction", "0.25", "--seed", "5")
    assert other_seed["splits"]["test"]["class_counts"] == manifest["splits"]["test"]["class_counts"]
    assert {k for k, m in samples(tmp_path / "seed").items() if m["split"] == "test"} != \
        {k for k, m in samples(tmp_path / "out").items() if m["split"] == "test"}
    refused = pipeline(capsys, "build", "--source", str(flat), "--out", str(tmp_path / "out"), *BUILD,
                       "--test-fraction", "0.5")
    assert_one_line_error(refused, "another source", "--overwrite")


def test_imagefolder_val_folder_is_the_valid_split(folder_src: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Each split is exactly its folder's files, by path: val/ is the valid split as it is (never mixed into
    train and carved again), so neither the seed nor --valid-fraction changes which images are where."""
    root = Path(shutil.copytree(folder_src, tmp_path / "src"))
    moved = []
    for folder in sorted((root / "train").iterdir()):
        (root / "val" / folder.name).mkdir(parents=True)
        moved += [image.rename(root / "val" / folder.name / image.name) for image in sorted(folder.iterdir())[:2]]
    expected = {split: {p.relative_to(root).as_posix() for p in (root / folder).rglob("*") if p.is_file()}
                for split, folder in (("train", "train"), ("valid", "val"), ("test", "test"))}
    assert expected["valid"] == {p.relative_to(root).as_posix() for p in moved} and all(expected.values())
    for out, extra in (("out", ()), ("other", ("--seed", "5", "--valid-fraction", "0.5"))):
        manifest = build(capsys, root, tmp_path / out, *extra)
        assert paths_by_split(tmp_path / out) == expected, extra
        assert manifest["splits"]["valid"]["class_counts"] == [2] * CLASSES, extra


def _replace_in_listings(root: Path, old: str, new: str, names: tuple[str, ...]) -> None:
    for name in names:
        path = root / name
        text = path.read_text()
        assert old in text, name
        path.write_text(text.replace(old, new))


def _nabirds_case(case: str, src: Path, tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    root = Path(shutil.copytree(src, tmp_path / "nabirds"))
    first, second = [line.split()[0] for line in (root / "images.txt").read_text().splitlines()[:2]]
    with_ids = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")
    if case == "non-leaf label":
        _replace_in_listings(root, f"{first} 4999", f"{first} 10", ("image_class_labels.txt",))
        return root, ("image_class_labels.txt:1", "class 10", "not a leaf")
    if case == "unknown class id":
        _replace_in_listings(root, f"{first} 4999", f"{first} 12345", ("image_class_labels.txt",))
        return root, ("image_class_labels.txt:1", "class id 12345 is not in classes.txt")
    if case == "keys equal after sanitising":
        _replace_in_listings(root, first, "a.b", with_ids)
        _replace_in_listings(root, second, sample_key("a.b"), with_ids)
        return root, ("'a.b'", "same sample key", sample_key("a.b"))
    if case == "hierarchy cycle":
        (root / "hierarchy.txt").write_text((root / "hierarchy.txt").read_text() + "0 10\n")
        return root, ("hierarchy.txt", "its own ancestor")
    image = root / "images" / (root / "images.txt").read_text().split()[1]
    image.unlink()  # "missing image"
    return root, ("1 bad image(s)", f"images/{image.relative_to(root / 'images').as_posix()} (missing)")


def _folder_case(case: str, src: Path, tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    root = Path(shutil.copytree(src, tmp_path / "folder"))
    if case == "empty class folder":
        (root / "test" / "Empty Class").mkdir()
        return root, (f"{root / 'test' / 'Empty Class'}: class folder holds no images",)
    if case == "no class folders":
        shutil.rmtree(root / "train")
        shutil.rmtree(root / "test")
        return root, ("not the imagefolder layout", "class folders")
    broken = sorted((root / "test").rglob("*.jpg"))[0]
    broken.write_bytes(b"<html>not found</html>")  # "undecodable image"
    return root, ("1 bad image(s)", f"{broken.relative_to(root).as_posix()} (not an image")


@pytest.mark.parametrize(("layout", "case"), [
    ("nabirds", "non-leaf label"), ("nabirds", "unknown class id"), ("nabirds", "keys equal after sanitising"),
    ("nabirds", "hierarchy cycle"), ("nabirds", "missing image"),
    ("imagefolder", "empty class folder"), ("imagefolder", "no class folders"),
    ("imagefolder", "undecodable image"),
])
def test_hostile_sources_get_one_line_errors(layout: str, case: str, nabirds_src: Path, folder_src: Path,
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    maker = _nabirds_case if layout == "nabirds" else _folder_case
    root, fragments = maker(case, nabirds_src if layout == "nabirds" else folder_src, tmp_path)
    result = pipeline(capsys, "build", "--source", str(root), "--out", str(tmp_path / "out"), *BUILD,
                      "--layout", layout)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_skip_bad_records_uuid_ids(nabirds_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(shutil.copytree(nabirds_src, tmp_path / "nabirds"))
    rows = [line.split() for line in (root / "images.txt").read_text().splitlines()]
    for _, path in rows[:2]:
        (root / "images" / path).unlink()
    manifest = build(capsys, root, tmp_path / "out", "--skip-bad")
    assert manifest["skipped"] == sorted(({"image_id": image_id, "path": f"images/{path}", "reason": "missing"}
                                          for image_id, path in rows[:2]), key=lambda s: s["image_id"])
    assert sum(manifest["splits"][s]["num_samples"] for s in ("train", "valid", "test")) == len(rows) - 2
    assert pipeline(capsys, "verify", str(tmp_path / "out"), "--quiet").returncode == 0


def test_options_a_layout_cannot_honour(folder_src: Path, nabirds_src: Path, cub_source: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    def refused(source: Path, *extra: str) -> str:
        result = pipeline(capsys, "build", "--source", str(source), "--out", str(tmp_path / "out"), *BUILD, *extra)
        return assert_one_line_error(result)

    assert "--crop-bbox: the imagefolder layout has no bounding boxes" in refused(folder_src, "--crop-bbox")
    for source in (folder_src, nabirds_src, cub_source):
        assert "--test-fraction" in refused(source, "--test-fraction", "0.3")
    assert "not the cub layout" in refused(folder_src, "--layout", "cub")
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "photo.jpg").write_bytes(b"")
    line = refused(tmp_path / "loose")
    assert "no known layout" in line and all(module.LOOKS_FOR in line for module in LAYOUTS.values())
    assert not (tmp_path / "out").exists()


def test_help_lists_the_layouts_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(pipeline(capsys, "build", "--help").stdout.split())
    assert "{auto,nabirds,cub,imagefolder}" in text and "auto (default" in text and "default 0.2" in text
    text = " ".join(pipeline(capsys, "synth", "--help").stdout.split())
    assert "{cub,nabirds,imagefolder}" in text and "(default: cub)" in text


@pytest.mark.parametrize("command", ["synth", "download", "build", "merge", "verify", "inspect"])
def test_help_of_every_command_shows_each_default(capsys: pytest.CaptureFixture[str], command: str) -> None:
    """Every option that takes a value says its default (or that it is required); flags say what they do."""
    text = pipeline(capsys, command, "--help").stdout
    options = " ".join(text.split("options:", 1)[1].split()).split(" -")[1:]
    assert options
    for option in options:
        flag = option.split()[0]
        takes_value = len(option.split()) > 1 and option.split()[1].isupper()
        if flag in ("h,", "-source", "-out") or not takes_value:
            continue
        assert "default" in option, option
    assert "--workers WORKERS encoding processes (0 = all cores) (default: 0)" in " ".join(text.split()) \
        or command != "build"


@pytest.mark.e2e
@pytest.mark.parametrize("layout", ["nabirds", "imagefolder"])
def test_fit_evaluate_predict_on_a_layout(layout: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A few training steps, then exact test counts from evaluate and predict (= the synthesised test images)."""
    root = synth(tmp_path / "src", classes=4, per_class=8, seed=2, progress=False, layout=layout)
    if layout == "nabirds":
        flags = dict(line.split() for line in (root / "train_test_split.txt").read_text().splitlines())
        test_images = [str(root / "images" / path) for image_id, path in
                       (line.split() for line in (root / "images.txt").read_text().splitlines())
                       if flags[image_id] == "0"]
    else:
        test_images = sorted(str(p) for p in (root / "test").rglob("*") if p.is_file())
    manifest = build(capsys, root, tmp_path / "shards")
    assert manifest["splits"]["test"]["num_samples"] == len(test_images)

    run = tmp_path / "run"
    fitted = run_cli("train", "fit", "--shards", str(tmp_path / "shards"), *FIT_ARGS, "--epochs", "1",
                     "--batch-size", "4", "--run-dir", str(run), env=ONE_THREAD)
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    assert json.loads((run / "results.json").read_text())["test"]["num_samples"] == len(test_images)

    evaluated = run_cli("train", "evaluate", "--checkpoint", str(run), "--shards", str(tmp_path / "shards"),
                         "--split", "test", "--out", str(tmp_path / "eval"), "--workers", "0", "--no-plots",
                         env=ONE_THREAD)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_samples"] == len(test_images)
    assert (tmp_path / "eval" / "predictions.csv").read_text().count("\n") == len(test_images) + 1

    arguments = [str(root / "test")] if layout == "imagefolder" else test_images
    predicted = run_main(capsys, "predict", "--checkpoint", str(run), "--json", *arguments)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    lines = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert sorted(line["image"] for line in lines) == sorted(test_images)
    assert all(line["top5"][0]["class"] in manifest["classes"] for line in lines)
