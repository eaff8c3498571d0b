"""The one exception type that means "the user's input is wrong": CLIs print it as one line, no traceback."""


class UserError(Exception):
    """A problem with the user's input or environment, reported as a single line."""
