"""pipeline.errors: every exception turned into the one line of an error message the same way (one_line), and
that line written whole (print_error)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from pipeline.errors import one_line, print_error


def test_first_non_blank_line_whitespace_collapsed() -> None:
    error = ValueError("\n  cannot  read\tthis \nsecond line with advice")
    assert one_line(error) == "cannot read this"
    assert one_line(error, typed=True) == "ValueError: cannot read this"


def test_no_text_is_the_type_name() -> None:
    assert one_line(KeyError()) == "KeyError"
    assert one_line(RuntimeError(" \n "), typed=True) == "RuntimeError"


def test_first_sentence_and_limit() -> None:
    error = RuntimeError("Weights only load failed. Re-running with weights_only=False will work.\nmore")
    assert one_line(error, typed=True, sentence=True) == "RuntimeError: Weights only load failed"
    long = one_line(OSError("x" * 500), limit=50)
    assert len(long) == 50 and long.endswith("...")


def test_a_cleaned_text_replaces_the_message() -> None:
    error = ValueError("bad header @ <stream object at 0x1>", "url")
    assert one_line(error, typed=True, text="bad header") == "ValueError: bad header"


def test_an_error_line_is_one_write_so_processes_sharing_stderr_never_interleave(tmp_path: Path) -> None:
    """The ranks of a launch share one stderr: two forked writers, released together, of 5,000 lines each on
    one unbuffered (write-through) stream as `python -u` has, still give 10,000 whole lines."""
    path, lines = tmp_path / "stderr", 5000
    read, write = os.pipe()
    with open(path, "wb", buffering=0) as raw:
        stream = io.TextIOWrapper(raw, write_through=True)
        children = []
        for who in ("a", "b"):
            pid = os.fork()
            if pid == 0:
                os.read(read, 1)  # both start when the test releases them
                for i in range(lines):
                    print_error(f"rank {who} line {i}", stream)
                os._exit(0)
            children.append(pid)
        os.write(write, b"go")
        assert [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children] == [0, 0]
    os.close(read)
    os.close(write)
    written = path.read_text().splitlines()
    assert sorted(written) == sorted(f"error: rank {who} line {i}" for who in "ab" for i in range(lines))
