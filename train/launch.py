"""`python -m train.launch [accelerate launch options] -m train fit ...`: `accelerate launch`, made safe to
stop from a scheduler or a terminal.

- The signals a scheduler or a terminal sends to stop a job (TERM, INT, HUP, USR1, USR2), sent to this
  process or to its process group, reach every training process of this machine exactly once, and this
  process waits for them to exit. A plain `accelerate launch` (torchrun inside) starts the training processes
  in sessions of their own, out of its group's reach; it passes on only TERM, INT, HUP and QUIT and kills the
  processes 30 s later, and USR1 kills it outright (its processes notice within a second and stop: see
  train.stopping).
- It exits with the training processes' own status (75 after a stop, 2 for a bad option, 128 + N for a
  process killed by signal N), where `accelerate launch` exits 1 for any failed process and 128 + N for a
  signal it got itself. Job controllers (a Kubernetes podFailurePolicy, a requeue rule) can then act on it.

One process (no --multi_gpu) is started by exec: this process becomes the training process itself, which
handles its signals and exit status on its own. QUIT keeps torchrun's handling. Not for a Slurm step: srun
signals every process of the step itself, so each would get the signal twice (examples/slurm/train.sbatch
runs `accelerate launch` with USR1 ignored)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator

import psutil

from pipeline.errors import print_error

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# torchrun installs a handler for each signal of this list when it starts the processes, replacing ours:
# it is given only the one we leave to it (read from the environment by its option parser).
TORCHRUN_SIGNALS = {"PET_SIGNALS_TO_HANDLE": "SIGQUIT"}


def exit_status(returncode: int) -> int:
    """A process's return code as a shell reports it: 128 + N for a process that signal N ended."""
    return 128 - returncode if returncode < 0 else returncode


def _forward(signum: int, frame: object) -> None:
    """Pass the signal to the training processes, this process's children (torchrun starts no others, from
    the main thread, where this handler runs: none is half-started now). With none started yet, exit as a
    shell reports a process that signal killed (raising the signal would do nothing in a container's PID 1)."""
    ranks = psutil.Process().children()
    if not ranks:
        sys.stdout.flush()
        os._exit(128 + signum)
    for rank in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            rank.send_signal(signum)


@contextlib.contextmanager
def forwarding() -> Iterator[None]:
    previous = {sig: signal.signal(sig, _forward) for sig in FORWARDED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_torchrun(args: argparse.Namespace) -> int:
    """accelerate's multi-process launch with the signals forwarded; the first failed process's status."""
    from accelerate.commands.launch import multi_gpu_launcher
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.update(TORCHRUN_SIGNALS)
    if args.debug:  # the processes' debug mode, set here: accelerate's --debug also makes it exit 1 on a failure
        os.environ["ACCELERATE_DEBUG_MODE"] = "true"
    args.quiet = args.debug = False  # --quiet too: it only changes how accelerate reports a failure
    with forwarding():
        try:
            multi_gpu_launcher(args)
        except ChildFailedError as failed:
            return exit_status(failed.get_first_failure()[1].exitcode)
    return 0


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import ComputeEnvironment, prepare_simple_launcher_cmd_env

    parser = launch_command_parser()
    parser.prog = "python -m train.launch"
    args = parser.parse_args(argv)
    try:
        args, defaults, _ = _validate_launch_command(args)
    except ValueError as e:
        print_error(str(e))
        return 2
    # the choice of accelerate's launch_command, for the launches this module supports
    if not args.cpu and (args.use_deepspeed or args.tpu) or (
            defaults is not None and defaults.compute_environment == ComputeEnvironment.AMAZON_SAGEMAKER):
        print_error("python -m train.launch starts CPU and GPU processes (torchrun); for DeepSpeed, TPU or "
                    "SageMaker use accelerate launch")
        return 2
    if not args.cpu and (args.multi_gpu or args.use_fsdp or args.use_megatron_lm):
        return run_torchrun(args)
    command, env = prepare_simple_launcher_cmd_env(args)
    sys.stdout.flush()
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    sys.exit(main())
