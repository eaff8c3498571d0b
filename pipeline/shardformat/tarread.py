"""Reading shards: the fast reader of the train stream, and the strict grouping `verify` checks with.

`tar_members` reads the regular-file members of a tar stream from the headers directly. webdataset reads
tars through `tarfile` in stream mode, which builds a TarInfo and decodes every header field for each
member, a real share of the train stream's time with three small members a sample. This reader takes only
what a sample needs (name, size, type) from each 512-byte header and checks the header checksum as
`tarfile` does. It understands what other writers add: ustar name prefixes, pax extended headers (`tarfile`'s
default format writes them for long or non-ASCII names) and GNU long names. Like webdataset, it skips
everything but regular files and `__*__` meta members; grouping members into samples stays webdataset's
(`group_by_keys`).

`strict_samples` reads a whole shard with `tarfile` (an independent reader of what tarwrite wrote) and
refuses what a stream reader would silently get wrong: a member that is not a regular file, a member twice,
a sample whose members are split by another's.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from pipeline.shardformat.schema import split_name

BLOCK = tarfile.BLOCKSIZE
REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of every regular file, in order; tarfile.ReadError for a broken or cut tar."""
    pending: dict[str, str] = {}  # from a pax or GNU long-name record, for the next member
    while True:
        header = stream.read(BLOCK)
        if not header:  # a tar without its end-of-archive blocks ends here too (as in tarfile)
            return
        header += _read_exactly(stream, BLOCK - len(header))
        if header == tarfile.NUL * BLOCK:
            return
        _check_checksum(header)
        kind = header[156:157]
        size = int(pending["size"]) if "size" in pending else _number(header[124:136])
        payload = _read_exactly(stream, size)
        _read_exactly(stream, -size % BLOCK)
        if kind == tarfile.XHDTYPE:
            pending.update(_pax_records(payload))
            continue
        if kind == tarfile.GNUTYPE_LONGNAME:
            pending["path"] = payload.rstrip(tarfile.NUL).decode("utf-8", "surrogateescape")
            continue
        if kind == tarfile.GNUTYPE_LONGLINK:  # a link target: not needed, and it may precede a long name
            continue
        name = pending.get("path") or _name(header)
        pending = {}
        if kind in REGULAR and not META.match(name):
            yield name, payload


def _check_checksum(header: bytes) -> None:
    try:
        stored = _number(header[148:156])
    except tarfile.ReadError:
        raise tarfile.ReadError("invalid member header (bad checksum field)") from None
    unsigned = 256 + sum(header) - sum(header[148:156])  # the checksum field counts as 8 spaces
    if stored != unsigned and stored not in tarfile.calc_chksums(header):  # also tarfile's signed variant
        raise tarfile.ReadError("invalid member header (checksum mismatch)")


def _number(field: bytes) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 (high bit of the first byte)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(tarfile.NUL, 1)[0].strip()
    try:
        return int(digits or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"invalid number {field!r} in a member header") from None


def _name(header: bytes) -> str:
    name = header[0:100].split(tarfile.NUL, 1)[0]
    if header[257:265] == tarfile.POSIX_MAGIC:  # ustar: long paths are split into prefix/name
        prefix = header[345:500].split(tarfile.NUL, 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(payload: bytes) -> dict[str, str]:
    """The "LENGTH key=value\\n" records of a pax extended header."""
    records = {}
    position = 0
    while position < len(payload) and payload[position] != 0:
        length_text, _, _ = payload[position:position + 20].partition(b" ")
        try:
            length = int(length_text)
        except ValueError:
            raise tarfile.ReadError("invalid pax extended header") from None
        key, _, value = payload[position + len(length_text) + 1:position + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size) if size > 0 else b""
    while len(data) < size:  # short reads happen on pipes (curl); an empty one is the end of the stream
        chunk = stream.read(size - len(data))
        if not chunk:
            raise tarfile.ReadError("unexpected end of data")
        data += chunk
    return data


def strict_samples(data: bytes) -> tuple[dict[str, dict[str, bytes | str]], str]:
    """Raw samples by key ({key: {"__key__": key, suffix: payload, ...}}, as webdataset groups them), and
    the first grouping problem: a member that
    appears twice, or a sample whose members are split by another's (readers group consecutive members, so
    they would see it twice or read only its first part). tarfile.TarError or ValueError for a tar that
    cannot be read, or a member that is not a regular file."""
    samples: dict[str, dict[str, bytes | str]] = {}
    previous = None
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                raise ValueError(f"member {member.name} is not a regular file")
            key, suffix = split_name(member.name)
            if key != previous and key in samples:
                return samples, f"sample {key}: duplicate sample ({member.name} after sample {previous})"
            if suffix in samples.setdefault(key, {"__key__": key}):
                return samples, f"sample {key}: duplicate member {member.name}"
            samples[key][suffix] = tar.extractfile(member).read()
            previous = key
    return samples, ""
