"""verify and inspect: local and over loopback HTTP; every kind of damage is named."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from support import assert_one_line_error, run_cli

from pipeline.manifest import load_manifest
from pipeline.shardformat.tarwrite import tar_bytes


@pytest.fixture
def set_copy(shard_set: Path, tmp_path: Path) -> Path:
    """A private copy of the shard set, for a test to damage."""
    return Path(shutil.copytree(shard_set, tmp_path / "set"))


def test_verify_and_inspect_ok(shard_set: Path) -> None:
    result = run_cli("pipeline", "verify", str(shard_set), "--quiet")
    assert result.returncode == 0, result.stderr
    result = run_cli("pipeline", "inspect", str(shard_set))
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(str(shard_set))
    for split in ("train", "valid", "test"):
        row = next(line.split() for line in result.stdout.splitlines() if line.startswith(split))
        assert int(row[1]) == manifest["splits"][split]["num_samples"]
        assert int(row[2]) == len(manifest["splits"][split]["shards"])


def _first_shard(path: Path) -> Path:
    return path / load_manifest(str(path))["splits"]["train"]["shards"][0]["name"]


def test_flipped_byte(set_copy: Path) -> None:
    shard = _first_shard(set_copy)
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0x01
    shard.write_bytes(bytes(data))
    result = run_cli("pipeline", "verify", str(set_copy), "--quiet")
    assert_one_line_error(result, "1 bad shard(s)")
    assert f"{shard} (train): sha256 mismatch" in result.stderr


def test_missing_shard(set_copy: Path) -> None:
    shard = _first_shard(set_copy)
    shard.unlink()
    result = run_cli("pipeline", "verify", str(set_copy), "--quiet")
    assert_one_line_error(result, "1 bad shard(s)")
    assert f"{shard} (train): unreadable" in result.stderr


def test_truncated_tar(set_copy: Path) -> None:
    shard = _first_shard(set_copy)
    shard.write_bytes(shard.read_bytes()[:5000])
    result = run_cli("pipeline", "verify", str(set_copy), "--quiet")
    assert f"{shard} (train): 5000 bytes" in result.stderr
    assert result.returncode == 1


def test_no_manifest_or_wrong_version(set_copy: Path, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("pipeline", "verify", str(tmp_path / "nothing")), "no shard set at")
    manifest = set_copy / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": 1', '"version": 7'))
    assert_one_line_error(run_cli("pipeline", "inspect", str(set_copy)), "version 7 is not supported")


def test_verify_and_inspect_over_http(shard_set: Path, set_copy: Path, http_root) -> None:
    base = http_root(shard_set.parent)
    url = f"{base}/{shard_set.name}"
    result = run_cli("pipeline", "verify", url, "--quiet")
    assert result.returncode == 0, result.stderr
    # inspect over http and pipe: test_remote.py compares its whole table with the directory's

    shard = _first_shard(set_copy)
    shard.unlink()
    bad_url = f"{http_root(set_copy.parent)}/{set_copy.name}"
    result = run_cli("pipeline", "verify", bad_url, "--quiet")
    assert result.returncode == 1
    assert f"{bad_url}/{shard.name} (train): unreadable" in result.stderr and "HTTP 404" in result.stderr
    assert_one_line_error(run_cli("pipeline", "inspect", f"{base}/nope"), "no shard set at", "HTTP 404")


Members = list[tuple[str, bytes]]


def _drop_sample(members: Members) -> Members:
    return members[3:]


def _with(ext: str, value: bytes) -> Callable[[Members], Members]:
    def edit(members: Members) -> Members:
        return [(n, value if n == f"{members[0][0].split('.')[0]}.{ext}" else d) for n, d in members]
    return edit


# (kind, how the shard's first sample is damaged, what the BAD line says after "sample KEY: ")
SAMPLE_DEFECTS: list[tuple[str, Callable[[Members], Members], str]] = [
    ("class index too large", _with("cls", b"6"), "cls 6 out of range 0..5"),
    ("class index negative", _with("cls", b"-1"), "cls -1 out of range 0..5"),
    ("class not a number", _with("cls", b"six"), "cls b'six' is not an integer"),
    ("jpg truncated", lambda m: _with("jpg", m[1][1][: len(m[1][1]) // 2])(m), "jpg does not decode (OSError"),
    ("jpg not an image", _with("jpg", b"<html>404</html>"), "jpg does not decode (UnidentifiedImageError"),
    ("jpg missing", lambda m: [m[0], *m[2:]], "needs jpg and cls, has ['cls', 'json']"),
    *[(f"{ext} member", lambda m, ext=ext: [*m[:3], (m[0][0].split(".")[0] + ext, b"\x80\x04K\x01.")] + m[3:],
       f"pickle member {ext} refused") for ext in (".pth", ".pyd", ".pickle", ".pkl")],
    ("member twice", lambda m: [*m[:2], m[1], *m[2:]], "duplicate member {key}.jpg"),
    ("sample twice", lambda m: [*m, *m[:3]], "duplicate sample ({key}.cls after sample "),
]


def _rewrite(set_dir: Path, edit: Callable[[Members], Members]) -> tuple[Path, str]:
    """Rewrite the first train shard with `edit` applied to its members, and update the manifest's bytes and
    sha256 to match: only the per-sample checks can find what changed. Returns the shard and its first key."""
    manifest_path = set_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    shard = set_dir / entry["name"]
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    data = tar_bytes(edit(members))
    shard.write_bytes(data)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest_path.write_text(json.dumps(manifest))
    return shard, members[0][0].split(".")[0]


@pytest.mark.parametrize(("edit", "says"), [d[1:] for d in SAMPLE_DEFECTS], ids=[d[0] for d in SAMPLE_DEFECTS])
def test_every_bad_sample_kind_is_named(set_copy: Path, edit: Callable[[Members], Members], says: str) -> None:
    shard, key = _rewrite(set_copy, edit)
    result = run_cli("pipeline", "verify", str(set_copy), "--quiet")
    assert_one_line_error(result, "1 bad shard(s)")
    assert result.returncode == 1
    (bad,) = [line for line in result.stderr.splitlines() if line.startswith("BAD ")]
    assert bad.startswith(f"BAD {shard} (train): sample {key}: {says.format(key=key)}"), bad


def test_sample_count_against_the_manifest(set_copy: Path) -> None:
    shard, _ = _rewrite(set_copy, _drop_sample)
    result = run_cli("pipeline", "verify", str(set_copy), "--quiet")
    assert_one_line_error(result, "1 bad shard(s)")
    assert f"BAD {shard} (train): 6 samples, manifest says 7" in result.stderr.splitlines()


def _forge(set_dir: Path, edit: Callable[[dict, dict[str, Members]], None]) -> None:
    """Apply `edit(manifest, members)` (members: shard name -> its (name, payload) list) and rewrite every shard
    it changed, with the manifest's bytes, sha256 and sample counts updated to match, as a careful forger
    would: only checks that read the samples and compare them across shards can find what changed."""
    manifest_path = set_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    members = {}
    for info in manifest["splits"].values():
        for entry in info["shards"]:
            with tarfile.open(set_dir / entry["name"]) as tar:
                members[entry["name"]] = [(m.name, tar.extractfile(m).read()) for m in tar]
    before = {name: list(found) for name, found in members.items()}
    edit(manifest, members)
    for info in manifest["splits"].values():
        for entry in info["shards"]:
            if members[entry["name"]] != before[entry["name"]]:
                data = tar_bytes(members[entry["name"]])
                (set_dir / entry["name"]).write_bytes(data)
                entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                             num_samples=len({name.split(".")[0] for name, _ in members[entry["name"]]}))
        info["num_samples"] = sum(entry["num_samples"] for entry in info["shards"])
    manifest_path.write_text(json.dumps(manifest))


def _shard(manifest: dict, split: str) -> str:
    return manifest["splits"][split]["shards"][0]["name"]


def _label(sample: Members) -> int:
    return int(next(data for name, data in sample if name.endswith(".cls")))


def _copy_train_sample_to_test(manifest: dict, members: dict[str, Members]) -> str:
    sample = members[_shard(manifest, "train")][:3]
    members[_shard(manifest, "test")] += sample
    manifest["splits"]["test"]["class_counts"][_label(sample)] += 1
    return f"{_shard(manifest, 'test')} (test): sample {{key}}: key also in {_shard(manifest, 'train')}"


def _move_train_sample_to_test(manifest: dict, members: dict[str, Members]) -> str:
    sample = members[_shard(manifest, "train")][:3]
    del members[_shard(manifest, "train")][:3]
    members[_shard(manifest, "test")] += sample
    manifest["splits"]["train"]["class_counts"][_label(sample)] -= 1
    manifest["splits"]["test"]["class_counts"][_label(sample)] += 1
    return f"{_shard(manifest, 'test')} (test): sample {{key}}: json says split 'train', but the sample is in a test shard"


def _relabel(record_too: bool) -> Callable[[dict, dict[str, Members]], str]:
    """The first train sample gets the next class as its cls (and in its JSON record with `record_too`)."""
    def edit(manifest: dict, members: dict[str, Members]) -> str:
        (cls, label), jpg, (meta, record) = members[_shard(manifest, "train")][:3]
        old = int(label)
        new = (old + 1) % len(manifest["classes"])
        if record_too:
            record = json.dumps({**json.loads(record), "class_index": new}).encode()
        members[_shard(manifest, "train")][:3] = [(cls, str(new).encode()), jpg, (meta, record)]
        if not record_too:
            return f"{_shard(manifest, 'train')} (train): sample {{key}}: json says class_index {old}, cls says {new}"
        counts = manifest["splits"]["train"]["class_counts"]
        first = min(old, new)
        return (f"manifest.json (train): class_counts say {counts[first]} sample(s) of class {first} "
                f"({manifest['classes'][first]!r}), the shards hold {counts[first] + (1 if first == new else -1)}")
    return edit


def _drop_record(manifest: dict, members: dict[str, Members]) -> str:
    del members[_shard(manifest, "train")][2]
    return f"{_shard(manifest, 'train')} (train): sample {{key}}: needs json, has ['cls', 'jpg']"


# (kind, the forgery: returns the BAD line it must get, after the set's path, with {key} for the sample's key)
FORGERIES: list[tuple[str, Callable[[dict, dict[str, Members]], str]]] = [
    ("train sample copied into a test shard", _copy_train_sample_to_test),
    ("train sample moved into a test shard", _move_train_sample_to_test),
    ("label changed, class_counts not", _relabel(record_too=True)),
    ("label changed, sample record not", _relabel(record_too=False)),
    ("sample record missing", _drop_record),
]


@pytest.mark.parametrize("forge", [f[1] for f in FORGERIES], ids=[f[0] for f in FORGERIES])
def test_forged_set_with_consistent_sizes_and_checksums_fails(
        set_copy: Path, forge: Callable[[dict, dict[str, Members]], str]) -> None:
    said: list[str] = []
    keys: list[str] = []

    def edit(manifest: dict, members: dict[str, Members]) -> None:
        keys.append(members[_shard(manifest, "train")][0][0].split(".")[0])
        said.append(forge(manifest, members))

    _forge(set_copy, edit)
    result = run_cli("pipeline", "verify", str(set_copy), "--quiet")
    wrong_counts = said[0].startswith("manifest.json")
    assert_one_line_error(result, "class_counts of 1 split(s) differ" if wrong_counts else "1 bad shard(s)")
    bad = [line for line in result.stderr.splitlines() if line.startswith("BAD ")]
    assert bad == [f"BAD {set_copy}/{said[0].format(key=keys[0])}"]


def test_bad_shards_and_wrong_class_counts_are_counted_apart(set_copy: Path) -> None:
    said: list[str] = []
    _forge(set_copy, lambda manifest, members: said.append(_relabel(record_too=True)(manifest, members)))
    shard = set_copy / load_manifest(str(set_copy))["splits"]["test"]["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0x01
    shard.write_bytes(bytes(data))
    result = run_cli("pipeline", "verify", str(set_copy), "--quiet")
    assert_one_line_error(result, "1 bad shard(s) and class_counts of 1 split(s) differ from the labels")
    assert [line for line in result.stderr.splitlines() if line.startswith("BAD ")] == \
        [f"BAD {shard} (test): sha256 mismatch", f"BAD {set_copy}/{said[0]}"]
