"""predict: top-5 with probabilities from the checkpoint alone; files, folders, globs; bad files reported
one by one while the good ones are still predicted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import ONE_THREAD, assert_one_line_error, run_cli, run_main

from pipeline.sources.imagefolder import IMAGE_EXTENSIONS
from train import augment, checkpoint, predict


@pytest.fixture(scope="module")
def images(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """good/ (3 synth JPEGs), cmyk.jpg, gray.png, truncated.jpg, notes.jpg (text)."""
    root = tmp_path_factory.mktemp("images")
    sources = sorted((train_shards.parent / "CUB_200_2011" / "images").glob("*/*.jpg"))[:3]
    (root / "good").mkdir()
    for i, source in enumerate(sources):
        shutil.copy(source, root / "good" / f"bird{i}.jpg")
    with Image.open(sources[0]) as image:
        image.convert("CMYK").save(root / "cmyk.jpg")
        image.convert("L").save(root / "gray.png")
    data = sources[1].read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "notes.jpg").write_text("not a picture\n")
    return root


def test_json_lines_for_good_files_errors_for_bad_ones(fitted_run: Path, images: Path) -> None:
    result = run_cli("train", "predict", "--checkpoint", str(fitted_run), "--json", "--batch-size", "2",
                     str(images / "good"), str(images / "cmyk.jpg"), str(images / "gray.png"),
                     str(images / "truncated.jpg"), str(images / "notes.jpg"), str(images / "missing.jpg"),
                     str(images / "good" / "bird*.jpg"), str(images / "nothing-*.png"), env=ONE_THREAD)
    assert result.returncode == 1  # some failed
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    good = sorted(str(p) for p in (images / "good").glob("*.jpg"))
    assert [line["image"] for line in lines] == good + [str(images / "cmyk.jpg"), str(images / "gray.png")] + good
    classes = json.loads((fitted_run / "checkpoints" / "best" / "meta.json").read_text())["classes"]
    for line in lines:
        assert set(line) == {"image", "top5"} and len(line["top5"]) == 5
        probs = [entry["prob"] for entry in line["top5"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(entry["class"] in classes for entry in line["top5"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    for bad, reason in (("truncated.jpg", "cannot decode"), ("notes.jpg", "not an image"),
                        ("missing.jpg", "No such file"), ("nothing-*.png", "no file matches")):
        assert any(bad in line and reason in line for line in errors), (bad, result.stderr)
    assert len(errors) == 4 and "Traceback" not in result.stderr


def _by_hand(run: Path, path: str, size: int, flip: bool) -> torch.Tensor:
    """The softmax over every class of one image: the eval resize and crop at `size`, the model, and with
    `flip` the mean of its logits and those of the mirrored image."""
    model, meta = checkpoint.load_model(run)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    image = augment.Augment(augment.eval_transform(size, meta["crop_pct"]))(rgb, 0)
    assert image.shape == (size, size, 3)
    x = augment.normalize(torch.from_numpy(image[None]).permute(0, 3, 1, 2), meta["mean"], meta["std"])
    with torch.no_grad():
        logits = (model(x) + model(x.flip(3))) / 2 if flip else model(x)
    return logits.softmax(dim=1)[0]


def _check_top5(top: list[dict], full: torch.Tensor, classes: list[str]) -> None:
    assert float(full.sum()) == pytest.approx(1.0, abs=1e-6)
    expected = full.topk(5)
    assert [entry["class"] for entry in top] == [classes[i] for i in expected.indices.tolist()]
    assert [entry["prob"] for entry in top] == pytest.approx(expected.values.tolist(), abs=1e-6)


def test_probabilities_are_the_full_softmax(fitted_run: Path, images: Path) -> None:
    """The reported top-5 are the largest entries of a softmax over every class (which sums to 1), scored as
    the run recorded: at eval size 48 with flip TTA (conftest.EVAL_ARGS)."""
    predictor = predict.Predictor(str(fitted_run), device="cpu")
    path = str(images / "gray.png")
    (top,) = predictor.top_k([predictor.prepare(path)])
    _check_top5(top, _by_hand(fitted_run, path, 48, flip=True), predictor.meta["classes"])


def test_eval_flags_override_the_run(capsys: pytest.CaptureFixture[str], fitted_run: Path, images: Path) -> None:
    path = str(images / "gray.png")
    recorded = run_main(capsys, "predict", "--checkpoint", str(fitted_run), "--json", path)
    plain = run_main(capsys, "predict", "--checkpoint", str(fitted_run), "--json", "--eval-image-size", "40",
                     "--tta", "none", path)
    assert recorded.returncode == plain.returncode == 0, plain.stderr
    classes = json.loads((fitted_run / "checkpoints" / "best" / "meta.json").read_text())["classes"]
    _check_top5(json.loads(plain.stdout)["top5"], _by_hand(fitted_run, path, 40, flip=False), classes)
    assert json.loads(plain.stdout) != json.loads(recorded.stdout)


@pytest.mark.parametrize(("flags", "words"), [(("--tta", "mirror"), ("--tta", "invalid choice", "'flip'")),
                                              (("--eval-image-size", "8"), ("--eval-image-size", "[16, 2048]"))])
def test_bad_eval_flags_are_one_line(capsys: pytest.CaptureFixture[str], fitted_run: Path, images: Path,
                                     flags: tuple[str, ...], words: tuple[str, ...]) -> None:
    result = run_main(capsys, "predict", "--checkpoint", str(fitted_run), *flags, str(images / "gray.png"))
    assert_one_line_error(result, *words)
    assert result.stdout == ""


def test_table_output_and_all_good_exit_zero(capsys: pytest.CaptureFixture[str], fitted_run: Path,
                                            images: Path) -> None:
    result = run_main(capsys, "predict", "--checkpoint", str(fitted_run), str(images / "cmyk.jpg"),
                      str(images / "good" / "bird0.jpg"))
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.strip().split("\n" + str(images / "good"))
    assert result.stdout.startswith(str(images / "cmyk.jpg")) and len(blocks) == 2
    ranks = [line for line in result.stdout.splitlines() if line.startswith("  ")]
    assert len(ranks) == 10 and ranks[0].lstrip().startswith("1. ") and ranks[0].endswith("%")


def test_bad_checkpoint_is_one_line(capsys: pytest.CaptureFixture[str], images: Path, tmp_path: Path) -> None:
    result = run_main(capsys, "predict", "--checkpoint", str(tmp_path), str(images / "cmyk.jpg"))
    assert_one_line_error(result, "no complete best checkpoint")


def test_globs_and_folders_visit_each_file_once_through_symlink_loops(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.jpg", "a/b/y.jpg", "a/.hidden.jpg", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "a" / "b" / "up").symlink_to("..")  # a loop: a/b/up/b/up/...
    files, failures = predict.expand([str(tmp_path / "**" / "*.jpg")])
    assert files == [str(tmp_path / "a" / "b" / "y.jpg"), str(tmp_path / "a" / "x.jpg")] and failures == []
    (tmp_path / "a" / "b" / "again").symlink_to(tmp_path / "a")  # a second loop: glob.glob's paths branch
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "z.jpg").write_bytes(b"")
    (tmp_path / "a" / "link").symlink_to(tmp_path / "other")  # a symlinked folder that is no loop: followed
    files, failures = predict.expand([str(tmp_path / "**" / "*.jpg")])
    assert files == [str(tmp_path / p) for p in ("a/b/y.jpg", "a/link/z.jpg", "a/x.jpg")] and failures == []
    files, failures = predict.expand([str(tmp_path / "a")])  # a folder: hidden files too, as before
    assert files == [str(tmp_path / p) for p in ("a/.hidden.jpg", "a/b/y.jpg", "a/link/z.jpg", "a/x.jpg")]
    files, _ = predict.expand([str(tmp_path / "a" / "**" / "y.jpg"), str(tmp_path / "a" / "*.jpg")])
    assert files == [str(tmp_path / "a" / "b" / "y.jpg"), str(tmp_path / "a" / "x.jpg")]


def test_a_folder_yields_every_image_type_build_reads(tmp_path: Path) -> None:
    """predict takes from a folder exactly the files an ImageFolder build takes as images (any case)."""
    for suffix in IMAGE_EXTENSIONS:
        (tmp_path / f"img{suffix.upper()}").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"")
    files, failures = predict.expand([str(tmp_path)])
    assert sorted(Path(f).suffix.lower() for f in files) == sorted(IMAGE_EXTENSIONS) and failures == []


def test_a_fifo_is_skipped_not_waited_on(capsys: pytest.CaptureFixture[str], fitted_run: Path, images: Path,
                                         tmp_path: Path) -> None:
    import os
    import signal

    def waited(*_: object) -> None:
        raise AssertionError("predict is still waiting on the FIFO")

    os.mkfifo(tmp_path / "pipe.jpg")  # opening it for reading would wait for a writer forever
    previous = signal.signal(signal.SIGALRM, waited)
    signal.alarm(60)
    try:
        result = run_main(capsys, "predict", "--checkpoint", str(fitted_run), "--json",
                          str(tmp_path / "pipe.jpg"), str(images / "gray.png"), "/dev/zero")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result.returncode == 1
    assert [json.loads(line)["image"] for line in result.stdout.splitlines()] == [str(images / "gray.png")]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {tmp_path / 'pipe.jpg'}: not a regular file", "error: /dev/zero: not a regular file"]
    assert "1 image(s) predicted, 2 failed" in result.stderr
