"""The one exception type that means "the user's input is wrong": CLIs print it as one line, no traceback."""

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input or environment, reported as a single line."""


def report_errors(command: Callable[[], int]) -> int:
    """Run a CLI command; a UserError or Ctrl-C becomes one `error:` line on stderr and an exit status."""
    try:
        return command()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
