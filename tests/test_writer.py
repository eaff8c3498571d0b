"""Building shard sets: determinism across workers, jobs and source forms; atomicity; bad images."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds
from conftest import ROOT, SMALL, SMALL_OPTIONS, assert_one_line_error, run_cli
from PIL import Image

from pipeline.cub import read_cub
from pipeline.errors import UserError
from pipeline.manifest import load_manifest, sha256_file
from pipeline.writer import build, merge


def _digests(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.glob("*.tar"))}


def test_manifest_contract(shard_set: Path, cub_source: Path) -> None:
    manifest = load_manifest(str(shard_set))
    cub = read_cub(cub_source / "CUB_200_2011")
    assert manifest["classes"] == cub.classes
    assert manifest["options"]["resize_short"] == SMALL_OPTIONS.resize_short
    assert len(manifest["source"]["fingerprint"]) == 64
    total = sum(manifest["splits"][s]["num_samples"] for s in ("train", "valid", "test"))
    assert total == len(cub.records) and manifest["skipped"] == []
    for split, info in manifest["splits"].items():
        assert sum(info["class_counts"]) == info["num_samples"]
        for shard in info["shards"]:
            assert shard["name"].startswith(f"{split}-")
            assert sha256_file(shard_set / shard["name"]) == shard["sha256"]
            assert (shard_set / shard["name"]).stat().st_size == shard["bytes"]


def test_samples_read_back_with_tarfile(shard_set: Path, cub_source: Path) -> None:
    manifest = load_manifest(str(shard_set))
    test_ids = set()
    for shard in manifest["splits"]["test"]["shards"]:
        with tarfile.open(shard_set / shard["name"]) as tar:
            members = tar.getmembers()
            assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o644)}
            names = [m.name for m in members]
            keys = list(dict.fromkeys(n.split(".")[0] for n in names))
            assert names == [f"{k}.{ext}" for k in keys for ext in ("cls", "jpg", "json")]
            for key in keys:
                meta = json.loads(tar.extractfile(f"{key}.json").read())
                image = Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read()))
                assert (image.format, image.mode) == ("JPEG", "RGB")
                assert list(image.size) == meta["size"] and min(meta["size"]) <= SMALL_OPTIONS.resize_short
                x, y, w, h = meta["bbox"]
                assert x >= 0 and y >= 0 and x + w <= meta["size"][0] + 0.01 and y + h <= meta["size"][1] + 0.01
                assert int(tar.extractfile(f"{key}.cls").read()) == meta["class_index"]
                assert manifest["classes"][meta["class_index"]] == meta["class_name"]
                assert key == f"{meta['image_id']:05d}"
                test_ids.add(meta["image_id"])
    official_test = {r.image_id for r in read_cub(cub_source / "CUB_200_2011").records if not r.is_train}
    assert test_ids == official_test


def test_samples_read_back_with_webdataset(shard_set: Path) -> None:
    manifest = load_manifest(str(shard_set))
    urls = [str(shard_set / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls", "json"))
    assert len(samples) == manifest["splits"]["train"]["num_samples"]
    assert all(image.mode == "RGB" and cls == meta["class_index"] for image, cls, meta in samples)
    first_shard_classes = {cls for _, cls, _ in samples[: SMALL_OPTIONS.shard_samples]}
    assert len(first_shard_classes) > 1  # shuffled across shards: a shard mixes classes


def test_workers_jobs_and_tgz_give_identical_bytes(cub_source: Path, shard_set: Path, tmp_path: Path) -> None:
    reference = _digests(shard_set)
    assert len(reference) >= 6
    two_workers = tmp_path / "w2"
    build(cub_source / "CUB_200_2011", two_workers, SMALL_OPTIONS, workers=2, progress=False)
    assert _digests(two_workers) == reference
    assert (two_workers / "manifest.json").read_bytes() == (shard_set / "manifest.json").read_bytes()

    from_tgz = tmp_path / "tgz"
    build(cub_source / "CUB_200_2011.tgz", from_tgz, SMALL_OPTIONS, workers=1, progress=False)
    assert _digests(from_tgz) == reference

    jobs = tmp_path / "jobs"
    for index in range(3):
        assert build(cub_source / "CUB_200_2011", jobs, SMALL_OPTIONS, workers=1, num_jobs=3, job_index=index,
                     progress=False) is None
        if index < 2:
            assert not (jobs / "manifest.json").exists()
    merge(jobs)
    assert _digests(jobs) == reference
    assert (jobs / "manifest.json").read_bytes() == (shard_set / "manifest.json").read_bytes()


def test_merge_names_the_missing_job(cub_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "jobs"
    build(cub_source / "CUB_200_2011", out, SMALL_OPTIONS, workers=1, num_jobs=3, job_index=1, progress=False)
    result = run_cli("pipeline", "merge", str(out))
    assert_one_line_error(result, "job(s) 0, 2 of 3 have not finished")
    assert not (out / "manifest.json").exists()


def test_merge_rehashes_every_shard(shard_set: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(shard_set, tmp_path / "set"))
    manifest = (out / "manifest.json").read_bytes()
    shard = sorted(out.glob("*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    shard.write_bytes(bytes(data))
    assert_one_line_error(run_cli("pipeline", "merge", str(out)), shard.name, "sha256 does not match")
    assert (out / "manifest.json").read_bytes() == manifest


def test_other_options_refused_unless_overwrite(cub_source: Path, shard_set: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(shard_set, tmp_path / "set"))
    args = ["pipeline", "build", "--source", str(cub_source / "CUB_200_2011"), "--out", str(out),
            "--resize-short", "64", "--shard-samples", "7", "--workers", "1", "--quiet"]
    assert_one_line_error(run_cli(*args), "resize_short=96 (now 64)", "--overwrite")
    assert _digests(out) == _digests(shard_set)  # untouched
    result = run_cli(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert load_manifest(str(out))["options"]["resize_short"] == 64


def test_other_source_refused(cub_copy: Path, shard_set: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(shard_set, tmp_path / "set"))
    image = next((cub_copy / "images").rglob("*.jpg"))
    image.write_bytes(image.read_bytes() + b"\0")
    with pytest.raises(UserError, match="another source"):
        build(cub_copy, out, SMALL_OPTIONS, workers=1, progress=False)


def test_killed_build_resumes_to_identical_bytes(cub_source: Path, shard_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "pipeline", "build", "--source", str(cub_source / "CUB_200_2011"),
               "--out", str(out), "--resize-short", "96", "--shard-samples", "7", "--workers", "1", "--quiet"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(out.glob("*.tar"))) < 2:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = list(out.glob("*.tar"))
    assert 2 <= len(written) < len(_digests(shard_set)), "the build finished before it could be killed"
    assert not (out / "manifest.json").exists()

    mtimes = {p.name: p.stat().st_mtime_ns for p in written}
    result = run_cli(*command[2:])
    assert result.returncode == 0, result.stderr
    assert _digests(out) == _digests(shard_set)
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in mtimes.items())  # kept, not rewritten
    assert not list(out.glob(".*.tmp-*"))


def _break_one_image(cub_copy: Path, how: str) -> str:
    cub = read_cub(cub_copy)
    record = cub.records[3]
    path = cub.image_path(record)
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:300])
    elif how == "garbage":
        path.write_bytes(b"<html>not found</html>")
    else:
        path.unlink()
    return f"images/{record.path}"


@pytest.mark.parametrize("how", ["truncate", "garbage", "missing"])
def test_bad_image_stops_build_and_skip_bad_records_it(cub_copy: Path, tmp_path: Path, how: str) -> None:
    bad_path = _break_one_image(cub_copy, how)
    args = ["pipeline", "build", "--source", str(cub_copy), "--out", str(tmp_path / "out"),
            "--resize-short", "64", "--shard-samples", "7", "--workers", "1", "--quiet"]
    assert_one_line_error(run_cli(*args), "1 bad image(s)", bad_path)
    assert not (tmp_path / "out" / "manifest.json").exists()

    result = run_cli(*args, "--skip-bad")
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(str(tmp_path / "out"))
    assert [s["path"] for s in manifest["skipped"]] == [bad_path]
    assert manifest["skipped"][0]["reason"]
    total = sum(manifest["splits"][s]["num_samples"] for s in ("train", "valid", "test"))
    assert total == SMALL["classes"] * SMALL["per_class"] - 1


def test_many_bad_images_listed_first_20_and_count(cub_copy: Path, tmp_path: Path) -> None:
    for path in sorted((cub_copy / "images").rglob("*.jpg"))[:25]:
        path.write_bytes(b"junk")
    with pytest.raises(UserError) as error:
        build(cub_copy, tmp_path / "out", SMALL_OPTIONS, workers=1, progress=False)
    assert str(error.value).startswith("25 bad image(s)") and "and 5 more" in str(error.value)
    assert str(error.value).count("(not an image") == 20


def test_bad_arguments(cub_source: Path, tmp_path: Path) -> None:
    source = str(cub_source / "CUB_200_2011")
    for flag, value, message in [("--valid-fraction", "1.5", "--valid-fraction"), ("--quality", "0", "--quality"),
                                 ("--shard-samples", "0", "--shard-samples"), ("--job-index", "3", "--job-index")]:
        extra = ["--num-jobs", "3"] if flag == "--job-index" else []
        result = run_cli("pipeline", "build", "--source", source, "--out", str(tmp_path / "o"), flag, value, *extra)
        assert_one_line_error(result, message)


def test_tar_bytes_equal_what_tarfile_writes() -> None:
    import os

    from pipeline.writer import _tarinfo, tar_bytes

    members = [(f"{i:05d}.{ext}", os.urandom(i * 37 + 1)) for i in range(40) for ext in ("cls", "jpg", "json")]
    members += [("n" * 100, b"longest name"), ("empty.cls", b"")]
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
    assert tar_bytes(members) == expected.getvalue()
    assert tar_bytes([]) == tarfile.NUL * tarfile.RECORDSIZE
    with pytest.raises(ValueError, match="too long"):
        tar_bytes([("n" * 101, b"")])
