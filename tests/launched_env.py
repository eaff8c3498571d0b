"""Run by tests/test_configs.py under `accelerate launch`: writes what the launcher handed this process (the
variables that describe the run) to OUT/rank<RANK>.json, and nothing else (no torch import: cheap enough to
start once per process of a full-size launch config)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PREFIXES = ("ACCELERATE_", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

if __name__ == "__main__":
    launched = {key: value for key, value in os.environ.items() if key.startswith(PREFIXES)}
    Path(sys.argv[1], f"rank{os.environ['RANK']}.json").write_text(json.dumps(launched, sort_keys=True))
