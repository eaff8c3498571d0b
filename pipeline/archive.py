"""Deterministic .tgz packing, safe extraction and locating the CUB root inside a directory.

`safe_extract` checks every member before writing anything: an archive from the internet must not be able
to write outside the destination, through `..`, absolute names, links (also chains of links) or devices.
`tarfile`'s `filter="data"` is applied as well, as a second line of defence while extracting.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.env import positive_number
from pipeline.errors import UserError, one_line
from pipeline.files import atomic_path

CUB_DIRNAME = "CUB_200_2011"
# CUB_200_2011.tgz (1.1 GB) unpacks to about 1.2 GB in about 12,000 members: the default limits leave about
# four times that, and stop an archive that would fill the disk or its inodes (a few MB of gzip can claim
# hundreds of GB of zeros).
DEFAULT_MAX_EXTRACT_GB = 5.0
DEFAULT_MAX_EXTRACT_FILES = 50_000
MAX_EXTRACT_GB_ENV = "CUBSTREAM_MAX_EXTRACT_GB"
MAX_EXTRACT_FILES_ENV = "CUBSTREAM_MAX_EXTRACT_FILES"
ROOT_MARKER = "images.txt"
MAX_LINK_DEPTH = 40


# ---------------------------------------------------------------- packing


def pack_tgz(src_dir: Path, tgz_path: Path, arcname: str = CUB_DIRNAME) -> None:
    """Pack `src_dir` as `arcname/...` into a byte-reproducible tar.gz (sorted, mtime 0, root-owned).

    Written to a temporary name next to `tgz_path` and renamed, so `tgz_path` is always complete.
    """
    src_dir, tgz_path = Path(src_dir), Path(tgz_path)
    if not src_dir.is_dir():
        raise UserError(f"{src_dir}: not a directory, nothing to pack")
    tgz_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(tgz_path) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in _walk_sorted(src_dir):
            relative = path.relative_to(src_dir).as_posix()
            name = arcname if relative == "." else f"{arcname}/{relative}"
            _add_normalized(tar, path, name)


def _walk_sorted(root: Path) -> Iterator[Path]:
    """`root`, then its entries depth-first in name order (symlinked directories are not followed)."""
    yield root
    for child in sorted(root.iterdir(), key=lambda p: p.name):
        if child.is_dir() and not child.is_symlink():
            yield from _walk_sorted(child)
        else:
            yield child


def _add_normalized(tar: tarfile.TarFile, path: Path, name: str) -> None:
    info = tar.gettarinfo(str(path), arcname=name)
    if not (info.isfile() or info.isdir() or info.issym()):
        raise UserError(f"{path}: cannot pack this kind of file (only files, directories and symlinks)")
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    executable = info.isdir() or bool(info.mode & stat.S_IXUSR)
    info.mode = 0o755 if executable else 0o644
    if info.isfile():
        with open(path, "rb") as f:
            tar.addfile(info, f)
    else:
        tar.addfile(info)


# ---------------------------------------------------------------- extraction


@dataclass(frozen=True)
class ExtractLimits:
    """The most an archive may unpack to, checked from the member headers before anything is written."""

    max_bytes: int
    max_members: int


def extract_limits() -> ExtractLimits:
    """The limits from MAX_EXTRACT_GB_ENV / MAX_EXTRACT_FILES_ENV (set by --max-extract-gb and
    --max-extract-files), else the defaults."""
    gb = positive_number(MAX_EXTRACT_GB_ENV, "--max-extract-gb", DEFAULT_MAX_EXTRACT_GB)
    files = positive_number(MAX_EXTRACT_FILES_ENV, "--max-extract-files", DEFAULT_MAX_EXTRACT_FILES)
    if files != int(files):
        raise UserError(f"--max-extract-files ({MAX_EXTRACT_FILES_ENV}) must be a whole number, got {files:g}")
    return ExtractLimits(int(gb * 1e9), int(files))


def safe_extract(tgz_path: Path, dest: Path, limits: ExtractLimits | None = None) -> None:
    """Extract a .tgz/.tar into `dest` after checking ALL members; refuse the archive if one is unsafe.

    Refused (UserError naming the member): absolute names, `..` components, links whose target lands
    outside `dest` (resolving links inside the archive too), devices and fifos. Refused too (one line
    naming the archive and the limit): more members or more bytes written than `limits` (default:
    `extract_limits()`), or more bytes than the free space at `dest`. All of it is judged from the member
    headers before anything is written; reading stops at the first header past a limit, so a small archive
    claiming terabytes is not inflated to count them. A corrupt or truncated archive is a UserError naming
    the file. On any failure nothing extracted is left behind.
    """
    tgz_path, dest = Path(tgz_path), Path(dest)
    limits = limits or extract_limits()
    if not tgz_path.is_file():
        raise UserError(f"{tgz_path}: no such archive")
    created = _Created(dest)
    try:
        with tarfile.open(tgz_path, mode="r:*") as tar:
            members, total = _read_headers(tar, tgz_path, limits)
            _check_members(members)
            _check_space(tgz_path, dest, total)
            created.make_dest()
            tar.extractall(dest, members=members, filter="data")
    except BaseException as e:
        created.remove()
        if isinstance(e, UserError | KeyboardInterrupt):
            raise
        if isinstance(e, tarfile.FilterError):
            raise UserError(f"{tgz_path}: unsafe member refused while extracting: {one_line(e)}") from None
        if isinstance(e, tarfile.TarError | EOFError | zlib.error | gzip.BadGzipFile):
            raise UserError(f"{tgz_path}: corrupt, truncated or not a tar archive ({one_line(e)})") from None
        if isinstance(e, OSError):
            raise UserError(f"{tgz_path}: extracting into {dest} failed ({e})") from None
        raise


class _Created:
    """What an extraction adds to `dest`, so that a failed one can take exactly that away again."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.dest_existed = dest.exists()
        self.before = set(os.listdir(dest)) if dest.is_dir() else set()

    def make_dest(self) -> None:
        self.dest.mkdir(parents=True, exist_ok=True)

    def remove(self) -> None:
        if not self.dest.is_dir():
            return
        if not self.dest_existed:
            shutil.rmtree(self.dest, ignore_errors=True)
            return
        for name in set(os.listdir(self.dest)) - self.before:
            path = self.dest / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _read_headers(tar: tarfile.TarFile, tgz_path: Path, limits: ExtractLimits) -> tuple[list[tarfile.TarInfo], int]:
    """Every member header and the bytes the members unpack to; a UserError as soon as a limit is passed."""
    members: list[tarfile.TarInfo] = []
    sizes: dict[str, int] = {}
    total = 0
    while (member := tar.next()) is not None:
        members.append(member)
        if len(members) > limits.max_members:
            raise UserError(f"{tgz_path}: more than {limits.max_members} members, over the limit; if the "
                            f"archive is trusted, raise it with --max-extract-files ({MAX_EXTRACT_FILES_ENV})")
        size = _unpacked_size(member, sizes)
        sizes[_normalized(member.name)] = size
        total += size
        if total > limits.max_bytes:
            raise UserError(f"{tgz_path}: unpacks to more than {_gb(limits.max_bytes)}, over the limit; if the "
                            f"archive is trusted, raise it with --max-extract-gb ({MAX_EXTRACT_GB_ENV})")
    return members, total


def _unpacked_size(member: tarfile.TarInfo, sizes: dict[str, int]) -> int:
    """The bytes extracting `member` writes. A sparse file writes each piece of its map at its offset, and
    the map, not the size field, says how much: a map of gigabytes under a "10 byte" header would fill the
    disk before the file is truncated to its size. A hard link counts as a copy of its target, which is
    what it becomes where the file system has no hard links."""
    if member.islnk():
        return sizes.get(_normalized(member.linkname), 0)
    if not member.isfile():
        return 0
    if member.sparse:
        pieces = sum(size for _, size in member.sparse)
        end = max((offset + size for offset, size in member.sparse), default=0)
        return max(member.size, pieces, end)
    return member.size


def _check_space(tgz_path: Path, dest: Path, total: int) -> None:
    existing = next(p for p in (dest, *dest.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if total > free:
        raise UserError(f"{tgz_path}: unpacks to {_gb(total)} but {existing} has only {_gb(free)} free")


def _gb(size: int) -> str:
    return f"{size / 1e9:.3g} GB"


def _check_members(members: list[tarfile.TarInfo]) -> None:
    symlinks = {_normalized(m.name): m.linkname for m in members if m.issym()}
    for member in members:
        _check_member(member, symlinks)


def _check_member(member: tarfile.TarInfo, symlinks: dict[str, str]) -> None:
    name = member.name
    if member.isdev():  # character or block device, or fifo
        raise UserError(f"unsafe archive member {name!r}: device or fifo")
    _check_relative(name, name, "path")
    parent = list(PurePosixPath(_normalized(name)).parts[:-1])
    if _resolve(parent, symlinks) is None:
        raise UserError(f"unsafe archive member {name!r}: its directory is a link leading outside")
    if member.issym():
        if PurePosixPath(member.linkname).is_absolute() or _resolve(parent + _parts(member.linkname),
                                                                    symlinks) is None:
            raise UserError(f"unsafe archive member {name!r}: symlink to {member.linkname!r} leads outside")
    elif member.islnk():
        _check_relative(member.linkname, name, "hardlink target")
        if _resolve(_parts(member.linkname), symlinks) is None:
            raise UserError(f"unsafe archive member {name!r}: hardlink to {member.linkname!r} leads outside")


def _check_relative(path: str, member_name: str, what: str) -> None:
    posix = PurePosixPath(path)
    if posix.is_absolute() or path.startswith("\\") or (len(path) > 1 and path[1] == ":"):
        raise UserError(f"unsafe archive member {member_name!r}: absolute {what} {path!r}")
    if ".." in posix.parts:
        raise UserError(f"unsafe archive member {member_name!r}: '..' in {what} {path!r}")


def _normalized(name: str) -> str:
    return "/".join(_parts(name))


def _parts(path: str) -> list[str]:
    return [p for p in PurePosixPath(path).parts if p not in ("", ".", "/")] if path else []


def _resolve(parts: list[str], symlinks: dict[str, str], depth: int = 0) -> list[str] | None:
    """Resolve an archive-relative path through the archive's own symlinks; None if it escapes the root.

    Lexical checks alone miss chains such as `a -> .` plus `b -> a/..`: resolved, `b` is the parent of dest.
    """
    if depth > MAX_LINK_DEPTH:
        return None
    stack: list[str] = []
    for part in parts:
        if part == "..":
            if not stack:
                return None
            stack.pop()
            continue
        stack.append(part)
        target = symlinks.get("/".join(stack))
        if target is None:
            continue
        if PurePosixPath(target).is_absolute():
            return None
        resolved = _resolve(stack[:-1] + _parts(target), symlinks, depth + 1)
        if resolved is None:
            return None
        stack = resolved
    return stack


# ---------------------------------------------------------------- locating the dataset


def find_cub_root(path: Path) -> Path:
    """The directory holding `images.txt`: `path` itself or `path/CUB_200_2011`."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such directory")
    for candidate in (path, path / CUB_DIRNAME):
        if (candidate / ROOT_MARKER).is_file():
            return candidate
    raise UserError(f"not CUB's layout: no {ROOT_MARKER} in {path} or {path / CUB_DIRNAME}")
