"""pipeline.archive: deterministic packing, refusing unsafe archives before writing anything, finding the root."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from pipeline.archive import find_cub_root, pack_tgz, safe_extract
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
