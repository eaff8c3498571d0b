"""Regenerating shard sets on a cluster: the Slurm array script and the Kubernetes Indexed Job in examples/
are parsed, their `pipeline build --num-jobs J --job-index I` commands run as J concurrent processes, then
their `pipeline merge`; the result equals one single build byte for byte. A regeneration with other options
goes into a new directory next to the old set, and a `fit` reading the old set meanwhile is undisturbed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
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

pytestmark = pytest.mark.cluster  # concurrent processes

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
def test_slurm_array_with_a_failed_task_rerun_alone_equals_single_build(cub_source: Path, single_build: Path,
                                                                         tmp_path: Path) -> None:
    """The array as written, every task at once; task 0 fails (its source is missing), so the merge refuses;
    task 0 rerun alone as `sbatch --array=0 --export=ALL,NUM_JOBS=J` (a one-task array: COUNT=1), then the
    merge: the set equals one single build byte for byte."""
    script = SLURM_BUILD.read_text()
    (array,) = re.findall(r"^#SBATCH --array=0-(\d+)\s*$", script, re.MULTILINE)
    num_jobs = int(array) + 1
    (command,) = [line for line in script.replace("\\\n", " ").splitlines() if "-m pipeline build" in line
                  and not line.startswith("#")]  # continuation lines joined
    assert re.search(r'-m pipeline build .*--num-jobs "\$\{NUM_JOBS:-\$SLURM_ARRAY_TASK_COUNT\}" --job-index '
                     r'"\$SLURM_ARRAY_TASK_ID"', command), command
    assert re.search(r'^"\$PYTHON" -m pipeline merge "\$OUT"$', SLURM_MERGE.read_text(), re.MULTILINE)
    assert "--dependency=afterok" in script  # how the merge is chained after the array
    assert f"--array=I --export=ALL,NUM_JOBS={num_jobs} " in script  # the documented rerun of one task
    for path in (SLURM_BUILD, SLURM_MERGE):  # logs/ exists in a checkout: Slurm opens --output before the script
        (output,) = re.findall(r"^#SBATCH --output=(\S+)$", path.read_text(), re.MULTILINE)
        assert output.startswith("logs/") and (ROOT / "logs").is_dir(), output
    assert (ROOT / "logs" / ".gitkeep").is_file()

    out = tmp_path / "cub"
    common = {"SOURCE": str(cub_source / "CUB_200_2011.tgz"), "OUT": str(out), "SLURM_CPUS_PER_TASK": "1"}
    with procs.group(tmp_path / "logs") as group:  # the array: every task at once, as Slurm may run them
        for index in range(num_jobs):
            task = {**common, "SOURCE": str(tmp_path / "missing.tgz")} if index == 0 else common
            group.start(f"task{index}", ["bash", str(SLURM_BUILD)], bash_env(
                tmp_path, SLURM_ARRAY_TASK_COUNT=str(num_jobs), SLURM_ARRAY_TASK_ID=str(index), **task))
        codes = group.finish(JOB_TIMEOUT_S)
        assert codes[0] != 0 and codes[1:] == [0] * (num_jobs - 1), [group.output(n)[-1000:] for n in group.names]
        assert not (out / "manifest.json").exists()  # not complete before the merge
        group.start("merge", ["bash", str(SLURM_MERGE)], bash_env(tmp_path, **common))
        assert group.finish(JOB_TIMEOUT_S)[-1] != 0  # job 0's part is missing
        assert not (out / "manifest.json").exists()
        group.start("rerun", ["bash", str(SLURM_BUILD)], bash_env(  # sbatch --array=0 --export=ALL,NUM_JOBS=J
            tmp_path, SLURM_ARRAY_TASK_COUNT="1", SLURM_ARRAY_TASK_ID="0", NUM_JOBS=str(num_jobs), **common))
        assert group.finish(JOB_TIMEOUT_S)[-1] == 0, group.output("rerun")
        assert not (out / "manifest.json").exists()  # job 0 of J only, not a whole build of its own
        group.start("merge2", ["bash", str(SLURM_MERGE)], bash_env(tmp_path, **common))
        assert group.finish(JOB_TIMEOUT_S)[-1] == 0, group.output("merge2")
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
    fit = ["train", "fit", "--shards", str(old), *FIT_ARGS, "--epochs", "1", "--workers", "2", "--run-dir", str(run_dir)]
    build = [sys.executable, "-m", "pipeline", "build", "--source", str(train_shards.parent / "CUB_200_2011"),
             "--out", str(new), "--resize-short", "40", "--quality", "80", "--shard-samples", "8", "--workers", "1",
             "--quiet"]
    with procs.group(tmp_path / "logs") as group:
        training = group.start_warm("fit", fit, env)
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


SLURM_TRAIN = ROOT / "examples" / "slurm" / "train.sbatch"
# Stand-ins for the scheduler and the launcher: they record the command lines train.sbatch builds. srun runs
# its command once per node (SLURM_NODEID, each in its own process group) and passes a USR1 it receives to
# every process of every node, as slurmstepd does; the launcher waits for a "training process" that exits
# with 75 on USR1 and reports its failure as 1, as accelerate launch does.
FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$REC/srun.args"
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i setsid "${@: -3}" & pids+=($!); done
trap 'for p in "${pids[@]}"; do kill -s USR1 -- "-$p"; done' USR1
status=0
for p in "${pids[@]}"; do
    while :; do wait "$p"; s=$?; kill -0 "$p" 2>/dev/null || break; done
    if [ "$s" -gt "$status" ]; then status=$s; fi
done
exit "$status"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
    "show hostnames") [ "$3" = "gpu-[a17,b03]" ] && printf 'gpu-a17\\ngpu-b03\\n' ;;  # else fails
    "show node") printf 'NodeName=%s Arch=x86_64 CoresPerSocket=16\\n   NodeAddr=10.0.0.%s NodeHostName=%s\\n' \\
        "$3" "${3#gpu-?}" "$3" ;;
    "requeue "*) echo "$2" >> "$REC/requeue" ;;
esac
"""
FAKE_NVIDIA_SMI = """#!/bin/bash
for ((i = 0; i < FAKE_GPUS; i++)); do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; done
"""
FAKE_LAUNCHER = """#!/bin/bash
printf '%s\\n' "$@" > "$REC/node$SLURM_NODEID.args"
echo "${ACCELERATE_USE_CPU:-}" > "$REC/node$SLURM_NODEID.cpu"
case "$FAKE_MODE" in
    exit:*) exit "${FAKE_MODE#exit:}" ;;
    stop) "$REAL_PYTHON" -c "$TRAINER" "$REC/ready$SLURM_NODEID" & wait $!; s=$?
          echo "$s" > "$REC/node$SLURM_NODEID.trainer"; [ "$s" -eq 0 ] || exit 1 ;;
esac
"""
FAKE_TRAINER = """import pathlib, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))
pathlib.Path(sys.argv[1]).touch()
time.sleep(60)
"""


def _train_job(tmp: Path, nodes: int, mode: str, **extra: str) -> tuple[subprocess.Popen, Path]:
    """train.sbatch's body run by bash as the batch script of job 4242 on `nodes` nodes."""
    fake, rec = tmp / "bin", tmp / "rec"
    for directory in (fake, rec):
        directory.mkdir(parents=True, exist_ok=True)
    for name, text in {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL, "nvidia-smi": FAKE_NVIDIA_SMI,
                       "launcher": FAKE_LAUNCHER}.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "REC": str(rec), "SLURM_JOB_ID": "4242",
           "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": "gpu-[a17,b03]", "SLURM_SUBMIT_DIR": str(tmp),
           "PYTHON": str(fake / "launcher"), "REAL_PYTHON": sys.executable, "TRAINER": FAKE_TRAINER,
           "FAKE_MODE": mode, "FAKE_GPUS": "0", **extra}
    return subprocess.Popen(["bash", str(SLURM_TRAIN)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True), rec


def _launch(nodes: int, procs: int, precision: str, rank: int, tail: list[str], port: str = "29500") -> list[str]:
    multi = ["--multi_gpu"] if nodes * procs > 1 else []
    return ["-m", "accelerate.commands.launch", "--num_machines", str(nodes), "--main_process_port", port,
            "--dynamo_backend", "no", "--main_process_ip", "10.0.0.17", "--mixed_precision", precision, *multi,
            "--num_processes", str(nodes * procs), "--machine_rank", str(rank), "-m", "train", "fit", *tail]


@pytest.mark.timeout(120)
def test_slurm_train_command_lines_and_requeue_on_status_75(tmp_path: Path) -> None:
    """Per row: the launch command of every node, CPU or GPU (rank 0 at the NodeAddr of the allocation's
    first node), and whether the job requeued itself: on status 75 only (not 0, not 1)."""
    script = SLURM_TRAIN.read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --output=logs/%x-%j.out"):
        assert re.search(f"^{re.escape(line)}$", script, re.MULTILINE), line
    base = ["--config", "configs/cub_resnet50_224.yaml", "--shards", "shards/cub_r256", "--run-dir",
            "runs/cub-train-4242", "--resume", "auto"]
    rows = [  # nodes, mode, env, processes per node, precision, cpu, expected status, requeued
        (2, "exit:0", {"FAKE_GPUS": "4"}, 4, "bf16", "", 0, False),
        (2, "exit:75", {"MAIN_PROCESS_PORT": "29611", "EXTRA_ARGS": "--epochs 3  --batch-size 8"}, 1, "no",
         "true", 75, True),
        (2, "exit:1", {"FAKE_GPUS": "4", "PROCS_PER_NODE": "2", "SHARDS": "s", "RUN_DIR": "r", "CONFIG": "c"},
         2, "bf16", "", 1, False),
        (1, "exit:75", {}, 1, "no", "true", 75, True),
    ]
    for index, (nodes, mode, env, procs_per_node, precision, cpu, status, requeued) in enumerate(rows):
        job, rec = _train_job(tmp_path / f"row{index}", nodes, mode, **env)
        output, _ = job.communicate(timeout=60)
        assert job.returncode == status, (index, output)
        tail = base + env.get("EXTRA_ARGS", "").split()
        if "SHARDS" in env:
            tail = ["--config", "c", "--shards", "s", "--run-dir", "r", "--resume", "auto"]
        port = env.get("MAIN_PROCESS_PORT", "29500")
        for rank in range(nodes):
            argv = (rec / f"node{rank}.args").read_text().splitlines()
            assert argv == _launch(nodes, procs_per_node, precision, rank, tail, port), (index, argv)
            assert (rec / f"node{rank}.cpu").read_text().strip() == cpu, index
        assert (rec / "srun.args").read_text().splitlines()[:2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
        assert (rec / "requeue").read_text().splitlines() == ["4242"] if requeued else not (rec / "requeue").exists()


@pytest.mark.timeout(120)
def test_slurm_train_stops_at_a_failed_setup_step(tmp_path: Path) -> None:
    """A submit directory that is gone, or scontrol failing on a node list: the job fails before anything is
    launched."""
    for name, extra in (("cd", {"SLURM_SUBMIT_DIR": str(tmp_path / "gone")}),
                        ("scontrol", {"SLURM_JOB_NODELIST": "gpu-x"})):
        job, rec = _train_job(tmp_path / name, 2, "exit:0", **extra)
        output, _ = job.communicate(timeout=60)
        assert job.returncode != 0 and not (rec / "srun.args").exists(), (name, job.returncode, output)


@pytest.mark.timeout(120)
def test_slurm_train_usr1_reaches_every_node_then_requeues(tmp_path: Path) -> None:
    """USR1 to the batch script (Slurm's warning before the time limit): every node's training process gets
    it once and exits 75 while its launcher survives (it ignores USR1) and reports 1; the job requeues."""
    job, rec = _train_job(tmp_path, 2, "stop")
    deadline = time.monotonic() + 60
    while not all((rec / f"ready{n}").exists() for n in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.poll() is None, job.communicate()[0]
    job.send_signal(signal.SIGUSR1)
    output, _ = job.communicate(timeout=60)
    assert [(rec / f"node{n}.trainer").read_text().strip() for n in (0, 1)] == ["75", "75"], output
    assert job.returncode == 1, output
    assert (rec / "requeue").read_text().splitlines() == ["4242"], output


K8S_TRAIN = ROOT / "examples" / "k8s" / "train-job.yaml"


def _claims(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """mountPath -> the PersistentVolumeClaim mounted there."""
    volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}


def test_kubernetes_training_job(tmp_path: Path) -> None:
    """The Indexed Job's pods find rank 0 through the headless Service, each passes its completion index as
    --machine_rank, resumes with --resume auto, survives disruptions and status 75 without using up its
    retries, and reads the shard set the build Job writes; both parsers accept the command."""
    from accelerate.commands.launch import launch_command_parser

    from train import config as cfgmod
    from train.__main__ import build_parser

    service, job = [doc for doc in yaml.safe_load_all(K8S_TRAIN.read_text()) if doc]
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = container["command"] + container.get("args", [])
    assert argv[:3] == ["python", "-m", "train.launch"] and pod["subdomain"] == service["metadata"]["name"]
    split = argv.index("-m", 3)  # the launcher's options end at the training module
    rank_var = re.fullmatch(r"\$\((\w+)\)", argv[argv.index("--machine_rank") + 1]).group(1)
    (rank_env,) = [e for e in container["env"] if e["name"] == rank_var]
    assert rank_env["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    pod1 = [_k8s_expand(a, {rank_var: "1"}) for a in argv[3:split]]  # as Kubernetes runs it in pod 1
    launch = launch_command_parser().parse_args([*pod1, "--", "train"])
    assert launch.machine_rank == 1
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == launch.num_machines
    assert launch.num_processes == launch.num_machines * container["resources"]["limits"]["nvidia.com/gpu"]
    assert launch.multi_gpu and launch.main_process_ip == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert [p["port"] for p in service["spec"]["ports"]] == [launch.main_process_port]

    fit = argv[split + 1:]
    assert fit[:2] == ["train", "fit"] and fit[-2:] == ["--resume", "auto"]
    args = build_parser().parse_args([a if a != "configs/cub_resnet50_224.yaml" else str(ROOT / a) for a in fit[1:]])
    config = cfgmod.make_config(args)
    assert cfgmod.check(config) == [] and config.resume == "auto"
    claims = _claims(pod, container)
    assert claims[str(Path(config.run_dir).parent)] == "cub-runs"  # every pod's checkpoint parts in one place
    build_job, build = _container(K8S_BUILD)
    build_argv = build["command"]
    built = build_argv[build_argv.index("--out") + 1]
    assert config.shards == built  # trains on what the build Job wrote, through the same claim
    assert claims[str(Path(built).parent)] == _claims(build_job["spec"]["template"]["spec"], build)["/shards"]

    assert pod["restartPolicy"] == "Never"  # podFailurePolicy needs it; the Job replaces a failed pod
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    assert {"action": "Ignore", "onExitCodes": {"containerName": "train", "operator": "In", "values": [75]}} in rules
    assert spec["backoffLimit"] >= 1
    assert pod["terminationGracePeriodSeconds"] > config.stop_grace  # the launcher waits for the stop
