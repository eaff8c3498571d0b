"""verify and inspect: local and over loopback HTTP; every kind of damage is named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli

from pipeline.manifest import load_manifest


@pytest.fixture
def damaged(shard_set: Path, tmp_path: Path) -> Path:
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


def test_flipped_byte(damaged: Path) -> None:
    shard = _first_shard(damaged)
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0x01
    shard.write_bytes(bytes(data))
    result = run_cli("pipeline", "verify", str(damaged), "--quiet")
    assert_one_line_error(result, "1 bad shard(s)")
    assert f"{shard} (train): sha256 mismatch" in result.stderr


def test_missing_shard(damaged: Path) -> None:
    shard = _first_shard(damaged)
    shard.unlink()
    result = run_cli("pipeline", "verify", str(damaged), "--quiet")
    assert_one_line_error(result, "1 bad shard(s)")
    assert f"{shard} (train): unreadable" in result.stderr


def test_truncated_tar(damaged: Path) -> None:
    shard = _first_shard(damaged)
    shard.write_bytes(shard.read_bytes()[:5000])
    result = run_cli("pipeline", "verify", str(damaged), "--quiet")
    assert f"{shard} (train): 5000 bytes" in result.stderr
    assert result.returncode == 1


def test_no_manifest_or_wrong_version(damaged: Path, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("pipeline", "verify", str(tmp_path / "nothing")), "no shard set at")
    manifest = damaged / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": 1', '"version": 7'))
    assert_one_line_error(run_cli("pipeline", "inspect", str(damaged)), "version 7 is not supported")


def test_verify_and_inspect_over_http(shard_set: Path, damaged: Path, http_root) -> None:
    base = http_root(shard_set.parent)
    url = f"{base}/{shard_set.name}"
    result = run_cli("pipeline", "verify", url, "--quiet")
    assert result.returncode == 0, result.stderr
    result = run_cli("pipeline", "inspect", url)
    assert result.returncode == 0 and "train" in result.stdout, result.stderr

    shard = _first_shard(damaged)
    shard.unlink()
    bad_url = f"{http_root(damaged.parent)}/{damaged.name}"
    result = run_cli("pipeline", "verify", bad_url, "--quiet")
    assert result.returncode == 1
    assert f"{bad_url}/{shard.name} (train): unreadable" in result.stderr and "HTTP 404" in result.stderr
    assert_one_line_error(run_cli("pipeline", "inspect", f"{base}/nope"), "no shard set at", "HTTP 404")
