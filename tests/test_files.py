"""pipeline.files: atomic writes that leave no temporary, whole-directory swaps, temporary names, sha256 of
files."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

from pipeline import files


def test_write_atomic_leaves_only_the_file(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    files.write_json_atomic(target, {"x": [1, 2]})
    files.write_json_atomic(target, {"x": 3})  # over an existing file
    assert json.loads(target.read_text()) == {"x": 3}
    files.write_atomic(tmp_path / "b.bin", b"\0" * 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]


def test_write_atomic_failure_is_one_line_and_leaves_no_temporary(tmp_path: Path) -> None:
    """A write beyond the file-size limit fails like a full disk: the temporary is removed, the old file kept."""
    target = tmp_path / "big.bin"
    target.write_bytes(b"old")
    code = ("import sys, resource; from pipeline.files import write_atomic; from pipeline.errors import UserError\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "try:\n    write_atomic(sys.argv[1], bytes(100000))\n"
            "except UserError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=ROOT,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{target}: cannot write (File too large)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]
    assert target.read_bytes() == b"old"
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] != 4096  # only the child was limited


def test_replace_dir_swaps_whole_directories(tmp_path: Path) -> None:
    final = tmp_path / "set"
    for version in ("one", "two"):
        new = tmp_path / f".set.new-{version}"
        new.mkdir()
        (new / "f").write_text(version)
        files.replace_dir(new, final)
        assert (final / "f").read_text() == version
        assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_temporary_names() -> None:
    tmp = files.temporary_name(Path("out/train-000018.tar"))
    assert tmp == Path(f"out/.train-000018.tar.tmp-{os.getpid()}")
    assert files.is_temporary(tmp.name) and files.is_temporary(".build.json.tmp-12")
    assert not files.is_temporary("train-000018.tar") and not files.is_temporary("tmp-1.tar")


def test_sha256_file(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read block
    (tmp_path / "f").write_bytes(data)
    assert files.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    (tmp_path / "e").write_bytes(b"")
    assert files.sha256_file(str(tmp_path / "e")) == hashlib.sha256(b"").hexdigest()


def test_atomic_path_renames_only_a_finished_write(tmp_path: Path) -> None:
    """The block's temporary becomes the file when the block ends normally; an error keeps the old file and
    leaves no temporary."""
    target = tmp_path / "plot.png"
    with files.atomic_path(target) as tmp:
        assert tmp == files.temporary_name(target)
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing under the final name before the block ends
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError, match="half-way"), files.atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("half-way")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_temporaries_by_file_and_by_writer(tmp_path: Path) -> None:
    for name in (".a.tar.tmp-11", ".a.tar.tmp-12", ".b.tar.tmp-11", "a.tar", ".a.tar.old-11"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in files.temporaries(tmp_path, "a.tar")] == [".a.tar.tmp-11", ".a.tar.tmp-12"]
    assert [p.name for p in files.temporaries(tmp_path, pid=11)] == [".a.tar.tmp-11", ".b.tar.tmp-11"]
