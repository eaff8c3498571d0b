"""A debug record of the train samples `fit` consumes, for checking resumes sample by sample.

With CUBSTREAM_RECORD_KEYS=PATH set, every process appends one JSON line per train batch it trains on to
PATH.rank<N>.jsonl: {"epoch": 1-based epoch, "step": the optimizer step the batch counts towards, "rank": N,
"keys": [sample keys]}, flushed line by line (a killed run leaves whole lines). Off when unset.
"""

from __future__ import annotations

import json
import os
from types import TracebackType

ENV = "CUBSTREAM_RECORD_KEYS"


class KeyLog:
    """One process's record file (nothing when CUBSTREAM_RECORD_KEYS is unset); a context manager."""

    def __init__(self, rank: int) -> None:
        path = os.environ.get(ENV)
        self.rank = rank
        self.file = open(f"{path}.rank{rank}.jsonl", "a") if path else None  # noqa: SIM115 (closed by __exit__)

    def write(self, epoch: int, step: int, keys: list[str]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"epoch": epoch, "step": step, "rank": self.rank, "keys": list(keys)}) + "\n")
            self.file.flush()

    def __enter__(self) -> KeyLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.file is not None:
            self.file.close()
