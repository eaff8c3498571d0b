"""CUB shards are byte-identical to those built before dataset layouts became plug-ins: the same synth source
and three option sets give the same sha256 for every tar (tests/data/cub_reference.sha256). The manifests
differ only by the field added since (`source.layout`), which this test checks too."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipeline.__main__ import main

DATA = Path(__file__).parent / "data"
BUILDS = {
    "a": (),
    "b": ("--resize-short", "0", "--shard-samples", "5"),
    "c": ("--crop-bbox", "--quality", "80", "--valid-fraction", "0.25", "--seed", "7", "--shard-samples", "7"),
}


def _expected(name: str) -> dict[str, str]:
    lines = (DATA / name).read_text().splitlines()
    return {path: sha for sha, path in (line.split("  ", 1) for line in lines if not line.startswith("#"))}


def _digests(root: Path, pattern: str) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob(pattern)) if p.is_file()}


def test_cub_synth_and_shards_match_the_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path / "src"), "--classes", "4", "--per-class", "6", "--seed", "3"]) == 0
    assert _digests(tmp_path / "src", "CUB_200_2011/**/*") == _expected("cub_reference_synth.sha256")
    for build, options in BUILDS.items():
        code = main(["build", "--source", str(tmp_path / "src" / "CUB_200_2011"), "--out", str(tmp_path / build),
                     "--workers", "1", "--quiet", *options])
        assert code == 0, capsys.readouterr().err
        manifest = json.loads((tmp_path / build / "manifest.json").read_text())
        assert manifest["source"]["layout"] == "cub" and "class_ids" not in manifest
    assert _digests(tmp_path, "?/*.tar") == _expected("cub_reference.sha256")
