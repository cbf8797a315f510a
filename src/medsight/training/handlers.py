"""What happens around the training loop, one handler per concern: best weights and early
stopping, the resumable checkpoint, ``history.csv``, the experiment logger, a per-epoch
callback, and the events a user sees.

The loop (:func:`medsight.training.trainer.train`) only trains and validates; after each batch,
each epoch, and at the start and end of training it calls every handler's hook, in list order,
with the :class:`Engine` (MONAI's engines and handlers work the same way). A new behaviour —
a time budget, another logger — is a new handler, not a change to the loop::

    class StopAfter(Handler):
        def __init__(self, seconds): self.deadline = time.monotonic() + seconds
        def on_epoch_end(self, engine, row):
            engine.stop = engine.stop or time.monotonic() > self.deadline
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from medsight import runs
from medsight.events import (
    EarlyStopped,
    EpochEnd,
    Interrupted,
    ProgressAdvance,
    ProgressEnd,
    ProgressStart,
    Reporter,
    Resumed,
    TrainingEnd,
)
from medsight.training.loggers import EpochLogger, create_logger
from medsight.training.optim import Schedule

#: Where the checkpoint of the last finished epoch is kept, inside the run directory.
LAST_CHECKPOINT = Path(runs.CHECKPOINTS) / "last.pt"


@dataclass
class TrainState:
    """Where training stands; the checkpoint restores it together with the weights."""

    epoch: int = 0  # the last finished epoch
    best_score: float = -math.inf  # the monitored score, higher is better
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one
    history: list[dict] = field(default_factory=list)  # one history.csv row per epoch


@dataclass
class Engine:
    """What handlers see: the objects being trained and where training stands."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule | None
    scaler: torch.amp.GradScaler
    out: Path  # the run directory
    epochs: int
    steps: int  # batches per epoch
    state: TrainState = field(default_factory=TrainState)
    resumed: bool = False  # set by Checkpoint when it restored a stopped run
    epoch: int = 0  # the epoch running
    batch: int = 0  # batches done in it
    loss: float = math.nan  # their mean training loss
    score: float = math.nan  # the finished epoch's monitored score, higher is better
    stop: bool = False  # a handler asks the loop to end after this epoch
    stopped_early: bool = False  # ... because the monitored score stopped improving


class Handler:
    """Hooks the loop calls; each does nothing unless a handler overrides it."""

    def on_fit_start(self, engine: Engine) -> None:
        """Before the first epoch (of this call: a resumed run starts after its last one)."""

    def on_batch_end(self, engine: Engine) -> None:
        """After each optimiser step."""

    def on_epoch_end(self, engine: Engine, row: dict) -> None:
        """After validation; ``row`` is the epoch's history row, already in ``engine.state``."""

    def on_fit_end(self, engine: Engine, error: BaseException | None) -> None:
        """Always, last: ``error`` is what ended training early (an interrupt, a failure, an
        exception from a callback), None when it ran to its end or stopped early."""


class EarlyStopping(Handler):
    """Save the weights of the best epoch (``model.safetensors``) and stop after ``patience``
    epochs without improvement of the monitored score."""

    def __init__(self, weights: Path, patience: int):
        self.weights, self.patience = Path(weights), patience

    def on_epoch_end(self, engine: Engine, row: dict) -> None:
        state = engine.state
        if engine.score > state.best_score:
            state.best_score, state.best_epoch, state.bad_epochs = engine.score, state.epoch, 0
            runs.save_weights(self.weights, engine.model.state_dict())
        else:
            state.bad_epochs += 1
        if state.bad_epochs >= self.patience:
            engine.stop = engine.stopped_early = True


class Checkpoint(Handler):
    """Write ``checkpoints/last.pt`` atomically after every epoch (weights, optimiser, schedule,
    gradient scaler, :class:`TrainState`); with ``resume``, restore it before the first epoch.

    Together with the per-epoch seeds of the loop, this makes a resumed run end with the same
    weights as an uninterrupted one.
    """

    def __init__(self, path: Path, *, resume: bool = False, map_location=None):
        self.path, self.resume, self.map_location = Path(path), resume, map_location

    def on_fit_start(self, engine: Engine) -> None:
        if not self.resume:
            return
        saved = torch.load(self.path, map_location=self.map_location, weights_only=False)
        engine.model.load_state_dict(saved["model"])
        engine.optimizer.load_state_dict(saved["optimizer"])
        if engine.schedule is not None and saved.get("scheduler") is not None:
            engine.schedule.load_state_dict(saved["scheduler"])
        engine.scaler.load_state_dict(saved["scaler"])
        engine.state = TrainState(**saved["state"])
        engine.resumed = True

    def on_epoch_end(self, engine: Engine, row: dict) -> None:
        payload = {
            "model": engine.model.state_dict(),
            "optimizer": engine.optimizer.state_dict(),
            "scheduler": engine.schedule.state_dict() if engine.schedule is not None else None,
            "scaler": engine.scaler.state_dict(),
            "state": engine.state.__dict__,
        }
        runs.write_atomic(self.path, lambda tmp: torch.save(payload, tmp))


class History(Handler):
    """Rewrite ``history.csv`` (atomically) with every epoch so far, in ``columns`` order."""

    def __init__(self, path: Path, columns: Sequence[str]):
        self.path, self.columns = Path(path), list(columns)

    def on_epoch_end(self, engine: Engine, row: dict) -> None:
        table = pd.DataFrame(engine.state.history)[self.columns]
        runs.write_text(self.path, table.to_csv(index=False))


class ExperimentLog(Handler):
    """Send each epoch's row to TensorBoard or MLflow (``none``: nowhere); see ``loggers.py``."""

    def __init__(self, kind: str, run_dir: Path, config: dict):
        self.kind, self.run_dir, self.config = kind, Path(run_dir), config
        self.logger: EpochLogger | None = None

    def on_fit_start(self, engine: Engine) -> None:
        self.logger = create_logger(self.kind, self.run_dir, self.config)

    def on_epoch_end(self, engine: Engine, row: dict) -> None:
        if self.logger is not None:
            self.logger.log(row, row["epoch"])

    def on_fit_end(self, engine: Engine, error: BaseException | None) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None


class EpochCallback(Handler):
    """Call ``fn(epoch, row)`` after each epoch, once the checkpoint and best weights are saved:
    an exception it raises (a tuning trial being pruned) ends training there."""

    def __init__(self, fn: Callable[[int, dict], None]):
        self.fn = fn

    def on_epoch_end(self, engine: Engine, row: dict) -> None:
        self.fn(row["epoch"], row)


class ReportEvents(Handler):
    """Tell ``reporter`` how training goes: progress (with ``progress``), each epoch's scores,
    resuming, an interruption, early stopping and the best epoch (see ``medsight.events``)."""

    def __init__(
        self,
        reporter: Reporter,
        *,
        monitor: str,
        patience: int,
        progress: bool = True,
        shown: tuple[str, ...] = (),
    ):
        self.reporter, self.monitor, self.patience = reporter, monitor, patience
        self.progress, self.shown = progress, shown
        self._bar = False

    def on_fit_start(self, engine: Engine) -> None:
        if engine.resumed:
            self.reporter(Resumed(engine.out, engine.state.epoch))
        if self.progress:
            total, done = engine.epochs * engine.steps, engine.state.epoch * engine.steps
            self.reporter(ProgressStart("training", total=total, completed=done))
            self._bar = True

    def on_batch_end(self, engine: Engine) -> None:
        if self._bar:
            text = f"epoch {engine.epoch} loss {engine.loss:.4f}" if engine.batch % 5 == 0 else None
            self.reporter(ProgressAdvance(1, text))

    def on_epoch_end(self, engine: Engine, row: dict) -> None:
        best = engine.state.best_epoch == row["epoch"]
        self.reporter(EpochEnd(row["epoch"], engine.epochs, dict(row), best=best, shown=self.shown))

    def on_fit_end(self, engine: Engine, error: BaseException | None) -> None:
        if self._bar:
            self.reporter(ProgressEnd())
            self._bar = False
        state = engine.state
        if isinstance(error, KeyboardInterrupt):
            self.reporter(Interrupted(engine.out, state.epoch))
        if error is not None:
            return
        if engine.stopped_early:
            self.reporter(EarlyStopped(self.monitor, self.patience))
        self.reporter(TrainingEnd(engine.out, state.best_epoch, self.monitor, state.best_score))


def fire(handlers: Sequence[Handler], hook: str, engine: Engine, *args) -> None:
    """Call ``hook`` on every handler, in order."""
    for handler in handlers:
        getattr(handler, hook)(engine, *args)
