"""One shard's tar written while its samples are still being encoded: a thread appends each sample's bytes
to the temporary file, hashes them and syncs them to disk every SYNC_EVERY bytes, so writing, hashing and
flushing overlap the encoding instead of following it (with `--resize-short 0` the encoding is a bare
decode, and a whole-shard write + fsync at the end weighed ~10% of a worker's time). The bytes are exactly
`tar_bytes` of the same members.

The file goes to `.NAME.tmp-PID` and is renamed by `rename()` only once `finish()` synced it, so a tar under
its final name is always complete; `discard()` (or leaving a `with` block by an exception) removes it.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from pathlib import Path

from pipeline.errors import UserError
from pipeline.files import remove_quietly, temporary_name
from pipeline.shardformat import Sample
from pipeline.shardformat.tarwrite import end_of_archive, member_chunks

SYNC_EVERY = 1 << 20  # bytes written between two fdatasync calls of the writer thread
QUEUE_SAMPLES = 64  # samples encoded ahead of the writer at most (bounds the memory they hold)


class ShardFile:
    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = temporary_name(final)
        try:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise _cannot_write(final, e) from None
        self.size = 0  # bytes handed to the writer so far (end-of-archive padding excluded)
        self.hash = hashlib.sha256()
        self.error: OSError | None = None
        self.closed = False
        self.queue: queue.Queue[tuple[bytes, ...] | None] = queue.Queue(QUEUE_SAMPLES)
        self.thread = threading.Thread(target=self._write, name=f"write {final.name}", daemon=True)
        self.thread.start()

    def add(self, sample: Sample) -> None:
        """Append one sample's members (written in the background)."""
        chunks = tuple(chunk for name, payload in sample.members() for chunk in member_chunks(name, payload))
        self.size += sum(map(len, chunks))
        self.queue.put(chunks)

    def finish(self) -> tuple[int, str]:
        """End the archive, wait for the writer, sync: (bytes, sha256) of the complete temporary file."""
        tail = end_of_archive(self.size)
        self.queue.put((tail,))
        self._stop()
        try:
            if self.error is not None:
                raise self.error
            os.fsync(self.fd)
        except OSError as e:
            raise _cannot_write(self.final, e) from None
        finally:
            self._close()
        return self.size + len(tail), self.hash.hexdigest()

    def rename(self) -> None:
        """Give the finished file its final name."""
        try:
            os.replace(self.tmp, self.final)
        except OSError as e:
            raise _cannot_write(self.final, e) from None

    def discard(self) -> None:
        """Stop writing and remove the temporary (nothing left that could look like a shard)."""
        self._stop()
        self._close()
        remove_quietly(self.tmp)

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is not None or self.tmp.exists():  # failed, or never renamed
            self.discard()

    def _write(self) -> None:
        unsynced = 0
        while (chunks := self.queue.get()) is not None:
            if self.error is not None:
                continue  # keep draining, so that add() never blocks on a full queue
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(self.fd, view):]
                    self.hash.update(chunk)
                    unsynced += len(chunk)
                if unsynced >= SYNC_EVERY:
                    os.fdatasync(self.fd)
                    unsynced = 0
            except OSError as e:
                self.error = e

    def _stop(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


def _cannot_write(final: Path, error: OSError) -> UserError:
    """One line naming the shard and the reason (a full disk, a quota), as every failed write says it."""
    return UserError(f"{final}: cannot write ({error.strerror or error})")
