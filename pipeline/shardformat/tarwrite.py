"""A shard's tar bytes: ustar, fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644), so the same
members always give the same bytes."""

from __future__ import annotations

import tarfile

TAR_MTIME = 0


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """The bytes `tarfile` writes for these members in ustar format with fixed metadata, assembled directly:
    `TarFile.addfile` copies every TarInfo and streams through file objects, which doubled the cost of
    writing a shard of small members."""
    chunks = [chunk for name, payload in members for chunk in member_chunks(name, payload)]
    chunks.append(end_of_archive(sum(map(len, chunks))))
    return b"".join(chunks)


def member_chunks(name: str, payload: bytes) -> tuple[bytes, bytes, bytes]:
    """One member's bytes in `tar_bytes`: header, payload, zero padding to a whole block."""
    return _ustar_header(name, len(payload)), payload, tarfile.NUL * (-len(payload) % tarfile.BLOCKSIZE)


def end_of_archive(size: int) -> bytes:
    """What follows members of `size` bytes in all: the end-of-archive marker, then zeros to a whole record
    (as tarfile pads)."""
    marker = tarfile.NUL * 2 * tarfile.BLOCKSIZE
    return marker + tarfile.NUL * (-(size + len(marker)) % tarfile.RECORDSIZE)


def tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """The TarInfo of a member as `tar_bytes` writes it (what `tarfile` would need to write the same bytes)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


_NAME, _SIZE, _CHECKSUM = slice(0, 100), slice(124, 136), slice(148, 156)  # ustar header fields
_TEMPLATE = bytearray(tarinfo("", 0).tobuf(tarfile.USTAR_FORMAT))
_TEMPLATE[_CHECKSUM] = b" " * 8  # the checksum is a byte sum taken with its own field as spaces
_TEMPLATE_SUM = sum(_TEMPLATE) - sum(_TEMPLATE[_SIZE])  # the empty name adds nothing


def _ustar_header(name: str, size: int) -> bytes:
    """`tarinfo(name, size).tobuf(USTAR_FORMAT)` in a tenth of the time: only name, size and checksum vary."""
    encoded = name.encode("ascii")
    if len(encoded) > 100:  # ustar's prefix field is never needed: names are a key and a suffix
        raise ValueError(f"tar member name too long: {name!r}")
    size_field = b"%011o\0" % size
    header = bytearray(_TEMPLATE)
    header[_NAME] = encoded.ljust(100, tarfile.NUL)
    header[_SIZE] = size_field
    header[_CHECKSUM] = b"%06o\0 " % (_TEMPLATE_SUM + sum(encoded) + sum(size_field))
    return bytes(header)
