"""pipeline.shardformat: the tar writer against tarfile; the tar reader against tarfile and webdataset's own
tar iterator, on our shards and other writers' tars; the sample schema; and the one sample check, through
its real callers (verify and the train stream give the same reason for the same defect)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from webdataset.tariterators import tar_file_iterator

from pipeline.manifest import load_manifest
from pipeline.shardformat import Sample
from pipeline.shardformat.check import decode_sample, record_problem, sample_problem
from pipeline.shardformat.schema import MEMBER_ORDER, shard_name
from pipeline.shardformat.tarread import strict_samples, tar_members
from pipeline.shardformat.tarwrite import tar_bytes, tarinfo
from pipeline.verify import verify
from train import data
from train.data.shards import read_shard


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


# ---------------------------------------------------------------- writer and schema


def test_tar_bytes_equal_what_tarfile_writes() -> None:
    members = [(f"{i:05d}.{ext}", os.urandom(i * 37 + 1)) for i in range(40) for ext in ("cls", "jpg", "json")]
    members += [("n" * 100, b"longest name"), ("empty.cls", b"")]
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            tar.addfile(tarinfo(name, len(payload)), io.BytesIO(payload))
    assert tar_bytes(members) == expected.getvalue()
    assert tar_bytes([]) == tarfile.NUL * tarfile.RECORDSIZE
    with pytest.raises(ValueError, match="too long"):
        tar_bytes([("n" * 101, b"")])


def test_sample_members_in_schema_order() -> None:
    members = Sample("00042", 7, b"jpeg", {"b": 1.5, "a": [1, 2]}).members()
    assert members == (("00042.cls", b"7"), ("00042.jpg", b"jpeg"), ("00042.json", b'{"a": [1, 2], "b": 1.5}'))
    assert [name.split(".", 1)[1] for name, _ in members] == list(MEMBER_ORDER)
    with pytest.raises(ValueError, match="JSON compliant"):
        Sample("00042", 7, b"jpeg", {"bbox": [float("nan")]}).members()
    assert shard_name("valid", 12) == "valid-000012.tar"


# ---------------------------------------------------------------- one check for verify and the train stream

NUM_CLASSES = 6


def _jpeg(shade: int) -> bytes:
    """A 48x32 JPEG of noise around a shade: its entropy-coded data is most of the file."""
    pixels = np.random.default_rng(shade).integers(0, 60, (32, 48, 3)) + np.array([shade, 90, 190 - shade])
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def _sample(key: str, label: int = 1, **replace: bytes | None) -> list[tuple[str, bytes]]:
    """A sample's members with some payloads replaced by suffix (None leaves the member out, a new suffix adds
    one; `_` in a keyword stands for a dot: x_pkl is the suffix x.pkl)."""
    members = dict(Sample(key, label, _jpeg(label * 30), {"image_id": int(key)}).members())
    for suffix, payload in replace.items():
        name = f"{key}.{suffix.replace('_', '.')}"
        if payload is None:
            members.pop(name)
        else:
            members[name] = payload
    return list(members.items())


GOOD = _jpeg(10)
# (defect, damaged sample, the reason both verify and the train stream give, found by the cheap check too)
DEFECTS = [
    ("class too large", _sample("00001", cls=b"6"), "cls 6 out of range 0..5", True),
    ("class negative", _sample("00002", cls=b"-1"), "cls -1 out of range 0..5", True),
    ("class not a number", _sample("00003", cls=b"six"), "cls b'six' is not an integer", True),
    ("no jpg", _sample("00004", jpg=None), "needs jpg and cls, has ['cls', 'json']", True),
    ("no cls", _sample("00005", cls=None), "needs jpg and cls, has ['jpg', 'json']", True),
    ("not an image", _sample("00006", jpg=b"<html>404</html>"),
     "jpg does not decode (UnidentifiedImageError: cannot identify image file)", True),
    ("truncated jpg", _sample("00007", jpg=GOOD[: len(GOOD) // 2]), "jpg does not decode (OSError: ", False),
    ("pickle member", _sample("00008", pth=b"\x80\x04K\x01."), "pickle member .pth refused (never unpickled)", True),
    ("pickle member with a dotted suffix", _sample("00009", x_pkl=b"\x80\x04K\x01."),
     "pickle member .x.pkl refused (never unpickled)", True),
]


def _write_set(root: Path) -> list[Path]:
    """One test shard per defect: the damaged sample, then a good one. Returns the shards."""
    root.mkdir()
    shards, entries = [], []
    for index, (_, damaged, _, _) in enumerate(DEFECTS):
        payload = tar_bytes(damaged + _sample(f"{90 + index:05d}"))
        path = root / shard_name("test", index)
        path.write_bytes(payload)
        shards.append(path)
        entries.append({"name": path.name, "num_samples": 2, "bytes": len(payload),
                        "sha256": hashlib.sha256(payload).hexdigest()})
    empty = {"num_samples": 0, "class_counts": [], "shards": []}
    manifest = {"format": "cubstream-shards", "version": 1, "classes": [f"c{i}" for i in range(NUM_CLASSES)],
                "splits": {"train": empty, "valid": empty,
                           "test": {"num_samples": 2 * len(DEFECTS), "class_counts": [], "shards": entries}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return shards


def test_verify_and_train_stream_give_the_same_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shards = _write_set(tmp_path / "set")
    location = str(tmp_path / "set")
    by_verify = dict(line.split(" (test): ", 1) for line in verify(location, progress=False))
    with caplog.at_level(logging.WARNING, logger="train.data"):
        batches = list(data.eval_loader(location, load_manifest(location), "test", batch_size=4, workers=0, rank=0,
                                        world_size=1, transform=lambda image, seed: np.zeros((4, 4, 3), np.uint8)))
    assert sorted(key for batch in batches for key in batch["key"]) == [f"{90 + i:05d}" for i in range(len(DEFECTS))]
    dropped = [r.getMessage().removeprefix("dropped corrupt sample ") for r in caplog.records]
    by_stream = {rest.split(": ", 1)[0]: f"sample {key}: {rest.split(': ', 1)[1]}"
                 for key, _, rest in (line.partition(" in shard ") for line in dropped)}
    assert by_stream == by_verify
    for shard, (defect, damaged, reason, cheap) in zip(shards, DEFECTS, strict=True):
        key = damaged[0][0].split(".")[0]
        assert by_verify[str(shard)].startswith(f"sample {key}: {reason}"), defect
        # the cheap check (run on the samples a resumed stream skips) finds all but the undecodable pixels
        (raw, good) = read_shard(data.Shard(str(shard), 2))
        found = sample_problem(raw, NUM_CLASSES)
        assert (found == by_verify[str(shard)].split(": ", 1)[1]) if cheap else found is None, defect
        assert sample_problem(good, NUM_CLASSES) is None


def test_a_written_sample_decodes_to_the_same_sample() -> None:
    """What the writer builds comes back from decoding (verify's reader and the train stream's) as a Sample
    with the same key, label and record, its image decoded."""
    written = Sample("00042", 3, _jpeg(90), {"class_index": 3, "split": "train", "bbox": None})
    raw, problem = strict_samples(tar_bytes(list(written.members())))
    assert problem == ""
    read = decode_sample(raw["00042"], NUM_CLASSES, with_meta=True)
    assert (read.key, read.label, read.meta) == (written.key, written.label, written.meta)
    assert read.image.shape == (32, 48, 3) and read.image.dtype == np.uint8
    assert record_problem(read, "train") is None
    assert record_problem(read, "test") == "json says split 'train', but the sample is in a test shard"
    assert decode_sample(raw["00042"], NUM_CLASSES).meta is None  # the train stream never parses the JSON
