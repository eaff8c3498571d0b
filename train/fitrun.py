"""What one fit run's loops share (`FitRun`) and how a run is set up from where it starts: the LR schedule,
the moving average of the weights, the progress, the stream and the epoch's sums a checkpoint gave back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from train import augment, ema, lifecycle
from train.config import Config
from train.data.topology import Topology
from train.data.trainstream import TrainStream
from train.lifecycle import Progress
from train.metrics import Totals
from train.optim import build_scheduler
from train.tracking import MetricsLog


@dataclass
class FitRun:
    """The run's parts and where it stands: its progress (steps, the best model), its stream (position and
    topology) and, until the first epoch reads them, the resumed epoch's sums."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: Any  # prepared by the accelerator
    scheduler: Any  # stepped once per optimizer step, registered for checkpointing
    averaged: Any  # the EMA of the weights (ema.create), or None
    config: Config
    manifest: dict[str, Any]
    progress: Progress
    stream: TrainStream
    log: MetricsLog
    steps_per_epoch: int
    run_dir: Path
    resumed_totals: dict[str, Any] | None = None  # a Totals.state_dict for the epoch in progress

    def epoch_totals(self) -> Totals:
        """This process's sums for the epoch in progress: the resumed checkpoint's in the main process
        (all ranks' sums before it), once; zero otherwise."""
        totals = Totals(self.accelerator.device)
        if self.resumed_totals is not None and self.accelerator.is_main_process:
            totals.load_state_dict(self.resumed_totals)
        self.resumed_totals = None
        return totals

    def trainer_state(self, totals: Totals) -> dict[str, Any]:
        """What a checkpoint saved now carries as trainer.json."""
        return lifecycle.trainer_state(self.progress, self.stream, totals)


def open_stream(accelerator: Accelerator, manifest: dict[str, Any], config: Config, stream: TrainStream,
                epochs: int) -> TrainStream:
    """`stream` started for `epochs` epochs with fit's train augmentation: what fit and lr-find both read.
    Close it to stop its workers."""
    transform = augment.Augment(augment.train_transform(config.augment, config.image_size, tuple(config.crop_scale)))
    return stream.open(config.shards, manifest, transform=transform, seed=config.seed, rank=accelerator.process_index,
                       epochs=epochs)


def start(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, config: Config,
          manifest: dict[str, Any], begun: dict[str, Any], steps_per_epoch: int) -> FitRun:
    """The run from `begun` (lifecycle.begin) on: fresh, or loaded from its checkpoint into every process."""
    run_dir = Path(config.run_dir)
    scheduler = build_scheduler(optimizer.optimizer, config.epochs * steps_per_epoch, config.pct_start,
                                config.div_factor, config.final_div_factor)  # the unwrapped optimizer
    accelerator.register_for_checkpointing(scheduler)  # stepped by us once per optimizer step, never prepared
    averaged = ema.create(accelerator, model, config.ema_decay)  # registered second: ema.EMA_STATE
    progress, resumed = Progress(), None
    stream = TrainStream(lifecycle.topology(accelerator, config), steps_per_epoch)
    if begun["checkpoint"] is not None:
        progress, stream = lifecycle.resume(accelerator, Path(begun["checkpoint"]), begun["state"], scheduler,
                                            config, steps_per_epoch, Topology(**begun["saved_topology"]))
        resumed = begun["state"]
    log = MetricsLog(accelerator, run_dir / "metrics.jsonl", progress.global_step if begun["checkpoint"] else None)
    return FitRun(accelerator, model, optimizer, scheduler, averaged, config, manifest, progress, stream, log,
                  steps_per_epoch, run_dir, resumed)
