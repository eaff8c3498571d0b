"""A node-local cache of remote shards (`--cache-dir`, $CUBSTREAM_CACHE_DIR): each http(s) or `pipe:` shard is
fetched once, checked against the manifest's sha256, and read from local disk afterwards. Local shard sets
are read where they are, never copied.

Files in the cache directory:
    <sha256>.tar                a shard, named by its manifest sha256: a rebuilt shard with other bytes is
                                another file, and the same shard of two sets is one
    <sha256>.lock, .fetch       its two lock files (never deleted: a lock file deleted while others hold it
                                open would let a newcomer lock a fresh file beside them)
    .<sha256>.tar.tmp-PID       a fetch in progress; renamed to <sha256>.tar only once its bytes matched,
                                so a killed fetch leaves nothing that looks complete

Sharing: any number of processes and runs on a node use one directory. A reader holds a shared `flock` on
the shard's `.lock` while it reads or fetches it (the shard is "in use"; eviction needs it exclusively). A
reader that finds no copy, or a copy whose bytes no longer match the sha256, takes the `.fetch` lock
exclusively (waiting while another process fetches that shard), looks again (the other process may have
just fetched it), removes temporaries that killed fetches left, fetches, renames, and reads. So each shard
is fetched once; the others wait for the fetch, then read the finished file, and readers of a complete copy
never wait for each other. Every open hashes the copy (local disk, ~2 GB/s) before a sample is read: a
cached file that changed is fetched again, never trained on. A reader keeps its open file, so a copy
replaced or evicted meanwhile does not change what it reads.

Limit (`--cache-limit-gb`, $CUBSTREAM_CACHE_LIMIT_GB, GB = 10^9 bytes): after each fetch, while the cached
shards add up to more, the least recently opened ones (file mtime, set at each open) that no process holds
are removed. Shards in use are never removed, so the cache can exceed the limit by the shards being read.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline.env import positive_number
from pipeline.errors import UserError
from pipeline.files import atomic_path, remove_quietly, sha256_of, temporaries
from pipeline.lock import lock_fd, open_lock
from pipeline.outputs import output_dir_problem
from pipeline.remote import CHUNK, RemoteError, is_pipe, is_url, open_stream

CACHE_DIR_ENV = "CUBSTREAM_CACHE_DIR"
CACHE_LIMIT_ENV = "CUBSTREAM_CACHE_LIMIT_GB"
GB = 10**9

log = logging.getLogger(__name__)


def configure(directory: str = "", limit_gb: float = 0.0) -> ShardCache | None:
    """Make `directory` and `limit_gb` the cache of this process and of every process it starts (DataLoader
    workers, launched ranks inherit the environment); "" and 0 keep the environment's. Returns the cache in
    force (None: no cache); one-line UserError when its directory cannot be created or written."""
    if directory:
        os.environ[CACHE_DIR_ENV] = directory
    if limit_gb:
        os.environ[CACHE_LIMIT_ENV] = f"{limit_gb:g}"
    cache = current()
    if cache is not None:
        problem = output_dir_problem(cache.directory, "--cache-dir")
        if problem:
            raise UserError(problem)
    return cache


def current() -> ShardCache | None:
    """The cache the environment names (None: reads go straight to the source)."""
    directory = os.environ.get(CACHE_DIR_ENV, "").strip()
    if not directory:
        return None
    limit = positive_number(CACHE_LIMIT_ENV, "--cache-limit-gb", math.inf)
    return ShardCache(Path(directory), None if math.isinf(limit) else int(limit * GB))


def is_cached_source(location: str) -> bool:
    """Whether shards at `location` go through a cache: remote ones only (a local file is read in place)."""
    return is_url(location) or is_pipe(location)


@dataclass(frozen=True)
class ShardCache:
    directory: Path
    limit_bytes: int | None = None  # None: no limit

    @contextlib.contextmanager
    def open(self, url: str, sha256: str) -> Iterator[BinaryIO]:
        """The cached copy of the shard at `url`, open at its start, its bytes checked against `sha256`;
        fetched first when there is none or it no longer matches. The shard is in use (never evicted) until
        the block ends. RemoteError when the fetch fails or its bytes do not match."""
        path = self.directory / f"{sha256}.tar"
        _make_dir(self.directory)
        use = open_lock(_use_lock(path))
        file = None
        try:
            lock_fd(use, _use_lock(path), shared=True, wait=True)  # waits only for an eviction
            file = _checked(path, sha256)
            fetched = file is None
            if fetched:
                file = self._fetched(url, sha256, path)
            now = time.time_ns()
            os.utime(file.fileno(), ns=(now, now))  # the recency the limit evicts by
            if fetched:
                self.evict(keep=path)
            yield file
        finally:
            if file is not None:
                file.close()
            os.close(use)

    def _fetched(self, url: str, sha256: str, path: Path) -> BinaryIO:
        """`path` open, fetched unless another process fetched it while this one waited for the fetch lock."""
        fetch = open_lock(_fetch_lock(path))
        try:
            lock_fd(fetch, _fetch_lock(path), shared=False, wait=True)
            file = _checked(path, sha256)
            if file is None:
                self._fetch(url, sha256, path)
                file = open(path, "rb")  # noqa: SIM115 - the caller closes it
            return file
        finally:
            os.close(fetch)

    def _fetch(self, url: str, sha256: str, path: Path) -> None:
        """Stream `url` into a temporary beside `path`, check its sha256, rename. Runs under the shard's
        fetch lock, so any temporary of this shard is a killed fetch's and is removed first."""
        _remove_temporaries(path)
        stream = open_stream(url, digest=True)
        try:
            with atomic_path(path) as tmp, open(tmp, "wb", buffering=0) as out:  # chunks of up to CHUNK bytes
                while chunk := stream.read(CHUNK):
                    out.write(chunk)
                if stream.finish() != sha256:
                    raise RemoteError(url, "its bytes do not match the manifest's sha256 (changed or corrupted "
                                           "since the set was built; check it with `python -m pipeline verify`); "
                                           "not cached")
        except OSError as e:
            raise RemoteError(url, f"cannot write its copy in the cache {self.directory} ({e.strerror or e})") from None
        finally:
            stream.abort()  # no-op once finished

    def evict(self, keep: Path | None = None) -> None:
        """Remove least recently opened shards no process holds (never `keep`) until the cache fits its
        limit."""
        if self.limit_bytes is None:
            return
        entries = []
        for path in self.directory.glob("*.tar"):
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                entries.append((stat.st_mtime_ns, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.limit_bytes:
                return
            if path != keep and _remove_unused(path):
                total -= size


def _checked(path: Path, sha256: str) -> BinaryIO | None:
    """`path` open at its start if its bytes hash to `sha256`; None if it is missing or differs."""
    try:
        file = open(path, "rb")  # noqa: SIM115 - returned open, or closed below
    except FileNotFoundError:
        return None
    if sha256_of(file) == sha256:
        file.seek(0)
        return file
    file.close()
    log.warning("cached shard %s no longer matches its sha256: fetching it again", path)
    return None


def _use_lock(path: Path) -> Path:
    return path.with_suffix(".lock")


def _fetch_lock(path: Path) -> Path:
    return path.with_suffix(".fetch")


def _remove_unused(path: Path) -> bool:
    """Remove the cached shard `path` unless a process is reading or fetching it; whether it was removed."""
    lock = _use_lock(path)
    fd = open_lock(lock)
    try:
        if not lock_fd(fd, lock, shared=False, wait=False):
            return False
        path.unlink(missing_ok=True)
        _remove_temporaries(path)
        return True
    finally:
        os.close(fd)


def _remove_temporaries(path: Path) -> None:
    """Temporaries of `path` that killed fetches left (call only when no process can be fetching it)."""
    for leftover in temporaries(path.parent, path.name):
        remove_quietly(leftover)


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--cache-dir {directory}: cannot create ({e.strerror or e})") from None
