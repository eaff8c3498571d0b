"""The shard-set contract: loading and validating manifests (every field's type, duplicates, names),
locations (directory, URL, pipe:), the format version."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from pipeline import manifest as mf
from pipeline.errors import UserError

SHA = "ab" * 32


def _manifest() -> dict[str, Any]:
    """A small, valid manifest: 2 classes, one shard per split."""
    def split(name: str, counts: list[int]) -> dict[str, Any]:
        total = sum(counts)
        return {"num_samples": total, "class_counts": counts,
                "shards": [{"name": f"{name}-000000.tar", "num_samples": total, "bytes": 10240, "sha256": SHA}]}

    return {"format": mf.FORMAT, "version": mf.VERSION, "classes": ["001.A", "002.B"], "options": {"seed": 0},
            "source": {"fingerprint": SHA}, "tool": {"cubstream": "0.1.0"},
            "splits": {"train": split("train", [3, 2]), "valid": split("valid", [1, 1]),
                       "test": split("test", [2, 2])},
            "skipped": [{"image_id": 4, "path": "images/x.jpg", "reason": "missing"}]}


def _set(manifest: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `manifest` with the field at a dotted path (list indices as numbers) set, or deleted if
    `value` is DELETE."""
    changed = copy.deepcopy(manifest)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    target = changed
    for part in parents:
        target = target[part]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return changed


DELETE = object()

# (field, bad value, what the one-line error says)
BAD_FIELDS = [
    ("format", "webdataset", "not a cubstream-shards manifest"),
    ("version", 2, "format version 2 is not supported (this code reads 1; it was written by a newer cubstream)"),
    ("version", "1", "format version '1' is not supported (this code reads 1)"),
    ("version", True, "format version True is not supported (this code reads 1)"),
    ("version", DELETE, "format version None is not supported (this code reads 1)"),
    ("classes", "001.A", "'classes' must be a non-empty list of names"),
    ("classes", [], "'classes' must be a non-empty list of names"),
    ("classes", ["001.A", 7], "'classes' must be a non-empty list of names"),
    ("classes", ["001.A", "001.A"], "class '001.A' is listed twice"),
    ("options", [1], "'options' must be an object, got list"),
    ("source", "x", "'source' must be an object, got str"),
    ("skipped", {"a": 1}, "'skipped' must be a list"),
    ("skipped.0.reason", 3, "'skipped' must be a list"),
    ("splits", [], "'splits' missing"),
    ("splits.valid", DELETE, "split 'valid' missing or has no shard list"),
    ("splits.train.shards", {}, "split 'train' missing or has no shard list"),
    ("splits.train.num_samples", "5", "split 'train' num_samples must be an integer >= 0, got '5'"),
    ("splits.train.num_samples", True, "num_samples must be an integer >= 0, got True"),
    ("splits.train.num_samples", 6, "split 'train' num_samples 6 != sum of shards 5"),
    ("splits.train.shards.0", "train-000000.tar", "train shard 0: must be an object, got str"),
    ("splits.train.shards.0.sha256", DELETE, "train shard 0: missing sha256"),
    ("splits.train.shards.0.name", 5, "shard name 5 is not a plain file name"),
    ("splits.train.shards.0.name", "../train.tar", "shard name '../train.tar' is not a plain file name"),
    ("splits.train.shards.0.name", ".hidden.tar", "is not a plain file name"),
    ("splits.train.shards.0.name", "a b.tar", "is not a plain file name"),
    ("splits.test.shards.0.name", "train-000000.tar", "shard 'train-000000.tar' is listed twice (in train and test)"),
    ("splits.train.shards.0.num_samples", 5.0, "num_samples must be an integer >= 0, got 5.0"),
    ("splits.train.shards.0.bytes", -1, "(train-000000.tar): bytes must be an integer >= 0, got -1"),
    ("splits.train.shards.0.bytes", "10240", "bytes must be an integer >= 0, got '10240'"),
    ("splits.train.shards.0.sha256", "AB" * 32, "sha256 must be 64 lowercase hex digits"),
    ("splits.train.shards.0.sha256", 12, "sha256 must be 64 lowercase hex digits, got 12"),
    ("splits.train.class_counts", [5], "class_counts must be 2 integers >= 0 summing to 5 (or empty)"),
    ("splits.train.class_counts", None, "class_counts must be 2 integers >= 0 summing to 5"),
    ("splits.train.class_counts", [3, "2"], "class_counts must be 2 integers >= 0 summing to 5"),
    ("splits.train.class_counts", [3, 3], "class_counts must be 2 integers >= 0 summing to 5"),
]


def test_a_valid_manifest_passes_and_optional_fields_may_be_absent() -> None:
    mf.validate(_manifest(), "m.json")
    bare = _manifest()
    for key in ("options", "source", "tool", "skipped"):
        del bare[key]
    for split in mf.SPLITS:
        del bare["splits"][split]["class_counts"]
    bare["splits"]["test"]["class_counts"] = []  # recorded as unknown
    mf.validate(bare, "m.json")


# ids name a deleted field by word, not by DELETE's repr (an address, different in each xdist worker)
@pytest.mark.parametrize(("field", "value", "message"), BAD_FIELDS,
                         ids=[f"{f}={'<deleted>' if v is DELETE else repr(v)}"[:50] for f, v, _ in BAD_FIELDS])
def test_every_bad_field_is_one_line_naming_it(field: str, value: Any, message: str) -> None:
    with pytest.raises(mf.ManifestError) as error:
        mf.validate(_set(_manifest(), field, value), "shards/x/manifest.json")
    text = str(error.value)
    assert text.startswith("shards/x/manifest.json: ") and message in text, text
    assert "\n" not in text


def test_load_manifest_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(mf.ManifestError, match=f"no shard set at {tmp_path}"):
        mf.load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(mf.ManifestError, match="manifest.json: not valid JSON"):
        mf.load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(mf.ManifestError, match="manifest.json: not valid JSON"):
        mf.load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps(_set(_manifest(), "splits.valid.shards.0.name",
                                                            "train-000000.tar")))
    with pytest.raises(mf.ManifestError, match="listed twice"):
        mf.load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps(_manifest()))
    assert mf.load_manifest(str(tmp_path)) == _manifest()


def test_join_for_directory_url_and_pipe() -> None:
    assert mf.join("shards/cub", "train-000000.tar") == str(Path("shards/cub") / "train-000000.tar")
    assert mf.join("http://h:8/a/cub/", "manifest.json") == "http://h:8/a/cub/manifest.json"
    assert mf.join("https://h/a/cub", "x.tar") == "https://h/a/cub/x.tar"
    assert mf.join("pipe:aws s3 cp s3://b/p/{} -", "train-000000.tar") == "pipe:aws s3 cp s3://b/p/train-000000.tar -"
    quoted = mf.join("pipe:cat d/{}", "it's a.tar")
    assert shlex.split(quoted[len("pipe:"):]) == ["cat", "d/it's a.tar"]  # shell-quoted: one argument
    with pytest.raises(UserError, match="needs {} where the file name goes"):
        mf.join("pipe:cat d/", "x.tar")
    manifest = _manifest()
    assert mf.shard_locations("http://h/cub", manifest, "test") == ["http://h/cub/test-000000.tar"]
