"""pipeline.archive: deterministic packing, refusing unsafe archives before writing anything, finding the root."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from pipeline.archive import (
    MAX_EXTRACT_FILES_ENV,
    MAX_EXTRACT_GB_ENV,
    ExtractLimits,
    extract_limits,
    find_cub_root,
    pack_tgz,
    safe_extract,
)
from pipeline.errors import UserError


def _make_tree(root: Path) -> None:
    (root / "images" / "001.A").mkdir(parents=True)
    (root / "images.txt").write_text("1 001.A/a_0001_1.jpg\n")
    (root / "images" / "001.A" / "a_0001_1.jpg").write_bytes(bytes(range(256)) * 40)
    (root / "README").write_text("hello\n")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """Write a gzipped tar from hand-made members (tarfile.open would refuse nothing on writing)."""
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"payload") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _special(name: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info, None


def test_pack_then_extract_round_trips(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make_tree(src)
    tgz = tmp_path / "out" / "CUB_200_2011.tgz"
    pack_tgz(src, tgz)
    assert [p.name for p in tgz.parent.iterdir()] == ["CUB_200_2011.tgz"], "no temporary file left"
    with tarfile.open(tgz) as tar:
        names = tar.getnames()
    assert names == ["CUB_200_2011", "CUB_200_2011/README", "CUB_200_2011/images", "CUB_200_2011/images/001.A",
                     "CUB_200_2011/images/001.A/a_0001_1.jpg", "CUB_200_2011/images.txt"]
    dest = tmp_path / "dest"
    safe_extract(tgz, dest)
    assert _files(dest / "CUB_200_2011") == _files(src)
    assert find_cub_root(dest) == dest / "CUB_200_2011"


def test_pack_is_byte_identical_whatever_the_mtimes_and_modes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make_tree(src)
    first, second = tmp_path / "1.tgz", tmp_path / "2.tgz"
    pack_tgz(src, first, arcname="X")
    os.utime(src / "README", (1_000_000, 1_000_000))
    (src / "README").chmod(0o600)
    pack_tgz(src, second, arcname="X")
    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
    assert first.read_bytes()[4:8] == b"\0\0\0\0", "gzip header mtime is 0"
    with tarfile.open(first) as tar:
        assert all(m.mtime == 0 and m.uid == m.gid == 0 and m.uname == m.gname == "" for m in tar)


@pytest.mark.parametrize(("member", "name"), [
    (_file("../evil"), "../evil"),
    (_file("ok/../../evil"), "ok/../../evil"),
    (_file("/abs"), "/abs"),
    (_link("link", "/etc/passwd"), "link"),
    (_link("link", "../x"), "link"),
    (_link("sub/link", "../../x"), "sub/link"),
    (_link("hard", "../outside", tarfile.LNKTYPE), "hard"),
    (_link("hard", "/etc/passwd", tarfile.LNKTYPE), "hard"),
    (_special("dev", tarfile.CHRTYPE), "dev"),
    (_special("blk", tarfile.BLKTYPE), "blk"),
    (_special("fifo", tarfile.FIFOTYPE), "fifo"),
], ids=["dotdot", "inner-dotdot", "absolute", "symlink-abs", "symlink-up", "symlink-deep-up",
        "hardlink-up", "hardlink-abs", "chardev", "blockdev", "fifo"])
def test_unsafe_member_is_refused_and_nothing_is_extracted(tmp_path: Path, member: tuple, name: str) -> None:
    tgz = _tar(tmp_path / "bad.tgz", [_file("CUB_200_2011/images.txt"), member, _file("zzz_last")])
    dest = tmp_path / "dest"
    with pytest.raises(UserError, match="unsafe archive member") as caught:
        safe_extract(tgz, dest)
    assert repr(name) in str(caught.value)
    assert not dest.exists() or not any(dest.iterdir())
    assert not (tmp_path / "evil").exists() and not (tmp_path / "x").exists()


def test_chained_symlinks_that_escape_together_are_refused(tmp_path: Path) -> None:
    # Each link looks harmless alone ("a" -> ".", "b" -> "a/.."), but "b" resolves to dest's parent.
    tgz = _tar(tmp_path / "chain.tgz", [_file("ok.txt"), _link("a", "."), _link("b", "a/.."),
                                         _file("b/escaped.txt")])
    dest = tmp_path / "dest"
    with pytest.raises(UserError, match="'b'"):
        safe_extract(tgz, dest)
    assert not dest.exists() or not any(dest.iterdir())
    assert not (tmp_path / "escaped.txt").exists()


def test_links_that_stay_inside_are_extracted(tmp_path: Path) -> None:
    tgz = _tar(tmp_path / "ok.tgz", [_file("d/real.txt", b"real"), _link("d/sym", "real.txt"),
                                      _link("top", "d/sym"), _link("d/hard", "d/real.txt", tarfile.LNKTYPE)])
    dest = tmp_path / "dest"
    safe_extract(tgz, dest)
    assert (dest / "top").read_bytes() == b"real" and (dest / "d" / "hard").read_bytes() == b"real"


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_archive_is_one_line_naming_the_file(tmp_path: Path, damage: str) -> None:
    src = tmp_path / "src"
    _make_tree(src)
    tgz = tmp_path / "CUB_200_2011.tgz"
    pack_tgz(src, tgz)
    data = tgz.read_bytes()
    tgz.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not an archive at all" * 50)
    with pytest.raises(UserError) as caught:
        safe_extract(tgz, tmp_path / "dest")
    message = str(caught.value)
    assert str(tgz) in message and "\n" not in message


def test_missing_archive_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such archive"):
        safe_extract(tmp_path / "nope.tgz", tmp_path / "dest")


def test_find_cub_root(tmp_path: Path) -> None:
    root = tmp_path / "CUB_200_2011"
    _make_tree(root)
    assert find_cub_root(root) == root
    assert find_cub_root(tmp_path) == root
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="images.txt"):
        find_cub_root(tmp_path / "empty")
    with pytest.raises(UserError, match="no such directory"):
        find_cub_root(tmp_path / "missing")


# ---------------------------------------------------------------- size and member limits

SMALL_LIMITS = ExtractLimits(max_bytes=100_000, max_members=20)


def test_archive_over_the_size_limit_is_refused_before_writing(tmp_path: Path) -> None:
    tgz = _tar(tmp_path / "big.tgz", [_file("CUB_200_2011/images.txt", b"1 a.jpg\n"),
                                       _file("CUB_200_2011/zeros", bytes(150_000))])
    dest = tmp_path / "dest"
    with pytest.raises(UserError) as caught:
        safe_extract(tgz, dest, SMALL_LIMITS)
    assert str(caught.value) == (f"{tgz}: unpacks to more than 0.0001 GB, over the limit; if the archive is "
                                 f"trusted, raise it with --max-extract-gb ({MAX_EXTRACT_GB_ENV})")
    assert not dest.exists()
    safe_extract(tgz, dest, ExtractLimits(max_bytes=150_008, max_members=20))  # the limit is inclusive
    assert (dest / "CUB_200_2011" / "zeros").stat().st_size == 150_000


def test_header_claiming_a_huge_member_is_refused_without_inflating_it(tmp_path: Path) -> None:
    """A bomb: the first header claims 1 TB; the check stops at that header, never reading the data."""
    info = tarfile.TarInfo("CUB_200_2011/huge")
    info.size = 10**12
    tgz = tmp_path / "bomb.tgz"
    with gzip.open(tgz, "wb") as f:
        f.write(info.tobuf(tarfile.GNU_FORMAT) + bytes(4096))  # the data is missing: a bare claim
    with pytest.raises(UserError, match="unpacks to more than"):
        safe_extract(tgz, tmp_path / "dest")  # default limits
    assert not (tmp_path / "dest").exists()


def test_sparse_member_counts_its_map_not_its_size_field(tmp_path: Path) -> None:
    """GNU sparse 1.0: the header says 10 bytes, the map writes 200 kB before the file is truncated."""
    data = 200_000
    sparse_map = f"1\n0\n{data}\n".encode().ljust(512, b"\0")
    info = tarfile.TarInfo("GNUSparseFile.0/big")
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "big",
                        "GNU.sparse.realsize": "10"}
    tgz = tmp_path / "sparse.tgz"
    with tarfile.open(tgz, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info.size = len(sparse_map) + data
        tar.addfile(info, io.BytesIO(sparse_map + bytes(data)))
    with tarfile.open(tgz) as tar:
        [member] = tar.getmembers()
    assert (member.name, member.size, member.sparse) == ("big", 10, [(0, data)])
    with pytest.raises(UserError, match="unpacks to more than"):
        safe_extract(tgz, tmp_path / "dest", SMALL_LIMITS)
    assert not (tmp_path / "dest").exists()


def test_too_many_members_is_refused(tmp_path: Path) -> None:
    tgz = _tar(tmp_path / "many.tgz", [_file(f"d/{i:03d}", b"x") for i in range(21)])
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "kept").write_text("mine")
    with pytest.raises(UserError, match=f"more than 20 members, over the limit.*{MAX_EXTRACT_FILES_ENV}"):
        safe_extract(tgz, dest, SMALL_LIMITS)
    assert [p.name for p in dest.iterdir()] == ["kept"]


def test_failure_while_writing_leaves_nothing_behind(tmp_path: Path) -> None:
    """Headers fine, a write fails half-way: what this extraction wrote is removed, what was there stays.
    (A cut or corrupt archive already fails while its headers are read, before anything is written.)"""
    tgz = _tar(tmp_path / "clash.tgz", [_file("a/one", b"1"), _file("b"), _file("kept/x")])
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "kept").write_text("a file, so kept/x cannot be written")
    with pytest.raises(UserError, match=f"extracting into {dest} failed"):
        safe_extract(tgz, dest)
    assert [p.name for p in dest.iterdir()] == ["kept"] and (dest / "kept").read_text().startswith("a file")


@pytest.mark.parametrize(("gb", "files", "expected"), [
    ("", "", ExtractLimits(5_000_000_000, 50_000)),
    ("0.5", "100", ExtractLimits(500_000_000, 100)),
])
def test_extract_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch, gb: str, files: str,
                                             expected: ExtractLimits) -> None:
    monkeypatch.setenv(MAX_EXTRACT_GB_ENV, gb)
    monkeypatch.setenv(MAX_EXTRACT_FILES_ENV, files)
    assert extract_limits() == expected


@pytest.mark.parametrize(("name", "value"), [(MAX_EXTRACT_GB_ENV, "0"), (MAX_EXTRACT_GB_ENV, "lots"),
                                             (MAX_EXTRACT_GB_ENV, "nan"), (MAX_EXTRACT_FILES_ENV, "1.5")])
def test_bad_extract_limit_is_a_user_error(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=name):
        extract_limits()
