"""The one exception type that means "the user's input is wrong": CLIs print it as one line, no traceback."""

import sys
from collections.abc import Callable
from typing import TextIO


class UserError(Exception):
    """A problem with the user's input or environment, reported as a single line."""


def one_line(error: BaseException, *, typed: bool = False, sentence: bool = False, limit: int = 200,
             text: str | None = None) -> str:
    """An exception as one line for a message: the first non-blank line of its text (or of `text`, a caller's
    cleaned-up version of it), whitespace collapsed, cut to `limit` characters; its type's name when there is
    no text. `typed`: "Type: text". `sentence`: only the first sentence (torch.load's errors go on with advice
    that does not apply here, such as retrying with weights_only=False)."""
    lines = (str(error) if text is None else text).splitlines()
    text = next((" ".join(line.split()) for line in lines if line.strip()), "")
    if sentence:
        text = text.split(". ", 1)[0].rstrip(".")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text}" if typed else text


def print_error(line: str, file: TextIO | None = None) -> None:
    """`error: LINE` and its newline in one write, flushed: the processes of a launch share one stderr, and
    `print` writes the text and the newline separately, so two ranks' lines could interleave into one."""
    file = sys.stderr if file is None else file
    file.write(f"error: {line}\n")
    file.flush()


def report_errors(command: Callable[[], int]) -> int:
    """Run a CLI command; a UserError or Ctrl-C becomes one `error:` line on stderr and an exit status."""
    try:
        return command()
    except UserError as e:
        print_error(str(e))
        return 1
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
