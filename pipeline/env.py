"""Settings read from the environment, so that every process a command starts (pool and DataLoader workers,
curl) sees the same value that its command-line option set."""

from __future__ import annotations

import math
import os

from pipeline.errors import UserError


def positive_number(name: str, option: str, default: float) -> float:
    """The number in environment variable `name` (`default` when unset or blank); a one-line error naming
    the variable and `option` (the flag that sets it) unless it is a finite number > 0."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{option} ({name}) must be a number > 0, got {text!r}")
    return value
