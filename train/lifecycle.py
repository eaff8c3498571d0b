"""A fit run's life in its run directory: claiming it (lock, where to start, how many steps are left, the
global batch a resume keeps), run.json and config.yaml, the progress saved in every checkpoint, and
loading a checkpoint back into every process."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from pipeline.errors import UserError, one_line
from train import checkpoint, data, rundir
from train.config import Config, to_dict
from train.config import save as save_config
from train.data import elastic, trainstream
from train.data.topology import Topology
from train.data.trainstream import TrainStream
from train.metrics import TOTALS_KEYS, Totals
from train.optim import reschedule
from train.tracking import say


def batches_per_epoch(accelerator: Accelerator, manifest: dict[str, Any], config: Config) -> int:
    """Train batches each process runs per epoch; a one-line error when one global batch does not fit."""
    return data.train_batches_per_epoch(manifest["splits"]["train"]["num_samples"], config.batch_size,
                                        accelerator.num_processes)


@dataclass
class Progress:
    """Where training stands besides its stream (TrainStream) and the epoch's sums (Totals): saved in every
    checkpoint's trainer.json."""

    global_step: int = 0
    best_loss: float = math.inf
    best_epoch: int = -1
    best_valid: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        return cls(**{key: value for key, value in state.items() if key in cls.__dataclass_fields__})


# What trainer.json must hold to resume from it: each owner's keys (older checkpoints lack some of the
# stream's later ones, see TrainStream).
TRAINER_KEYS = (*trainstream.REQUIRED_KEYS, *Progress.__dataclass_fields__, *TOTALS_KEYS)


def trainer_state(progress: Progress, stream: TrainStream, totals: Totals) -> dict[str, Any]:
    """trainer.json: each owner's state as it gives it (their keys do not overlap)."""
    return {**progress.state_dict(), **stream.state_dict(), **totals.state_dict()}


def epoch_steps(accelerator: Accelerator, manifest: dict[str, Any], config: Config) -> int:
    """Optimizer steps per epoch (the same in every process)."""
    batches = batches_per_epoch(accelerator, manifest, config)
    if batches // config.grad_accum < 1:
        raise UserError(f"--grad-accum {config.grad_accum} exceeds the {batches} batches of an epoch")
    return batches // config.grad_accum


def begin(held: contextlib.ExitStack, accelerator: Accelerator, config: Config,
          manifest: dict[str, Any]) -> tuple[Config, dict[str, Any], int]:
    """Every process: the main process claims the run directory (the lock stays in `held`) and every process
    takes its decisions; returns the config with them, how the run starts and the optimizer steps per epoch."""
    steps_per_epoch = epoch_steps(accelerator, manifest, config)
    start = on_main(accelerator, lambda: claim_run_dir(held, config, manifest, steps_per_epoch,
                                                       accelerator.num_processes))
    # a resumed run keeps its checkpoint's global batch: the main process may have chosen another
    config = dataclasses.replace(config, lr=start["lr"], grad_accum=start["grad_accum"])
    accelerator.gradient_accumulation_steps = config.grad_accum
    return config, start, epoch_steps(accelerator, manifest, config)


def on_main(accelerator: Accelerator, decide: Any) -> dict[str, Any]:
    """Run `decide` in the main process only and hand its result (or its one-line error) to every process."""
    from accelerate.utils import broadcast_object_list

    outcome: dict[str, Any] = {}
    failure: BaseException | None = None
    if accelerator.is_main_process:
        try:
            outcome = decide()
        except UserError as e:
            outcome = {"error": str(e)}
        except BaseException as e:  # a bug: the main process shows its traceback, the others stop too
            outcome, failure = {"error": f"the main process failed ({type(e).__name__}: {e})"}, e
    outcome = broadcast_object_list([outcome])[0]
    if failure is not None:
        raise failure
    if "error" in outcome:
        raise UserError(outcome["error"])
    return outcome


def claim_run_dir(held: contextlib.ExitStack, config: Config, manifest: dict[str, Any], steps_per_epoch: int,
                  world: int) -> dict[str, Any]:
    """Main process: lock the run directory (stale temporaries go), decide how the run starts (the LR a
    resumed --lr auto run chose, the global batch a resume keeps) and write run.json: all before any
    training. config.yaml is record_config's."""
    run_dir = Path(config.run_dir)
    held.enter_context(rundir.locked(run_dir))
    config = rundir.resolve_auto_lr(config)
    start = rundir.resume_point(config, manifest, TRAINER_KEYS)
    for warning in start.skipped:
        print(warning, file=sys.stderr)
    remaining = config.epochs * steps_per_epoch
    saved = None
    if start.checkpoint is not None:
        saved = elastic.saved_topology(start.state, {**to_dict(config), **(rundir.read_saved_config(run_dir) or {})})
        grad_accum, line = elastic.keep_global_batch(saved, world, config.batch_size, config.grad_accum,
                                                     start.checkpoint.name)
        config = dataclasses.replace(config, grad_accum=grad_accum)
        if line:
            print(line, flush=True)
            steps_per_epoch = data.train_batches_per_epoch(manifest["splits"]["train"]["num_samples"],
                                                           config.batch_size, world) // config.grad_accum
        remaining = steps_left(start, config, steps_per_epoch)
    renew_best = _best_lost(run_dir, start)
    try:
        info = rundir.write_run_info(config, manifest, resuming=start.checkpoint is not None)
        if remaining > 0:  # results of an earlier ending would not describe this run
            (run_dir / "results.json").unlink(missing_ok=True)
        if start.checkpoint is None:  # written by record_config; until then no config of another run stands
            (run_dir / "config.yaml").unlink(missing_ok=True)
    except OSError as e:
        raise _cannot_write(e, run_dir) from None
    return {"lr": config.lr, "checkpoint": start.checkpoint and str(start.checkpoint), "state": start.state,
            "wandb_id": info["wandb_id"], "grad_accum": config.grad_accum,
            "saved_topology": saved and dataclasses.asdict(saved), "renew_best": renew_best}


def _best_lost(run_dir: Path, start: rundir.Start) -> bool:
    """Whether the checkpoint resumed from had a best model that is now missing or damaged; if so, says in
    one line how the best model is chosen again (engine.renew_best): the epochs before are gone."""
    if start.checkpoint is None or start.state.get("best_epoch", -1) < 1:
        return False
    problem = checkpoint.best_problem(run_dir)
    if problem is None:
        return False
    epoch, name = start.state["epoch"], start.checkpoint.name
    how = (f"{name}'s model (end of epoch {epoch}) is validated now as the best so far"
           if not start.state["step_in_epoch"] else f"the best model is chosen from epoch {epoch + 1} on")
    print(f"warning: {problem}: the models of earlier epochs are gone, so {how}", file=sys.stderr, flush=True)
    return True


def record_config(accelerator: Accelerator, config: Config) -> None:
    """config.yaml, written once per run by the main process, atomically, once the config is complete: after
    the claim, and with --lr auto after lr-find has chosen the LR, so it always says what the run follows (a
    resume compares itself with it and reuses its LR). A failure is the same one line in every process."""
    if config.lr == "auto":
        raise ValueError("record_config needs the LR that lr-find chose")
    run_dir = Path(config.run_dir)

    def write() -> dict[str, Any]:
        try:
            save_config(config, run_dir / "config.yaml")
        except OSError as e:
            raise _cannot_write(e, run_dir) from None
        return {}

    on_main(accelerator, write)


def _cannot_write(error: OSError, run_dir: Path) -> UserError:
    return UserError(f"cannot write {error.filename or run_dir}: {error.strerror or error}")


def steps_left(start: rundir.Start, config: Config, steps_per_epoch: int) -> int:
    """Optimizer steps the resumed run has still to do; refuses a checkpoint this run cannot continue."""
    state, name = start.state, start.checkpoint
    if state["step_in_epoch"] and state.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        raise UserError(f"{name} was saved mid-epoch with {state['steps_per_epoch']} steps per epoch, now "
                        f"{steps_per_epoch}; resume with the same shard set, or from an epoch-end checkpoint")
    remaining = (config.epochs - state["epoch"]) * steps_per_epoch - state["step_in_epoch"]
    if remaining < 0:
        least = state["epoch"] + (1 if state["step_in_epoch"] else 0)
        raise UserError(f"cannot resume {config.run_dir} with --epochs {config.epochs}: {name.name} is at step "
                        f"{state['global_step']}, in epoch {state['epoch'] + 1}; --epochs must be at least {least}")
    return remaining


def resume(accelerator: Accelerator, where: Path, state: dict[str, Any], scheduler: Any, config: Config,
           steps_per_epoch: int, saved: Topology) -> tuple[Progress, TrainStream]:
    """Load a checkpoint into every process; a run whose length changed (--epochs, or steps per epoch) gets
    its LR schedule rebuilt to end at its new last step, continuous at this one. `saved`: the topology that
    wrote the checkpoint; under another one, the epoch in progress records the change (TrainStream)."""
    try:
        accelerator.load_state(str(where))
    except Exception as e:  # unpickling damaged bytes raises almost any type (UnpicklingError, KeyError, ...)
        reason = one_line(e, typed=True, sentence=True)
        raise UserError(f"cannot load checkpoint {where} ({reason}): remove it to resume from "
                        "the one before, or train in another --run-dir") from None
    progress = Progress.from_state(state)
    now = topology(accelerator, config)
    stream = TrainStream.from_state(state, saved, now, steps_per_epoch)
    if now != saved:  # the accumulation counter of the ranks of this topology, at a step boundary
        accelerator.step = progress.global_step * config.grad_accum
    say(accelerator, f"resuming {config.run_dir} from {where.name} (epoch {stream.epoch + 1}, "
                     f"step {progress.global_step})")
    total = progress.global_step + (config.epochs - stream.epoch) * steps_per_epoch - stream.step_in_epoch
    if total > progress.global_step and total != scheduler.total_steps:
        say(accelerator, f"the LR schedule now ends at step {total} instead of {scheduler.total_steps}, "
                         f"continuing from its LR at step {progress.global_step}")
        reschedule(scheduler, total)
    return progress, stream


def topology(accelerator: Accelerator, config: Config) -> Topology:
    """This run's process topology."""
    return Topology(accelerator.num_processes, config.workers, config.batch_size, config.grad_accum,
                    config.shuffle_buffer)
