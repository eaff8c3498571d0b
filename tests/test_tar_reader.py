"""train.tar_reader against tarfile and webdataset's own tar iterator, on our shards and other writers' tars."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from webdataset.tariterators import tar_file_iterator

from train.tar_reader import tar_members


def _reference(data: bytes) -> list[tuple[str, bytes]]:
    """What webdataset's tarfile-based iterator yields for the same bytes."""
    return [(m["fname"], m["data"]) for m in tar_file_iterator(io.BytesIO(data))]


def _tar(tar_format: int, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tar_format) as tar:
        for info, payload in members:
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return out.getvalue()


def _file(name: str, payload: bytes, mtime: float = 0) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(payload), mtime
    return info, payload


def _other_writers_members() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    directory = tarfile.TarInfo("d")
    directory.type = tarfile.DIRTYPE
    link = tarfile.TarInfo("d/link.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "x" * 120
    return [
        (directory, None),
        _file("d/00001.jpg", b"\xff\xd8 jpeg bytes", mtime=1700000000.5),  # float mtime: pax record
        _file("d/00001.cls", b"3"),
        _file("d/" + "long" * 40 + ".cls", b"7"),  # > 100 bytes: ustar prefix, pax or GNU long name
        _file("d/vögel.json", b"{}"),  # not ASCII: pax path record
        (link, None),
        _file("__meta__", b"skipped by webdataset"),
        _file("d/empty.txt", b""),
        _file("d/" + "x" * 200 + "/deep.txt", b"deep"),  # too long even for the ustar prefix: pax / GNU only
    ]


def test_our_shards_read_like_tarfile(shard_set: Path) -> None:
    for shard in sorted(shard_set.glob("*.tar"))[:3]:
        data = shard.read_bytes()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            expected = [(m.name, tar.extractfile(m).read()) for m in tar]
        assert list(tar_members(io.BytesIO(data))) == expected
        assert len(expected) % 3 == 0 and expected


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_other_writers_read_like_webdataset(tar_format: int) -> None:
    data = _tar(tar_format, _other_writers_members())
    members = list(tar_members(io.BytesIO(data)))
    assert members == _reference(data)
    assert ("d/" + "long" * 40 + ".cls", b"7") in members and ("d/vögel.json", b"{}") in members
    assert all(not name.startswith("__") for name, _ in members) and len(members) == 6


def test_ustar_prefix_names() -> None:
    name = "p" * 60 + "/" + "q" * 80 + ".jpg"  # 145 bytes: split into prefix and name
    data = _tar(tarfile.USTAR_FORMAT, [_file(name, b"payload")])
    assert list(tar_members(io.BytesIO(data))) == _reference(data) == [(name, b"payload")]


class _Trickle(io.RawIOBase):
    """A pipe-like stream that returns at most 700 bytes per read, as curl's stdout may."""

    def __init__(self, data: bytes) -> None:
        self.data, self.position = data, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = 700 if size < 0 else min(size, 700)
        chunk = self.data[self.position:self.position + size]
        self.position += len(chunk)
        return chunk


def test_short_reads_are_completed(shard_set: Path) -> None:
    data = sorted(shard_set.glob("*.tar"))[0].read_bytes()
    assert list(tar_members(_Trickle(data))) == list(tar_members(io.BytesIO(data)))


def test_missing_end_marker_ends_cleanly() -> None:
    data = _tar(tarfile.USTAR_FORMAT, [_file("a.cls", b"1"), _file("a.jpg", b"x" * 600)])
    end = 512 + 512 + 512 + 1024  # two headers, two padded payloads
    assert list(tar_members(io.BytesIO(data[:end]))) == [("a.cls", b"1"), ("a.jpg", b"x" * 600)]


@pytest.mark.parametrize("cut", [100, 512 + 300, 512 + 512 + 512 + 100])
def test_truncated_tar_is_a_read_error(cut: int) -> None:
    data = _tar(tarfile.USTAR_FORMAT, [_file("a.cls", b"1"), _file("a.jpg", b"x" * 600)])
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        list(tar_members(io.BytesIO(data[:cut])))


@pytest.mark.parametrize("offset, message", [(3, "checksum mismatch"), (150, "bad checksum field"),
                                             (125, "checksum mismatch")])
def test_damaged_header_is_a_read_error(offset: int, message: str) -> None:
    data = bytearray(_tar(tarfile.USTAR_FORMAT, [_file("a.cls", b"1")]))
    data[offset] = ord("z")
    with pytest.raises(tarfile.ReadError, match=message):
        list(tar_members(io.BytesIO(bytes(data))))
