"""Reading one shard: the manifest's shards as `Shard`s, their raw samples, and the one-line error that stops
the run when a shard cannot be read (shards are never retried or skipped)."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from webdataset.tariterators import group_by_keys

from pipeline.errors import UserError, one_line
from pipeline.manifest import shard_locations
from pipeline.remote import RETRY_POLICY, RemoteError, Stream, io_timeout, is_url, open_stream
from pipeline.shardformat.tarread import tar_members
from train.data import cache as cache_module

SHARD_POLICY = "shards are not retried or skipped; the run stops; resume with --resume auto"
# Errors that mean "this shard's tar cannot be read": broken tar, or webdataset's ValueError for duplicate
# member names. (Failures of the source itself arrive as pipeline.remote.RemoteError.)
READ_ERRORS = (OSError, tarfile.TarError, ValueError)


class ShardError(UserError):
    """A shard cannot be read (missing, HTTP error, connection cut, truncated): the run stops."""


@dataclass(frozen=True)
class Shard:
    url: str  # local path, http(s):// URL or pipe: command (pipeline.remote.open_stream)
    num_samples: int
    sha256: str = ""  # the manifest's; the streamed bytes must match it ("": not checked)


def train_shards(location: str, manifest: dict[str, Any]) -> list[Shard]:
    """The train split's shards in manifest order (a Position's shard index counts in this list)."""
    return split_shards(location, manifest, "train")


def split_shards(location: str, manifest: dict[str, Any], split: str) -> list[Shard]:
    entries = manifest["splits"][split]["shards"]
    return [Shard(url, entry["num_samples"], entry["sha256"]) for url, entry in
            zip(shard_locations(location, manifest, split), entries, strict=True)]


def shard_error_message(exc: BaseException) -> str | None:
    """The one-line message of a ShardError, also after DataLoader re-raised it from a worker process
    (then its text is "Caught ShardError in DataLoader worker ...", the worker's traceback, and last the
    original "...ShardError: <message>" line). None for any other exception."""
    if not isinstance(exc, ShardError):
        return None
    text = str(exc).strip()
    if "Traceback" not in text:
        return text
    return text.splitlines()[-1].split("ShardError: ", 1)[-1]


def read_shard(shard: Shard) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard ({"__key__", "__url__", suffix: bytes, ...}); any read failure (missing,
    HTTP error, cut, stall), a sample count that differs from the manifest (a tar truncated between
    members), or bytes whose sha256 differs from the manifest's is a ShardError. Read from the source, the
    digest is taken as the bytes stream by, so a mismatch is known once the whole shard has been read (its
    samples are already on their way by then; the run stops). With a cache (train.data.cache) a remote shard
    is read from its local copy, whose bytes were checked before the first sample."""
    cache = cache_module.current() if shard.sha256 and cache_module.is_cached_source(shard.url) else None
    if cache is None:
        try:
            stream = open_stream(shard.url, digest=bool(shard.sha256))
        except RemoteError as e:
            raise ShardError(_unreadable(shard.url, e.reason)) from None
        yield from _samples(shard, stream, check_digest=bool(shard.sha256))
        return
    try:
        with cache.open(shard.url, shard.sha256) as file:
            yield from _samples(shard, Stream(shard.url, file, io_timeout(), digest=False), check_digest=False)
    except ShardError:
        raise
    except RemoteError as e:
        raise ShardError(_unreadable(shard.url, e.reason)) from None
    except UserError as e:  # the cache directory or its locks
        raise ShardError(_unreadable(shard.url, str(e))) from None


def _samples(shard: Shard, stream: Stream, check_digest: bool) -> Iterator[dict[str, Any]]:
    count = 0
    try:
        members = ({"fname": name, "data": data, "__url__": shard.url} for name, data in tar_members(stream))
        for sample in group_by_keys(members):
            count += 1
            yield sample
        digest = stream.finish()  # the rest of the file (tar padding); raises if the source failed
    except GeneratorExit:  # the consumer stopped early on purpose
        stream.abort()
        raise
    except RemoteError as e:
        stream.abort()
        raise ShardError(_unreadable(shard.url, e.reason)) from None
    except READ_ERRORS as e:
        stream.abort()
        raise ShardError(_unreadable(shard.url, _first_line(e))) from None
    if count != shard.num_samples:
        raise ShardError(_unreadable(
            shard.url, f"it holds {count} samples, the manifest says {shard.num_samples} (truncated?)"))
    if check_digest and digest != shard.sha256:
        raise ShardError(_unreadable(shard.url, "its bytes do not match the manifest's sha256 (changed or "
                                                "corrupted since the set was built; check it with "
                                                "`python -m pipeline verify`)"))


def _unreadable(url: str, reason: str) -> str:
    retries = f" ({RETRY_POLICY})" if is_url(url) else ""
    return f"cannot read shard {url}: {reason}; {SHARD_POLICY}{retries}"


def _first_line(error: Exception) -> str:
    """webdataset appends " @ <stream object>" and extra args to messages; keep the readable part."""
    message = str(error.args[0]) if error.args else ""
    if isinstance(error, OSError) and error.strerror:
        message = error.strerror
    return one_line(error, typed=True, text=message.split(" @ ", 1)[0])
