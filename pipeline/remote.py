"""Reading one file of a shard set, wherever it lives: a local path, an http(s) URL (read by curl) or a
`pipe:COMMAND` (run by the shell, printing the file). The manifest, `verify`, `inspect` and the trainer's
shard streams all open files here, so they share one stall timeout, one retry policy and one way of
saying what went wrong: a RemoteError, one line naming the path, URL or command.

Stall timeout: IO_TIMEOUT_ENV seconds (default DEFAULT_IO_TIMEOUT_S; `--io-timeout` and the `io_timeout`
option set the variable, so DataLoader workers and subprocesses inherit it). For http(s), curl gives up on
a transfer that moves less than STALL_BYTES_PER_S for that long; a `pipe:` command that prints nothing for
that long is killed.

Retries (http(s), by curl; RETRY_POLICY says it in words): HTTP 408/429/5xx answers and connect timeouts
are retried 2 s apart until the stall timeout has passed since the first try. A stall is never retried:
it is only detected once the timeout has passed, and a retry could not take back the bytes the first try
already delivered (curl would write the file again after them). A 404, a refused connection or a
connection cut mid-file fail at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import select
import signal
import subprocess
import tempfile
from typing import BinaryIO

from pipeline.env import positive_number
from pipeline.errors import UserError

IO_TIMEOUT_ENV = "CUBSTREAM_IO_TIMEOUT"
DEFAULT_IO_TIMEOUT_S = 60.0
STALL_BYTES_PER_S = 1024  # slower than this for the whole timeout counts as a stall
RETRY_DELAY_S = 2
MAX_RETRIES = 30
RETRY_POLICY = ("curl retries only timeouts while connecting and HTTP 408/429/5xx, 2 s apart, until the I/O "
                f"timeout ({IO_TIMEOUT_ENV}, default {DEFAULT_IO_TIMEOUT_S:g} s) has passed since the first "
                "try; a stall is not retried")
CHUNK = 1 << 20
CURL_EXIT = {
    6: "unreachable (host not found)",
    7: "unreachable (connection refused)",
    18: "transfer cut short",
    22: "HTTP error status",
    28: "timed out",
    35: "TLS handshake failed",
    52: "empty reply from server",
    56: "connection reset",
}


class RemoteError(UserError):
    """A file of a shard set cannot be read; `reason` is the part after its name."""

    def __init__(self, target: str, reason: str) -> None:
        super().__init__(f"{target}: {reason}")
        self.target = target
        self.reason = reason


def io_timeout() -> float:
    """The stall timeout in seconds, from IO_TIMEOUT_ENV (else the default)."""
    return positive_number(IO_TIMEOUT_ENV, "--io-timeout", DEFAULT_IO_TIMEOUT_S)


def set_io_timeout(seconds: float | None) -> None:
    """Make `seconds` the stall timeout of this process and of every process it starts (None: leave it)."""
    if seconds is None:
        return
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"--io-timeout must be a number of seconds > 0, got {seconds:g}")
    os.environ[IO_TIMEOUT_ENV] = f"{seconds:g}"


def is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def is_pipe(target: str) -> bool:
    """A `pipe:COMMAND` location: COMMAND with `{}` where the file name goes prints that file to stdout."""
    return target.startswith("pipe:")


def read_all(target: str) -> bytes:
    """The whole file; RemoteError with one line if it cannot be read."""
    with open_stream(target) as stream:
        return stream.read()


def open_stream(target: str, digest: bool = False) -> Stream:
    """A binary stream of the file at `target` (path, http(s) URL or `pipe:COMMAND`). With `digest`, the
    stream hashes every byte it delivers and `finish()` returns the sha256."""
    timeout = io_timeout()
    if is_pipe(target):
        return Stream(target, _start(target, target[len("pipe:"):], shell=True), timeout, digest)
    if is_url(target):
        return Stream(target, _start(target, _curl_command(target, timeout), shell=False), timeout, digest,
                      curl=True)
    try:
        return Stream(target, open(target, "rb", buffering=0), timeout, digest)  # noqa: SIM115 - Stream closes it
    except FileNotFoundError:
        raise RemoteError(target, "no such file") from None
    except OSError as e:
        raise RemoteError(target, e.strerror or str(e)) from None


def _curl_command(url: str, timeout: float) -> list[str]:
    whole = str(max(1, math.ceil(timeout)))  # options that take whole seconds
    return ["curl", "-f", "-s", "-S", "-L", "--connect-timeout", f"{min(timeout, 30):g}",
            "--speed-limit", str(STALL_BYTES_PER_S), "--speed-time", whole,
            "--retry", str(MAX_RETRIES), "--retry-delay", str(RETRY_DELAY_S), "--retry-max-time", whole,
            "--", url]


def _start(target: str, command: str | list[str], shell: bool) -> subprocess.Popen:
    """The process writing the file to its stdout; stderr goes to a file (a chatty command cannot block
    on a full pipe), kept for the error message."""
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by Stream
    try:
        process = subprocess.Popen(command, shell=shell, stdout=subprocess.PIPE, stderr=stderr,
                                   stdin=subprocess.DEVNULL,
                                   start_new_session=True)  # its own process group: abort() stops a pipeline
    except OSError as e:
        stderr.close()
        program = "the shell" if shell else command[0]
        raise RemoteError(target, f"cannot start {program} ({e.strerror}); is it installed?") from None
    process.stderr_file = stderr
    return process


class Stream:
    """The bytes of one file, read in chunks from a local file or a process's stdout.

    `read(n)` raises RemoteError as soon as the source fails (the process exits non-zero, or stalls);
    `finish()` reads what is left (so the digest covers the whole file and the exit status is final) and
    returns the sha256 (or ""); `abort()` stops early without checks. As a context manager it finishes,
    or aborts when the block raised.
    """

    def __init__(self, target: str, source: BinaryIO | subprocess.Popen, timeout: float, digest: bool,
                 curl: bool = False) -> None:
        self.target = target
        self.timeout = timeout
        self.curl = curl
        self.process = source if isinstance(source, subprocess.Popen) else None
        self.fd = (source.stdout if self.process else source).fileno()
        self.file = None if self.process else source
        self.hash = hashlib.sha256() if digest else None
        self.buffer = b""
        self.position = 0
        self.eof = False

    # ------------------------------------------------------------ reading

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = [self.buffer[self.position:]]
            self.buffer, self.position = b"", 0
            while chunk := self._fill():
                parts.append(chunk)
            return b"".join(parts)
        if self.position + size <= len(self.buffer):
            self.position += size
            return self.buffer[self.position - size:self.position]
        parts = [self.buffer[self.position:]]
        wanted = size - len(parts[0])
        self.buffer, self.position = b"", 0
        while wanted > 0:
            chunk = self._fill()
            if not chunk:
                break
            if len(chunk) > wanted:
                self.buffer, self.position = chunk, wanted
                chunk = chunk[:wanted]
            parts.append(chunk)
            wanted -= len(chunk)
        return b"".join(parts)

    def _fill(self) -> bytes:
        """The next chunk of the source, b"" at its end; RemoteError if the source failed or stalled."""
        if self.eof:
            return b""
        if self.process is not None and not self.curl:
            self._wait_readable()  # curl watches its own transfer speed
        try:
            chunk = os.read(self.fd, CHUNK)
        except OSError as e:
            self.abort()
            raise RemoteError(self.target, e.strerror or str(e)) from None
        if not chunk:
            self.eof = True
            self._check_exit()
        elif self.hash is not None:
            self.hash.update(chunk)
        return chunk

    def _wait_readable(self) -> None:
        poller = select.poll()  # not select(): it fails on descriptors numbered 1024 and up
        poller.register(self.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        if not poller.poll(self.timeout * 1000):
            self.abort()
            raise RemoteError(self.target, f"stalled: no data for {self.timeout:g} s ({IO_TIMEOUT_ENV} sets the "
                                           "limit); the command was stopped")

    def _check_exit(self) -> None:
        if self.process is None:
            return
        try:
            status = self.process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.abort()
            raise RemoteError(self.target, f"the command closed its output but did not exit within "
                                           f"{self.timeout:g} s; stopped it") from None
        if status != 0:
            reason = self._failure(status)
            self._close()
            raise RemoteError(self.target, reason)

    def _failure(self, status: int) -> str:
        detail = _last_line(self._stderr())
        if status < 0:
            return f"killed by signal {-status}" + (f" ({detail})" if detail else "")
        if not self.curl:
            return f"exit status {status}" + (f" ({detail})" if detail else "")
        return f"curl exit {status}: {_curl_reason(status, detail, self.timeout)}"

    def _stderr(self) -> str:
        stderr = self.process.stderr_file if self.process is not None else None
        if stderr is None:
            return ""
        stderr.seek(0)
        return stderr.read()[-4000:].decode(errors="replace")

    # ------------------------------------------------------------ ending

    def finish(self) -> str:
        """Read to the end; RemoteError if the source failed. Returns the sha256 of every byte ("" without
        `digest`)."""
        while self._fill():
            pass
        self._close()
        return self.hash.hexdigest() if self.hash is not None else ""

    def abort(self) -> None:
        """Stop reading now: the process (and what it started) is killed; no error, no check."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):  # it has exited already
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._close()

    def _close(self) -> None:
        self.eof = True
        if self.process is not None:
            self.process.stdout.close()
            self.process.stderr_file.close()
        elif self.file is not None:
            self.file.close()

    def close(self) -> None:
        self.abort()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            self.finish()
        else:
            self.abort()

    def __del__(self) -> None:
        if getattr(self, "process", None) is not None and self.process.returncode is None:
            self.abort()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _curl_reason(status: int, detail: str, timeout: float) -> str:
    if status == 22:
        code = re.search(r"error: (\d{3})", detail)
        return f"HTTP {code.group(1)}" if code else CURL_EXIT[22]
    if status == 28 and "too slow" in detail.lower():
        return (f"stalled: less than {STALL_BYTES_PER_S} bytes/s for {math.ceil(timeout)} s "
                f"({IO_TIMEOUT_ENV} sets the limit)")
    meaning = CURL_EXIT.get(status, "transfer failed")
    detail = re.sub(r"^curl: \(\d+\) ", "", detail)
    return f"{meaning} ({detail})" if detail else meaning
