"""Run a function over jobs in a pool of forked worker processes (or in-process for one worker)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from typing import Any


class mapped:  # lower case: used like a function, in a `with` statement
    """Context manager yielding fn(job) for each job in order, from a process pool or in-process. On leaving,
    `after(pids)` gets the pids of the pool's workers, which are then gone (terminated if still busy)."""

    def __init__(self, fn: Any, jobs: list[Any], workers: int, after: Callable[[list[int]], None] | None = None) -> None:
        self.fn, self.jobs, self.workers, self.after, self.pool = fn, jobs, workers, after, None

    def __enter__(self) -> Iterator[Any]:
        if self.workers <= 1 or len(self.jobs) < 2:
            return map(self.fn, self.jobs)
        # fork: workers start in milliseconds (spawn re-imports every module in each worker); they only read
        # files, run PIL and write tars, so they need no thread pool of the parent.
        self.pool = multiprocessing.get_context("fork").Pool(min(self.workers, len(self.jobs)))
        return self.pool.imap(self.fn, self.jobs, chunksize=1)

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            pids = [worker.pid for worker in self.pool._pool]  # noqa: SLF001 - the only way to name them
            self.pool.terminate()
            self.pool.join()
            if self.after is not None:
                self.after(pids)
