"""pipeline.errors.one_line: every exception turned into the one line of an error message the same way."""

from __future__ import annotations

from pipeline.errors import one_line


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
