"""Kept for test modules that import from here; everything lives in tests/support.py."""

from support import ONE_THREAD, assert_png, run_main  # noqa: F401
