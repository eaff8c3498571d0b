"""Every shell script of the repository (the Slurm templates, the benchmark and CI scripts) passes
shellcheck with its default checks: an unchecked `cd`, an unquoted expansion or a bashism in a `sh` script
fails here rather than on a cluster. shellcheck is installed when missing (`apt-get`, as root); where it
cannot be, the test is skipped with one line, unless CUBSTREAM_REQUIRE_SHELLCHECK=1, which makes that a
failure."""

from __future__ import annotations

import os
import subprocess

import pytest
from support import ROOT, apt_install

SCRIPTS = sorted([*ROOT.glob("examples/**/*.sbatch"), *ROOT.glob("bench/*.sh"), ROOT / ".ci" / "run"])


def test_shell_scripts_pass_shellcheck() -> None:
    unavailable = apt_install(("shellcheck",), ("shellcheck",))
    if unavailable:
        if os.environ.get("CUBSTREAM_REQUIRE_SHELLCHECK") == "1":
            pytest.fail(f"no shellcheck: {unavailable}")
        pytest.skip(f"no shellcheck: {unavailable}")
    names = {str(path.relative_to(ROOT)) for path in SCRIPTS}
    assert {"examples/slurm/train.sbatch", "examples/slurm/build_shards.sbatch", "bench/gpu_smoke.sh"} <= names
    assert all(path.read_text().startswith("#!") for path in SCRIPTS), SCRIPTS  # shellcheck reads the shell
    result = subprocess.run(["shellcheck", "--format", "gcc", *map(str, SCRIPTS)], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "", result.stdout

