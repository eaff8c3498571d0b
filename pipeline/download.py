"""Fetch the official CUB-200-2011 archive (resumable, MD5-checked) and unpack it safely.

`out/CUB_200_2011.tgz.part` grows while downloading; an interrupted run is resumed with an HTTP Range
request (a server that answers 200 instead of 206 makes it start over). Only a complete file whose MD5
matches becomes `out/CUB_200_2011.tgz`, and only a complete extraction becomes `out/CUB_200_2011/`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from http.client import HTTPResponse
from pathlib import Path

from tqdm import tqdm

from pipeline.archive import CUB_DIRNAME, find_cub_root, safe_extract
from pipeline.errors import UserError
from pipeline.files import replace_dir
from pipeline.remote import IO_TIMEOUT_ENV, io_timeout

DEFAULT_URL = "https://data.caltech.edu/records/65de6-vzh51/files/CUB_200_2011.tgz?download=1"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
TGZ_NAME = f"{CUB_DIRNAME}.tgz"
CHUNK_BYTES = 1 << 20
USER_AGENT = "cubstream-download/1"


def download(out: Path, url: str = DEFAULT_URL, md5: str = CUB_MD5, progress: bool = True) -> Path:
    """Make sure `out/CUB_200_2011.tgz` (matching `md5`) and `out/CUB_200_2011/` exist; return the latter.

    An archive already in place with the right MD5 is not fetched again, and a dataset directory already
    unpacked next to it is kept as it is.
    """
    out = Path(out)
    expected = _normalize_md5(md5)
    _make_dir(out)
    tgz = out / TGZ_NAME
    final = out / CUB_DIRNAME
    if tgz.is_file() and _md5_of(tgz) == expected:
        if (final / "images.txt").is_file():
            return final
    else:
        _fetch_verified(url, tgz, expected, progress)
    return _unpack(tgz, out)


def _normalize_md5(md5: str) -> str:
    value = md5.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{32}", value):
        raise UserError(f"--md5 must be 32 hex digits (got {md5!r})")
    return value


def _md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_verified(url: str, tgz: Path, expected: str, progress: bool) -> None:
    # Not pipeline.files' `.NAME.tmp-PID`: the partial download must keep one name across runs, so that the
    # next run resumes it (an HTTP Range request) instead of starting over.
    part = tgz.with_name(tgz.name + ".part")
    _fetch(url, part, progress)
    got = _md5_of(part)
    if got != expected:
        part.unlink()
        raise UserError(f"{url}: MD5 mismatch: expected {expected}, got {got} (deleted the download)")
    os.replace(part, tgz)


# ---------------------------------------------------------------- HTTP


def _fetch(url: str, part: Path, progress: bool) -> None:
    """Download `url` into `part`, continuing from the bytes already there when the server allows it."""
    offset = part.stat().st_size if part.is_file() else 0
    response = _open(url, offset)
    if response is None:  # 416: the server has nothing past `offset`; the MD5 check judges the file
        return
    with response:
        resumed = offset > 0 and response.status == 206 and _content_range_start(response) == offset
        if not resumed:
            offset = 0  # 200 (Range ignored) or an unexpected range: start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None and length.isdigit() else None
        _copy(response, part, "ab" if resumed else "wb", offset, total, url, progress)


def _open(url: str, offset: int) -> HTTPResponse | None:
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    timeout = io_timeout()  # per socket operation: no byte for this long is a stall
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            return None
        raise UserError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError):
            raise UserError(f"{url}: stalled: no answer for {timeout:g} s ({IO_TIMEOUT_ENV} or --io-timeout "
                            "sets the limit)") from None
        raise UserError(f"{url}: unreachable ({reason})") from None


def _content_range_start(response: HTTPResponse) -> int | None:
    match = re.match(r"bytes\s+(\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _copy(response: HTTPResponse, part: Path, mode: str, offset: int, total: int | None, url: str,
          progress: bool) -> None:
    """Append the body to `part`; a broken or short transfer keeps `part` so that a rerun resumes."""
    size = offset
    with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                     unit_divisor=1024, desc=TGZ_NAME, disable=not progress) as bar:
        try:
            while chunk := response.read1(CHUNK_BYTES):  # what has arrived: a stall keeps it
                f.write(chunk)
                size += len(chunk)
                bar.update(len(chunk))
        except TimeoutError:  # the socket timeout of `_open`: no byte for that long
            raise UserError(f"{url}: stalled: no data for {io_timeout():g} s after {size} bytes "
                            f"({IO_TIMEOUT_ENV} or --io-timeout sets the limit); rerun to resume") from None
        except OSError as e:  # resets and other transfer errors
            raise UserError(f"{url}: download interrupted after {size} bytes ({e}); rerun to resume") from None
    if total is not None and size < total:
        raise UserError(f"{url}: download interrupted after {size} of {total} bytes; rerun to resume")


# ---------------------------------------------------------------- unpacking


def _unpack(tgz: Path, out: Path) -> Path:
    """Extract into a temporary directory in `out`, then rename the dataset root to `out/CUB_200_2011`.

    Other top-level members of the archive (the official one also holds `attributes.txt`) are moved
    next to it unless something of that name is already there.
    """
    final = out / CUB_DIRNAME
    tmp = Path(tempfile.mkdtemp(prefix=f".{CUB_DIRNAME}.unpack-", dir=out))
    try:
        extracted = tmp / "archive"
        safe_extract(tgz, extracted)
        root = find_cub_root(extracted)  # `extracted` itself when the archive has no top-level directory
        replace_dir(root, final)
        if root != extracted:
            for extra in sorted(extracted.iterdir()):
                if not (out / extra.name).exists():
                    os.replace(extra, out / extra.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {path}: cannot create directory ({e.strerror})") from None
