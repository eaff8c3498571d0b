"""Building shard sets: determinism across workers, jobs and source forms; atomicity; bad images."""

from __future__ import annotations

import io
import json
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import procs
import pytest
import webdataset as wds
from conftest import SMALL, SMALL_OPTIONS
from PIL import Image
from support import ROOT, assert_one_line_error, cli_env, run_cli

from pipeline import files
from pipeline import manifest as mf
from pipeline.build import build
from pipeline.errors import UserError
from pipeline.files import sha256_file
from pipeline.manifest import load_manifest
from pipeline.plan import BuildOptions
from pipeline.sources import Settings
from pipeline.sources import cub as cub_layout


def _digests(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.glob("*.tar"))}


def test_manifest_contract(shard_set: Path, cub_source: Path) -> None:
    manifest = load_manifest(str(shard_set))
    cub = cub_layout.read(cub_source / "CUB_200_2011", Settings())
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
    official_test = {r.image_id for r in cub_layout.read(cub_source / "CUB_200_2011", Settings()).records if r.split == "test"}
    assert test_ids == official_test


def test_samples_read_back_with_webdataset(shard_set: Path) -> None:
    manifest = load_manifest(str(shard_set))
    urls = [str(shard_set / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls", "json"))
    assert len(samples) == manifest["splits"]["train"]["num_samples"]
    assert all(image.mode == "RGB" and cls == meta["class_index"] for image, cls, meta in samples)
    first_shard_classes = {cls for _, cls, _ in samples[: SMALL_OPTIONS.shard_samples]}
    assert len(first_shard_classes) > 1  # shuffled across shards: a shard mixes classes


def _num_shards(manifest: dict) -> int:
    return sum(-(-manifest["splits"][s]["num_samples"] // SMALL_OPTIONS.shard_samples) for s in mf.SPLITS)


def _build_args(source: Path, out: Path, *extra: str) -> list[str]:
    return ["pipeline", "build", "--source", str(source), "--out", str(out), "--resize-short",
            str(SMALL_OPTIONS.resize_short), "--shard-samples", str(SMALL_OPTIONS.shard_samples), "--quiet", *extra]


def test_workers_jobs_and_tgz_give_identical_bytes(cub_source: Path, shard_set: Path, tmp_path: Path) -> None:
    """Every build in its own process (the reference was built inside the test process): nothing that
    differs between processes (hash seeds, pids, start times) reaches the bytes."""
    reference = _digests(shard_set)
    assert len(reference) == _num_shards(load_manifest(str(shard_set))) == 10
    manifest = (shard_set / "manifest.json").read_bytes()
    source = cub_source / "CUB_200_2011"
    outs = {"one": _build_args(source, tmp_path / "one", "--workers", "1"),
            "w2": _build_args(source, tmp_path / "w2", "--workers", "2"),
            "tgz": _build_args(cub_source / "CUB_200_2011.tgz", tmp_path / "tgz", "--workers", "1")}
    for name, args in outs.items():
        result = run_cli(*args, env={"PYTHONHASHSEED": str(len(name))})
        assert result.returncode == 0, result.stderr
        assert _digests(tmp_path / name) == reference, name
        assert (tmp_path / name / "manifest.json").read_bytes() == manifest, name

    jobs = tmp_path / "jobs"
    with procs.group(tmp_path / "logs") as group:  # the three jobs at once, as a cluster would run them
        for index in range(3):
            group.start(f"job{index}", [sys.executable, "-m", *_build_args(
                source, jobs, "--workers", "1", "--num-jobs", "3", "--job-index", str(index))], cli_env())
        assert group.finish(120) == [0, 0, 0], [group.output(n)[-1000:] for n in group.names]
    assert not (jobs / "manifest.json").exists()
    result = run_cli("pipeline", "merge", str(jobs))
    assert result.returncode == 0, result.stderr
    assert _digests(jobs) == reference
    assert (jobs / "manifest.json").read_bytes() == manifest


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


def _files(directory: Path) -> dict[str, str]:
    """sha256 of every file of a set, build state included (not the lock files, which hold no data)."""
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.name.startswith("lock")}


def test_other_options_refused_unless_overwrite(cub_source: Path, shard_set: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(shard_set, tmp_path / "set"))
    old = _files(out)
    (out / ".train-000001.tar.tmp-999999").write_bytes(b"half a shard")  # a temporary of a killed build
    args = ["pipeline", "build", "--source", str(cub_source / "CUB_200_2011"), "--out", str(out),
            "--resize-short", "64", "--shard-samples", "9", "--workers", "1", "--quiet"]
    assert_one_line_error(run_cli(*args), "resize_short=96 (now 64)", "shard_samples=7 (now 9)", "--overwrite")
    assert _files(out) == {**old, ".train-000001.tar.tmp-999999": sha256_file(out / ".train-000001.tar.tmp-999999")}

    result = run_cli(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    options = load_manifest(str(out))["options"]
    assert (options["resize_short"], options["shard_samples"]) == (64, 9)
    fresh = tmp_path / "fresh"
    build(cub_source / "CUB_200_2011", fresh, BuildOptions(resize_short=64, shard_samples=9), workers=1,
          progress=False)
    new = _files(out)
    assert new == _files(fresh)  # exactly a fresh build's files: no old shard, record or temporary left
    assert len(_digests(out)) == 8 < len(_digests(shard_set))  # fewer shards than before
    assert not set(new.values()) & set(old.values())  # every byte replaced


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
    cub = cub_layout.read(cub_copy, Settings())
    record = cub.records[3]
    path = cub.image_path(record)
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:300])
    elif how == "garbage":
        path.write_bytes(b"<html>not found</html>")
    else:
        path.unlink()
    return record.path


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


def _limited(limit: int) -> Callable[[], None]:
    """For a child process: writes past `limit` bytes fail with EFBIG, as a full disk fails with ENOSPC
    (Python ignores SIGXFSZ, so the write returns the error instead of killing the process)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_write_error_is_one_line_and_leaves_no_temporary(cub_source: Path, shard_set: Path, tmp_path: Path,
                                                         workers: str) -> None:
    out = tmp_path / "out"
    args = [sys.executable, "-m", *_build_args(cub_source / "CUB_200_2011", out, "--workers", workers)]
    result = subprocess.run(args, capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=120,
                            preexec_fn=_limited(30000))  # the records fit, no shard does
    line = assert_one_line_error(result, "cannot write (File too large)")
    assert re.fullmatch(rf"error: {re.escape(str(out))}/(train|valid|test)-\d{{6}}\.tar: cannot write \(File too "
                        r"large\)", line), line
    assert [p.name for p in out.rglob("*") if files.is_temporary(p.name) or p.suffix == ".tar"] == []
    assert not (out / "manifest.json").exists()
    assert run_cli(*_build_args(cub_source / "CUB_200_2011", out, "--workers", workers)).returncode == 0
    assert _digests(out) == _digests(shard_set)


def test_full_disk_is_one_line_and_leaves_no_temporary(cub_source: Path, tmp_path: Path) -> None:
    """A real ENOSPC: a 64 KiB tmpfs, mounted in a private user and mount namespace (`unshare -rm`)."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                           capture_output=True, text=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({probe.stderr.strip() if probe else 'no unshare'}); "
                    "test_write_error_is_one_line_and_leaves_no_temporary covers the same path with EFBIG")
    out = mount / "out"
    build = shlex.join([sys.executable, "-m", *_build_args(cub_source / "CUB_200_2011", out, "--workers", "1")])
    script = (f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(mount))} && {{ {build}; echo \"rc=$?\"; "
              f"find {shlex.quote(str(out))} -type f -printf '%P\\n'; }}")  # the mount vanishes with the namespace
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=cli_env(),
                            cwd=ROOT, timeout=120)
    rc, *written = result.stdout.split()
    assert rc.startswith("rc="), result.stdout + result.stderr
    build_result = subprocess.CompletedProcess(build, int(rc[3:]), "", result.stderr)
    assert_one_line_error(build_result, f"{out}/", ".tar: cannot write (No space left on device)")
    assert "manifest.json" not in written and not [f for f in written if files.is_temporary(Path(f).name)], written


def test_stale_temporaries_are_reported_and_removed(cub_source: Path, shard_set: Path, tmp_path: Path) -> None:
    """A killed build leaves temporaries; inspect names them and the next build or merge removes them."""
    out = Path(shutil.copytree(shard_set, tmp_path / "set"))
    before = _digests(out)
    stale = [".train-000001.tar.tmp-999999", ".build/.train-000001.tar.json.tmp-999998"]
    for _ in range(2):  # once for the build, once for merge
        for name in stale:
            (out / name).write_bytes(b"half written")
        report = run_cli("pipeline", "inspect", str(out))
        assert report.returncode == 0, report.stderr
        assert (f"temporary files: 2 left by an interrupted build ({stale[0]}, {stale[1]}); the next build or "
                f"merge into {out} removes them") in report.stdout
        command = _build_args(cub_source / "CUB_200_2011", out, "--workers", "1") if _ == 0 else (
            "pipeline", "merge", str(out))
        assert run_cli(*command).returncode == 0
        assert not [p for p in out.rglob("*") if files.is_temporary(p.name)]
        assert _digests(out) == before
        assert "temporary" not in run_cli("pipeline", "inspect", str(out)).stdout


def test_a_shard_file_streams_exactly_the_bytes_of_tar_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer thread appends, hashes and syncs as samples arrive (a sync after every sample here); the
    file, its size and sha256 are those of the tar assembled in memory, and it gets its name only at rename."""
    import hashlib

    from pipeline import shardfile
    from pipeline.shardformat import Sample
    from pipeline.shardformat.tarwrite import tar_bytes

    monkeypatch.setattr(shardfile, "SYNC_EVERY", 1)
    samples = [Sample(f"{i:05d}", i, bytes([i]) * (700 * i + 1), {"i": i}) for i in range(9)]
    final = tmp_path / "train-000000.tar"
    with shardfile.ShardFile(final) as tar:
        for sample in samples:
            tar.add(sample)
        size, sha256 = tar.finish()
        assert not final.exists()
        tar.rename()
    expected = tar_bytes([member for sample in samples for member in sample.members()])
    assert final.read_bytes() == expected
    assert (size, sha256) == (len(expected), hashlib.sha256(expected).hexdigest())
    assert [p.name for p in tmp_path.iterdir()] == [final.name]

    with shardfile.ShardFile(tmp_path / "valid-000000.tar") as tar:
        tar.add(samples[0])
        tar.discard()  # a bad sample in a shard that may not skip it: nothing that looks like a shard is left
    with pytest.raises(RuntimeError), shardfile.ShardFile(tmp_path / "test-000000.tar") as tar:
        tar.add(samples[1])
        raise RuntimeError("the build stopped")
    assert [p.name for p in tmp_path.iterdir()] == [final.name]
