"""The Slurm templates in examples/slurm/ run by a real Slurm: slurmctld, and two slurmd on 127.0.0.1 as the
nodes n1 and n2 (2 CPUs each), with munge, all started once for the module in a private directory. Jobs are
submitted with `sbatch` as the README shows, changed only through the templates' environment variables and
the sbatch options the README says to fit to your nodes (CPUs, memory, GPUs; logs into the test's directory):

- the build array, then its afterok merge: the same bytes as one `pipeline build`;
- a task that fails for real (a corrupt image) rerun alone, the merge stuck behind it cancelled and
  resubmitted after the rerun: the same bytes again;
- train.sbatch on 2 nodes x 1 CPU process, then again with USR1 sent to the batch shell mid-epoch the way
  Slurm sends its time-limit warning: every training process on both nodes gets it exactly once, the job
  requeues itself, resumes with --resume auto and ends with the uninterrupted run's weights.

Collecting the module installs Slurm when it is missing (`apt-get install`, as root); where it cannot run,
the module is skipped, unless CUBSTREAM_REQUIRE_SLURM=1 (CI), which makes that a failure. The daemons run on
127.0.0.1 only, on free ports, and are stopped by the module (jobs cancelled first)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import FIT_ARGS
from safetensors.torch import load_file
from support import ROOT, apt_install, free_port, launch_env, run_cli, wait_for

pytestmark = pytest.mark.cluster  # real daemons, jobs and 2-node trainings

SLURM = ROOT / "examples" / "slurm"
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munged")
NODES = ("n1", "n2")
NODE_CPUS = 2
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
JOB_TIMEOUT_S = 120
TAG = "CUBSTREAM_SLURM_TEST"  # in every job's environment, to find (and end) what a job left running

# Every `python -m train` process of a job records each signal it gets, to tell which training processes a
# signal reached and how often: Python writes a signal's number to its wakeup fd whenever a signal arrives for
# which a Python handler is installed (fit's stop handler), whatever the handler then does. This file is put
# first on the jobs' PYTHONPATH as sitecustomize.py; one record file per process, named by node, rank and pid.
PROBE = """import os, signal, sys
argv = sys.orig_argv
if os.environ.get("SIGNAL_PROBE_DIR") and "-m" in argv and argv[argv.index("-m") + 1:][:1] == ["train"]:
    name = f"{os.environ.get('SLURMD_NODENAME')}-rank{os.environ.get('RANK')}-{os.getpid()}.signals"
    fd = os.open(os.path.join(os.environ["SIGNAL_PROBE_DIR"], name),
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK, 0o644)
    signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
"""

# No cgroups, no accounting; every socket on 127.0.0.1 (NoCtldInAddrAny, NoInAddrAny). Quick scheduling: at
# submission (batch_sched_delay=0), and a requeued job, which may start again cred_expire seconds after it
# stopped (default 120), is started by the periodic scheduler pass (sched_interval, default 60 s).
SLURM_CONF = """ClusterName=cubstream-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=batch_sched_delay=0,sched_interval=2
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
NODE_LINE = ("NodeName={name} NodeHostname={name} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} RealMemory=1000 "
             "State=UNKNOWN")


# ---------------------------------------------------------------- the cluster


def _unavailable() -> str:
    """Why no Slurm can run here ("" when it can), after installing its packages when they are missing."""
    if os.geteuid() != 0:
        return "not root (slurmd starts jobs as root, and installing Slurm needs apt-get as root)"
    return apt_install(PACKAGES, COMMANDS)


# Decided when the module is collected, so that a skip is one line (a skip from a fixture is reported once
# per test); CI sets CUBSTREAM_REQUIRE_SLURM=1, and then each test fails instead, naming the reason.
UNAVAILABLE = _unavailable()
if UNAVAILABLE and os.environ.get("CUBSTREAM_REQUIRE_SLURM") != "1":
    pytest.skip(f"no Slurm: {UNAVAILABLE}", allow_module_level=True)


class Cluster:
    """A test cluster in `root`. `env` is the environment of client commands and jobs: SLURM_CONF, no Slurm
    variables of a job this test may run in, and a tag by which cleanup finds what jobs left running."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemons: list[subprocess.Popen] = []
        self.tag = uuid.uuid4().hex
        self.daemon_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
        self.daemon_env["SLURM_CONF"] = str(root / "slurm.conf")
        self.env = {**self.daemon_env, TAG: self.tag}

    def start(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o755)  # munged insists: its socket's directories searchable by all, key private
        key = munge / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        self._daemon("munged", ["munged", "--foreground", f"--socket={munge}/socket", f"--key-file={key}",
                                f"--log-file={munge}/log", f"--pid-file={munge}/pid", f"--seed-file={munge}/seed"])
        wait_for(lambda: (munge / "socket").exists(), 20, f"munged's socket (log: {self._tail(munge / 'log')})")
        nodes = "\n".join(NODE_LINE.format(name=n, port=free_port(), cpus=NODE_CPUS) for n in NODES)
        (self.root / "slurm.conf").write_text(SLURM_CONF.format(ctld_port=free_port(), root=self.root, nodes=nodes))
        for directory in ("state", "spool", "logs"):
            (self.root / directory).mkdir()
        self._daemon("slurmctld", ["slurmctld", "-D"])
        for node in NODES:
            self._daemon(f"slurmd-{node}", ["slurmd", "-D", "-N", node])
        wait_for(lambda: self.idle_nodes() == list(NODES), 30, f"both nodes idle\n{self.daemon_logs()}")

    def _daemon(self, name: str, argv: list[str]) -> None:
        with open(self.root / f"{name}.out", "w") as out:
            self.daemons.append(subprocess.Popen(argv, env=self.daemon_env, stdout=out, stderr=subprocess.STDOUT,
                                                 start_new_session=True))

    def idle_nodes(self) -> list[str]:
        result = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %t"], capture_output=True,
                                text=True, env=self.env)
        for daemon in self.daemons:
            assert daemon.poll() is None, f"{daemon.args[0]} exited with status {daemon.returncode}\n{self.daemon_logs()}"
        return sorted(line.split()[0] for line in result.stdout.splitlines() if line.endswith(" idle"))

    def cancel_all(self, timeout: float = 60) -> None:
        """Every job of the cluster cancelled, and the nodes idle again."""
        subprocess.run(["scancel", "--partition=test"], env=self.env, timeout=30, capture_output=True)
        wait_for(lambda: self.idle_nodes() == list(NODES), timeout, "the nodes to be idle after scancel")

    def stop(self) -> None:
        """Every job cancelled, whatever a job left running ended, every daemon this cluster started ended."""
        with contextlib.suppress(Exception):
            self.cancel_all(timeout=30)
        for process in psutil.process_iter():  # the jobs' processes carry the tag in their environment
            with contextlib.suppress(psutil.Error):
                if process.environ().get(TAG) == self.tag:
                    process.kill()
        for daemon in reversed(self.daemons):  # slurmd, slurmctld, then munged
            daemon.terminate()
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()

    def daemon_logs(self) -> str:
        parts = [f"--- {p.name}:\n{self._tail(p)}" for p in sorted(self.root.glob("*.log")) + sorted(
            self.root.glob("*.out"))]
        return "\n".join(parts)

    @staticmethod
    def _tail(path: Path, size: int = 3000) -> str:
        return path.read_text(errors="replace")[-size:] if path.is_file() else "(none)"

    # ------------------------------------------------------------ jobs

    def sbatch(self, script: Path, *options: str, **env: str) -> str:
        """Submit `script` from the repository root (as the README does) with the job environment + `env`;
        its log goes to this cluster's logs/ (the template's --output name). Returns the job id."""
        (output,) = re.findall(r"^#SBATCH --output=logs/(\S+)$", script.read_text(), re.MULTILINE)
        result = subprocess.run(["sbatch", "--parsable", f"--output={self.root / 'logs' / output}", *options,
                                 str(script)], capture_output=True, text=True, env={**self.env, **env}, cwd=ROOT)
        assert result.returncode == 0, f"sbatch {script.name} {options}: {result.stderr}"
        return result.stdout.strip().split(";")[0]

    def jobs(self, job: str) -> list[dict[str, str]]:
        """`scontrol show job` records of a job (one per array task); [] once Slurm forgot it."""
        result = subprocess.run(["scontrol", "--oneliner", "show", "job", job], capture_output=True, text=True,
                                env=self.env)
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in result.stdout.splitlines() if line.strip()]

    def state(self, job: str) -> str:
        (record,) = self.jobs(job)
        return record["JobState"]

    def log(self, job: str, size: int = 4000) -> str:
        """The output of a job (the end of every array task's: `size` characters each)."""
        paths = sorted({r["StdOut"] for r in self.jobs(job)})
        return "\n".join(f"--- {p}:\n{self._tail(Path(p), size)}" for p in paths)

    def wait_final(self, job: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
        """Until every task of `job` has ended; returns {task id (or job id): final state}."""
        def ended() -> bool:
            records = self.jobs(job)
            return bool(records) and all(r["JobState"] in FINAL_STATES for r in records)
        try:
            wait_for(ended, timeout, f"job {job} to end")
        except AssertionError as e:
            raise AssertionError(f"{e}: {self.jobs(job)}\n{self.log(job)}\n{self.daemon_logs()}") from None
        return {r.get("ArrayTaskId", r["JobId"]): r["JobState"] for r in self.jobs(job)}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if UNAVAILABLE:
        pytest.fail(f"CUBSTREAM_REQUIRE_SLURM=1 but Slurm cannot run here: {UNAVAILABLE}", pytrace=False)
    # Not under pytest's temporary directory: munged refuses a socket whose directories are not searchable
    # by everyone.
    root = Path(tempfile.mkdtemp(prefix="cubstream-slurm-"))
    root.chmod(0o711)
    cluster = Cluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_jobs_left(cluster: Cluster) -> Iterator[None]:
    """A test that fails leaves no job running into the next one."""
    yield
    cluster.cancel_all()


# ---------------------------------------------------------------- regenerating shards

BUILD, MERGE = SLURM / "build_shards.sbatch", SLURM / "merge_shards.sbatch"
BUILD_FIT = ("--cpus-per-task=1", "--mem=200M")  # the array tasks on 2-CPU nodes (the README: fit it)
MERGE_FIT = ("--mem=200M",)


def digests(directory: Path) -> dict[str, str]:
    """sha256 of every file of a shard set (tars and manifest; not the .build state)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def build_options() -> list[str]:
    """The options the template passes to `pipeline build` (those between --out and --num-jobs)."""
    command = BUILD.read_text().replace("\\\n", " ")
    (options,) = re.findall(r'-m pipeline build --source "\$SOURCE" --out "\$OUT" (.*?) --num-jobs ', command)
    assert "$" not in options, options
    return options.split()


def array_size() -> int:
    (last,) = re.findall(r"^#SBATCH --array=0-(\d+)$", BUILD.read_text(), re.MULTILINE)
    return int(last) + 1


def build_env(source: Path, out: Path) -> dict[str, str]:
    return {"PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "SOURCE": str(source), "OUT": str(out)}


@pytest.fixture(scope="module")
def single_build(cub_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One plain `python -m pipeline build` of the synth archive with the template's options."""
    out = tmp_path_factory.mktemp("slurm-single") / "cub"
    result = run_cli("pipeline", "build", "--source", str(cub_source / "CUB_200_2011.tgz"), "--out", str(out),
                     *build_options(), "--quiet")
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.timeout(3 * JOB_TIMEOUT_S)
def test_build_array_then_afterok_merge_equals_single_build(cluster: Cluster, cub_source: Path,
                                                            single_build: Path, tmp_path: Path) -> None:
    """The README's two lines: the array, and the merge queued with afterok on it."""
    out = tmp_path / "cub"
    env = build_env(cub_source / "CUB_200_2011.tgz", out)
    array = cluster.sbatch(BUILD, *BUILD_FIT, **env)
    merge = cluster.sbatch(MERGE, *MERGE_FIT, f"--dependency=afterok:{array}", **env)
    states = cluster.wait_final(array)
    assert states == {str(i): "COMPLETED" for i in range(array_size())}, cluster.log(array)
    assert cluster.wait_final(merge) == {merge: "COMPLETED"}, cluster.log(merge)
    assert "train" in cluster.log(merge)  # inspect's summary
    assert digests(out) == digests(single_build), cluster.log(merge)


@pytest.mark.timeout(3 * JOB_TIMEOUT_S)
def test_failed_task_rerun_alone_and_merge_resubmitted(cluster: Cluster, cub_copy: Path, single_build: Path,
                                                       tmp_path: Path) -> None:
    """One image is corrupt (same size, so the source is the same one) while the array runs: exactly the task
    writing its shard fails and the afterok merge pends for ever. The image repaired, that task is rerun alone
    as the README says, the stuck merge cancelled and submitted again after the rerun: the same bytes."""
    first = cub_copy / "images" / (cub_copy / "images.txt").read_text().split()[1]
    good = first.read_bytes()
    first.write_bytes(bytes(len(good)))
    out = tmp_path / "cub"
    env = build_env(cub_copy, out)
    array = cluster.sbatch(BUILD, *BUILD_FIT, **env)
    merge = cluster.sbatch(MERGE, *MERGE_FIT, f"--dependency=afterok:{array}", **env)
    states = cluster.wait_final(array)
    failed = [task for task, state in states.items() if state != "COMPLETED"]
    assert len(states) == array_size() and len(failed) == 1 and states[failed[0]] == "FAILED", cluster.log(array)
    (task,) = failed
    (record,) = [r for r in cluster.jobs(array) if r["ArrayTaskId"] == task]
    log = Path(record["StdOut"]).read_text()
    assert re.fullmatch(rf"error: 1 bad image\(s\) in \S+: images/{re.escape(first.parent.name)}/"
                        rf"{re.escape(first.name)} \(not an image .*\)\n", log), log

    def stuck() -> bool:
        (job,) = cluster.jobs(merge)
        return (job["JobState"], job["Reason"]) == ("PENDING", "DependencyNeverSatisfied")
    wait_for(stuck, 30, f"merge {merge} pending with DependencyNeverSatisfied: {cluster.jobs(merge)}")
    assert not (out / "manifest.json").exists()

    first.write_bytes(good)
    rerun = cluster.sbatch(BUILD, *BUILD_FIT, f"--array={task}", f"--export=ALL,NUM_JOBS={array_size()}", **env)
    subprocess.run(["scancel", merge], env=cluster.env, check=True)
    merge = cluster.sbatch(MERGE, *MERGE_FIT, f"--dependency=afterok:{rerun}", **env)
    assert cluster.wait_final(rerun) == {task: "COMPLETED"}, cluster.log(rerun)
    assert cluster.wait_final(merge) == {merge: "COMPLETED"}, cluster.log(merge)
    assert digests(out) == digests(single_build), cluster.log(merge)


# ---------------------------------------------------------------- training

TRAIN = SLURM / "train.sbatch"
TRAIN_FIT = ("--gpus-per-node=0", "--cpus-per-task=1", "--mem=200M")  # 1 CPU process on each 2-CPU node
# FIT_ARGS for 1 epoch of 2 processes x 4 images: 66 train samples, 8 steps.
TRAIN_ARGS = (*FIT_ARGS, "--epochs", "1", "--batch-size", "4")
STEPS = 8
STEP_LINE = re.compile(r"^stopped by SIGUSR1 at step (\d+) \(epoch 1\): checkpoint (\S+) written; "
                       r"rerun with --resume auto to continue$", re.MULTILINE)


def submit_training(cluster: Cluster, shards: Path, tmp: Path) -> tuple[str, Path, Path]:
    """train.sbatch on both nodes; returns the job id, its run directory and its signal records' directory."""
    probe, signals = tmp / "probe", tmp / "signals"
    probe.mkdir()
    signals.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)
    run_dir = tmp / "run"
    env = launch_env(tmp, PYTHON=sys.executable, PYTHONPATH=f"{probe}:{ROOT}", SIGNAL_PROBE_DIR=str(signals),
                     SHARDS=str(shards), RUN_DIR=str(run_dir), CONFIG="configs/demo.yaml",
                     EXTRA_ARGS=" ".join(TRAIN_ARGS), MAIN_PROCESS_PORT=str(free_port()))
    return cluster.sbatch(TRAIN, "--nodes=2", *TRAIN_FIT, **env), run_dir, signals


def signals_by_process(directory: Path) -> dict[str, list[int]]:
    """{"n1-rank0-PID": the stop signals that process got, in order}, over every training process of a job."""
    return {p.stem: [b for b in p.read_bytes() if b in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)]
            for p in sorted(directory.glob("*.signals"))}


def excerpt(log: str) -> str:
    """The start and the end of a long log, for an assertion message."""
    return log if len(log) < 8000 else f"{log[:3000]}\n[...]\n{log[-5000:]}"


def steps(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "step"]


@pytest.fixture(scope="module")
def uninterrupted(cluster: Cluster, train_shards: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[str, Path, Path]:
    tmp = tmp_path_factory.mktemp("slurm-train")
    job, run_dir, signals = submit_training(cluster, train_shards, tmp)
    cluster.wait_final(job, 2 * JOB_TIMEOUT_S)
    return job, run_dir, signals


@pytest.mark.timeout(3 * JOB_TIMEOUT_S)
def test_train_on_two_nodes(cluster: Cluster, uninterrupted: tuple[str, Path, Path]) -> None:
    """One CPU process on each node (rank 0 on n1, rank 1 on n2), to the end, without a requeue."""
    job, run_dir, signals = uninterrupted
    (record,) = cluster.jobs(job)
    log = cluster.log(job, size=1 << 20)
    shown = excerpt(log)
    assert (record["JobState"], record["Restarts"], record["NodeList"]) == ("COMPLETED", "0", "n[1-2]"), shown
    assert [name.rsplit("-", 1)[0] for name in signals_by_process(signals)] == ["n1-rank0", "n2-rank1"], shown
    assert set(map(tuple, signals_by_process(signals).values())) == {()}, shown
    assert log.count("test (best epoch 1): top1") == 1 and "training exited with status 0" in log, shown
    assert [s for s, _ in steps(run_dir)] == list(range(1, STEPS + 1)), shown
    assert json.loads((run_dir / "results.json").read_text())["test"]["num_samples"] == 72


@pytest.mark.timeout(5 * JOB_TIMEOUT_S)
def test_usr1_to_the_batch_shell_requeues_and_resumes(cluster: Cluster, train_shards: Path,
                                                      uninterrupted: tuple[str, Path, Path], tmp_path: Path) -> None:
    """USR1 to the batch shell alone (what --signal=B:USR1@300 does before the time limit) while the first
    epoch runs: the script passes it once to every training process on both nodes; they stop at one step with
    a checkpoint, the job requeues itself (same id), resumes with --resume auto and ends with the weights and
    results of the uninterrupted run."""
    job, run_dir, signals = submit_training(cluster, train_shards, tmp_path)
    metrics = run_dir / "metrics.jsonl"

    def stepped() -> bool:
        return metrics.is_file() and '"kind": "step"' in metrics.read_text()
    wait_for(lambda: stepped() or cluster.jobs(job)[0]["JobState"] in FINAL_STATES, 2 * JOB_TIMEOUT_S,
             f"a training step of job {job}\n{cluster.log(job)}")
    assert stepped(), f"job {job} ended before its first step\n{cluster.log(job)}"
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster.env, check=True)
    cluster.wait_final(job, 2 * JOB_TIMEOUT_S)  # a requeued job is pending, then running again, meanwhile
    (record,) = cluster.jobs(job)
    log = cluster.log(job, size=1 << 20)
    shown = excerpt(log)
    assert (record["JobState"], record["Restarts"]) == ("COMPLETED", "1"), shown

    got = signals_by_process(signals)  # both runs' processes: the stopped ones got USR1 once, and nothing else
    assert len(got) == 4 and sorted(map(tuple, got.values())) == [(), (), (signal.SIGUSR1,), (signal.SIGUSR1,)], (
        f"stop signals per training process: {got}\n{shown}")
    assert sorted(name.rsplit("-", 1)[0] for name, sig in got.items() if sig) == ["n1-rank0", "n2-rank1"], got
    assert log.count("got SIGUSR1") == 1 and "got SIGTERM" not in log, shown  # the batch shell
    stops = STEP_LINE.findall(log)
    assert len(stops) == 1, shown
    step = int(stops[0][0])
    assert 0 < step < STEPS, shown  # mid-epoch
    assert log.count(f"requeueing job {job}:") == 1, shown
    assert f"resuming {run_dir} from step-{step:08d} (epoch 1, step {step})" in log, shown
    assert log.rstrip().endswith("training exited with status 0"), shown

    _, reference, _ = uninterrupted
    assert steps(run_dir) == steps(reference)
    ours, theirs = (load_file(str(d / "checkpoints" / "best" / "model.safetensors")) for d in (run_dir, reference))
    assert ours.keys() == theirs.keys() and len(ours) > 50
    diff = max((ours[k].double() - theirs[k].double()).abs().max().item() for k in ours)
    assert diff <= 1e-6, diff
    results = [json.loads((d / "results.json").read_text()) for d in (run_dir, reference)]
    assert _close(results[0], results[1]), results


def _close(a: object, b: object) -> bool:
    """Equal JSON values, numbers within 1e-6."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, float | int) and isinstance(b, float | int):
        return abs(a - b) <= 1e-6
    return a == b
