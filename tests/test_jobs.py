"""Regenerating shard sets on a cluster: the Slurm array script and the Kubernetes Indexed Job in examples/
are parsed, their `pipeline build --num-jobs J --job-index I` commands run as J concurrent processes, then
their `pipeline merge`; the result equals one single build byte for byte. A regeneration with other options
goes into a new directory next to the old set, and a `fit` reading the old set meanwhile is undisturbed."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import procs
import pytest
import yaml
from conftest import FIT_ARGS
from support import ROOT, launch_env

from pipeline.manifest import load_manifest
from train.rundir import shard_set_id

pytestmark = pytest.mark.slow  # concurrent processes

SLURM_BUILD = ROOT / "examples" / "slurm" / "build_shards.sbatch"
SLURM_MERGE = ROOT / "examples" / "slurm" / "merge_shards.sbatch"
K8S_BUILD = ROOT / "examples" / "k8s" / "build-shards-job.yaml"
K8S_MERGE = ROOT / "examples" / "k8s" / "merge-shards-job.yaml"
JOB_TIMEOUT_S = 180


def digests(directory: Path) -> dict[str, str]:
    """sha256 of every file of a shard set (tars and manifest; not the .build state)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def bash_env(tmp: Path, **extra: str) -> dict[str, str]:
    return launch_env(tmp, PYTHON=sys.executable, SLURM_SUBMIT_DIR=str(ROOT), **extra)


@pytest.fixture(scope="module")
def single_build(cub_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Slurm build script run as one job of one (`--num-jobs 1` builds and merges: a plain build)."""
    tmp = tmp_path_factory.mktemp("single")
    out = tmp / "cub"
    env = bash_env(tmp, SOURCE=str(cub_source / "CUB_200_2011.tgz"), OUT=str(out), SLURM_ARRAY_TASK_COUNT="1",
                   SLURM_ARRAY_TASK_ID="0", SLURM_CPUS_PER_TASK="1")
    with procs.group(tmp / "logs") as group:
        group.start("build", ["bash", str(SLURM_BUILD)], env)
        assert group.finish(JOB_TIMEOUT_S) == [0], group.output("build")
    assert (out / "manifest.json").is_file()
    return out


@pytest.mark.timeout(3 * JOB_TIMEOUT_S)
def test_slurm_array_equals_single_build(cub_source: Path, single_build: Path, tmp_path: Path) -> None:
    script = SLURM_BUILD.read_text()
    (array,) = re.findall(r"^#SBATCH --array=0-(\d+)\s*$", script, re.MULTILINE)
    num_jobs = int(array) + 1
    (command,) = [line for line in script.replace("\\\n", " ").splitlines() if "-m pipeline build" in line
                  and not line.startswith("#")]  # continuation lines joined
    assert re.search(r'-m pipeline build .*--num-jobs "\$SLURM_ARRAY_TASK_COUNT" --job-index '
                     r'"\$SLURM_ARRAY_TASK_ID"', command), command
    assert re.search(r'^"\$PYTHON" -m pipeline merge "\$OUT"$', SLURM_MERGE.read_text(), re.MULTILINE)
    assert "--dependency=afterok" in script  # how the merge is chained after the array

    out = tmp_path / "cub"
    common = {"SOURCE": str(cub_source / "CUB_200_2011.tgz"), "OUT": str(out), "SLURM_CPUS_PER_TASK": "1"}
    with procs.group(tmp_path / "logs") as group:  # the array: every task at once, as Slurm may run them
        for index in range(num_jobs):
            group.start(f"task{index}", ["bash", str(SLURM_BUILD)], bash_env(
                tmp_path, SLURM_ARRAY_TASK_COUNT=str(num_jobs), SLURM_ARRAY_TASK_ID=str(index), **common))
        codes = group.finish(JOB_TIMEOUT_S)
        assert codes == [0] * num_jobs, [group.output(n)[-1000:] for n in group.names]
        assert not (out / "manifest.json").exists()  # not complete before the merge
        group.start("merge", ["bash", str(SLURM_MERGE)], bash_env(tmp_path, **common))
        assert group.finish(JOB_TIMEOUT_S)[-1] == 0, group.output("merge")
    assert digests(out) == digests(single_build)
    shards = [s["name"] for split in load_manifest(str(out))["splits"].values() for s in split["shards"]]
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(shards)
    assert len(shards) == 3  # 160-sample shards of 60 images: one per split, so most jobs had none to write


def _k8s_expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command/args from the container's env ($$ escapes)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def _container(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    (job,) = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
    return job, container


def _local(argv: list[str], mounts: dict[str, Path]) -> list[str]:
    """The container's paths mapped to local directories (mountPath -> test directory)."""
    mapped = []
    for arg in argv:
        for mount in sorted(mounts, key=len, reverse=True):  # the innermost mount; one mapping per argument
            if arg == mount or arg.startswith(mount + "/"):
                arg = str(mounts[mount]) + arg[len(mount):]
                break
        mapped.append(arg)
    return mapped


@pytest.mark.timeout(3 * JOB_TIMEOUT_S)
def test_kubernetes_indexed_job_equals_single_build(cub_source: Path, single_build: Path, tmp_path: Path) -> None:
    job, container = _container(K8S_BUILD)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    argv = container.get("command", []) + container.get("args", [])
    assert argv[:4] == ["python", "-m", "pipeline", "build"], argv
    num_jobs = int(argv[argv.index("--num-jobs") + 1])
    assert spec["completions"] == num_jobs and 1 <= spec.get("parallelism", num_jobs) <= num_jobs
    index_var = re.fullmatch(r"\$\((\w+)\)", argv[argv.index("--job-index") + 1]).group(1)
    (index_env,) = [e for e in container["env"] if e["name"] == index_var]
    assert index_env["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    _, merge_container = _container(K8S_MERGE)
    merge_argv = merge_container.get("command", []) + merge_container.get("args", [])
    assert merge_argv[:4] == ["python", "-m", "pipeline", "merge"]
    assert merge_argv[4] == argv[argv.index("--out") + 1]  # merges what the build wrote

    data, shards = tmp_path / "data", tmp_path / "shards"
    data.mkdir()
    source = argv[argv.index("--source") + 1]
    (data / Path(source).name).symlink_to(cub_source / "CUB_200_2011.tgz")
    mounts = {m["mountPath"]: {"data": data, "shards": shards}.get(m["name"], tmp_path / m["name"])
              for m in container["volumeMounts"]}
    env = launch_env(tmp_path)
    with procs.group(tmp_path / "logs") as group:  # every pod at once; `--workers 1` last: 2 cores here
        for index in range(num_jobs):
            pod = [_k8s_expand(a, {index_var: str(index)}) for a in _local(argv, mounts)]
            group.start(f"pod{index}", [sys.executable, *pod[1:], "--workers", "1"], env)
        codes = group.finish(JOB_TIMEOUT_S)
        assert codes == [0] * num_jobs, [group.output(n)[-1000:] for n in group.names]
        group.start("merge", [sys.executable, *_local(merge_argv, mounts)[1:]], env)
        assert group.finish(JOB_TIMEOUT_S)[-1] == 0, group.output("merge")
    assert digests(Path(_local([merge_argv[4]], mounts)[0])) == digests(single_build)


@pytest.mark.timeout(300)
def test_regeneration_next_to_a_set_in_training(train_shards: Path, tmp_path: Path) -> None:
    old = Path(shutil.copytree(train_shards, tmp_path / "shards" / "cub_r48"))
    new = tmp_path / "shards" / "cub_r40_q80"
    before = digests(old)
    run_dir = tmp_path / "run"
    env = launch_env(tmp_path)
    fit = [sys.executable, "-m", "train", "fit", "--shards", str(old), *FIT_ARGS, "--epochs", "1", "--workers", "2",
           "--run-dir", str(run_dir)]
    build = [sys.executable, "-m", "pipeline", "build", "--source", str(train_shards.parent / "CUB_200_2011"),
             "--out", str(new), "--resize-short", "40", "--quality", "80", "--shard-samples", "8", "--workers", "1",
             "--quiet"]
    with procs.group(tmp_path / "logs") as group:
        training = group.start("fit", fit, env)
        deadline = time.monotonic() + 120
        metrics = run_dir / "metrics.jsonl"
        while time.monotonic() < deadline and training.poll() is None and not (
                metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.05)
        assert training.poll() is None, group.output("fit")[-3000:]  # training is under way...
        builder = group.start("build", build, env)  # ...while the new set is written next to it
        builder.wait(timeout=JOB_TIMEOUT_S)
        assert builder.returncode == 0, group.output("build")
        assert training.poll() is None or training.returncode == 0
        assert group.finish(JOB_TIMEOUT_S) == [0, 0], group.output("fit")[-3000:]
    assert digests(old) == before  # not one byte of the old set changed
    assert sorted(p.name for p in old.iterdir()) == sorted([*before, ".build"])
    assert load_manifest(str(new))["options"]["quality"] == 80
    assert shard_set_id(load_manifest(str(new))) != shard_set_id(load_manifest(str(old)))
    info = json.loads((run_dir / "run.json").read_text())
    assert info["shard_set"] == shard_set_id(load_manifest(str(old)))  # the run trained on the old set only
    assert (run_dir / "results.json").is_file()
