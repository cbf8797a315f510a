"""What happens around the training loop, one handler per concern: the weight average, best
weights and early stopping, the time budget, the resumable checkpoint, ``history.csv``, the
experiment logger, a per-epoch callback, and the events a user sees.

The loop (:func:`medsight.training.trainer.train`) only trains and validates; after each batch,
each validation, each epoch, and at the start and end of training it calls every handler's
hook, in list order, with the :class:`Engine` (MONAI's engines and handlers work the same way).
Paths given to handlers as relative ones are inside the run directory, ``engine.out``: a new run
is built in a hidden folder and moved into place by :class:`CommitRun` at its first checkpoint.
A new behaviour is a new handler, not a change to the loop::

    class StopAfter(Handler):
        def __init__(self, seconds): self.deadline = time.monotonic() + seconds
        def on_batch_end(self, engine):
            engine.stop = engine.stop or time.monotonic() > self.deadline
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from timm.utils import ModelEmaV3

from medsight import runs
from medsight.errors import ConfigError
from medsight.events import (
    BudgetReached,
    EarlyStopped,
    EpochEnd,
    Interrupted,
    ProgressEnd,
    ProgressStart,
    Reporter,
    Resumed,
    TrainingEnd,
    TrainingPlan,
    TrainingProgress,
    ValidationEnd,
)
from medsight.training.budget import Pace, Plan
from medsight.training.loggers import EpochLogger, create_logger
from medsight.training.optim import Schedule

#: Where the checkpoint of the last finished epoch is kept, inside the run directory.
LAST_CHECKPOINT = Path(runs.CHECKPOINTS) / "last.pt"


@dataclass
class TrainState:
    """Where training stands; the checkpoint restores it together with the weights."""

    epoch: int = 0  # the last finished epoch (the run's last one may be partial)
    best_score: float = -math.inf  # the monitored score, higher is better
    best_epoch: int = 0  # the epoch of the best validation
    bad_epochs: int = 0  # validations since the best one
    history: list[dict] = field(default_factory=list)  # one history.csv row per validation
    step: int = 0  # optimiser steps done
    images_seen: int = 0  # training images those steps saw
    best_step: int = 0  # the step of the best validation
    elapsed: float = 0.0  # seconds spent training, all calls together
    budget: float | None = None  # the time budget in seconds, all calls together
    plan: dict | None = None  # the Plan (training.budget) this run follows
    pace: dict | None = None  # the last known Pace: seconds per step, per validation
    stopped: str | None = None  # why the run ended: "done", "early" or "budget"
    best_loss: float = math.inf  # the best validation's loss: it breaks ties of the score


@dataclass
class Engine:
    """What handlers see: the objects being trained and where training stands."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule | None
    scaler: torch.amp.GradScaler
    out: Path  # the run directory
    plan: Plan  # steps, steps per epoch, validation cadence
    batch_size: int = 1
    state: TrainState = field(default_factory=TrainState)
    pace: Pace = field(default_factory=Pace)  # seconds per step and per validation, measured
    resumed: bool = False  # set by Checkpoint when it restored a stopped run
    epoch: int = 0  # the epoch running
    batch: int = 0  # batches done in it
    loss: float = math.nan  # their mean training loss since the last validation
    score: float = math.nan  # the last validation's monitored score, higher is better
    epoch_ending: bool = False  # the validation running is an epoch's (or the run's) last
    stop: bool = False  # a handler asks the loop to end (after one last validation)
    stopped_early: bool = False  # ... because the monitored score stopped improving
    stop_reason: str | None = None  # "early" or "budget" when a handler stopped training
    budget_left: float | None = None  # seconds of the time budget left, when there is one
    average: ModelEmaV3 | None = None  # the weight average validated and kept, when there is one

    @property
    def evaluated(self) -> torch.nn.Module:
        """The network validations score and the best weights are taken from: the weight
        average when the run keeps one (:class:`WeightAverage`), else the model as trained."""
        return self.average.module if self.average is not None else self.model

    @property
    def epochs(self) -> float:
        """The planned passes over the training set (3.4: three and a part)."""
        return self.plan.epochs

    @property
    def steps(self) -> int:
        """Optimiser steps per epoch."""
        return self.plan.steps_per_epoch

    @property
    def epoch_fraction(self) -> float:
        """Passes done so far (1.5: half-way through the second epoch)."""
        return self.state.step / self.plan.steps_per_epoch


class Handler:
    """Hooks the loop calls; each does nothing unless a handler overrides it."""

    def on_fit_start(self, engine: Engine) -> None:
        """Before the first step (of this call: a resumed run starts after its last epoch)."""

    def on_batch_end(self, engine: Engine) -> None:
        """After each optimiser step."""

    def on_validation(self, engine: Engine, row: dict) -> None:
        """After each validation, within an epoch or at its end (``engine.epoch_ending``);
        ``row`` is its history row, already in ``engine.state``."""

    def on_epoch_end(self, engine: Engine, row: dict) -> None:
        """After an epoch's last validation (``row``), also when the run ends within an epoch."""

    def on_fit_end(self, engine: Engine, error: BaseException | None) -> None:
        """Always, last: ``error`` is what ended training early (an interrupt, a failure, an
        exception from a callback), None when it ran to its end or stopped early."""


def weight_average(model: torch.nn.Module, horizon_steps: float) -> ModelEmaV3:
    """An exponential moving average of ``model``'s weights and buffers over about
    ``horizon_steps`` optimiser steps (decay 1 − 1/horizon), warmed up so that the first steps
    are not averaged with the random initial weights (timm's ``ModelEmaV3``; its decay follows
    from the step number alone, so a resumed run averages exactly as an uninterrupted one)."""
    decay = 1.0 - 1.0 / max(2.0, horizon_steps)
    exact = {}
    # Newer timm rounds bf16 averages stochastically by default; older timm (no such argument)
    # always averages exactly, which is what a reproducible run needs either way.
    if "stochastic_rounding" in inspect.signature(ModelEmaV3).parameters:
        exact["stochastic_rounding"] = False
    average = ModelEmaV3(model, decay=decay, use_warmup=True, **exact)
    average.module.eval()
    return average


class WeightAverage(Handler):
    """Update ``engine.average`` after every step. The average is what validations score and
    what the best weights are (``Engine.evaluated``): with the one-cycle schedule's large steps,
    single-step weights scatter around the optimum, so their validation AUROC jumps between
    epochs and the kept checkpoint is a noisy peak; the average smooths that out
    (benchmarks/README.md: +2.6 points of test accuracy on the phantom over three seeds)."""

    def on_batch_end(self, engine: Engine) -> None:
        if engine.average is not None:
            engine.average.update(engine.model, step=engine.state.step)


def _in_run(engine: Engine, path: Path) -> Path:
    """``path`` itself when absolute, else inside the run directory (where it is now)."""
    return path if path.is_absolute() else Path(engine.out) / path


class EarlyStopping(Handler):
    """Save the weights of the best validation (``model.safetensors``) and stop once
    ``patience`` epochs' worth of steps passed without improvement of the monitored score.

    Every validation counts, also those within epochs (see ``training.budget``): with one per
    epoch this is "stop after ``patience`` epochs without a better score"."""

    def __init__(self, weights: Path, patience: int, *, write: bool = True):
        self.weights, self.patience, self.write = Path(weights), patience, write

    def on_fit_start(self, engine: Engine) -> None:
        if engine.state.stopped == "early":  # a resumed run that had stopped early stays so
            engine.stop = engine.stopped_early = True
            engine.stop_reason = "early"

    def on_validation(self, engine: Engine, row: dict) -> None:
        state = engine.state
        loss = row.get("val_loss")
        loss = math.inf if loss is None or not math.isfinite(loss) else float(loss)
        # A saturated score (validation AUROC 1.000 from the first epoch on a small set) ties
        # on every validation: the lower validation loss decides, or the first epoch with
        # near-chance probabilities would be kept.
        tie = engine.score == state.best_score and loss < state.best_loss
        if engine.score > state.best_score or tie:
            state.best_score, state.best_epoch, state.bad_epochs = engine.score, engine.epoch, 0
            state.best_loss = loss
            state.best_step = state.step
            if self.write:
                runs.save_weights(_in_run(engine, self.weights), engine.evaluated.state_dict())
        else:
            state.bad_epochs += 1
        if state.step - state.best_step >= self.patience * engine.plan.steps_per_epoch:
            engine.stop = engine.stopped_early = True
            engine.stop_reason = engine.stop_reason or "early"


class TimeBudget(Handler):
    """Keep the seconds training took (``TrainState.elapsed``, all calls together) and, with a
    time budget, end training in time: after a step, when what is left no longer holds another
    step, a validation due now and the last validation, the loop is asked to stop (it then
    validates once more and saves the checkpoint; the best weights are already kept).

    ``budget``: the seconds allowed in all (None: keep the one in the checkpoint, if any);
    ``started``: when this call began, by ``clock`` (a fake clock in tests)."""

    def __init__(
        self,
        budget: float | None = None,
        *,
        started: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.budget, self.clock = budget, clock
        self.started = clock() if started is None else started
        self._before = 0.0

    def elapsed(self) -> float:
        """Seconds spent training so far, earlier calls included."""
        return self._before + self.clock() - self.started

    def left(self, engine: Engine) -> float | None:
        """Seconds of the budget left (None: no budget)."""
        budget = engine.state.budget
        return None if budget is None else budget - self.elapsed()

    def on_fit_start(self, engine: Engine) -> None:
        state = engine.state
        self._before = state.elapsed
        if self.budget is not None:
            state.budget = self.budget
        if state.stopped == "budget" and state.budget is not None:
            state.stopped = None  # a stopped run given more time goes on
        engine.budget_left = self.left(engine)
        if engine.budget_left is not None and engine.budget_left < self._needed(engine):
            engine.stop, engine.stop_reason = True, "budget"

    def on_batch_end(self, engine: Engine) -> None:
        left = engine.budget_left = self.left(engine)
        if left is not None and left < self._needed(engine):
            engine.stop = True
            engine.stop_reason = engine.stop_reason or "budget"

    def on_validation(self, engine: Engine, row: dict) -> None:
        engine.state.elapsed = self.elapsed()
        engine.budget_left = self.left(engine)

    def _needed(self, engine: Engine) -> float:
        """Seconds to go on: a validation due after this step, one more step, the last one."""
        pace = engine.pace
        val = pace.val_seconds or 0.0
        due = engine.plan.check_at(engine.state.step) == "mid" and not engine.stop
        return (pace.mid_seconds or val) * due + (pace.step_seconds or 0.0) + val


class Checkpoint(Handler):
    """Write ``checkpoints/last.pt`` atomically after every epoch, and when the run ends within
    one (weights, their average, optimiser, schedule, gradient scaler, :class:`TrainState`);
    with ``resume``,
    read it at once (:attr:`saved_state`: the plan to rebuild the schedule with) and restore it
    before the first step.

    Together with the per-epoch seeds of the loop, this makes a resumed run end with the same
    weights as an uninterrupted one: validations within the epoch that was interrupted are done
    again, identically. A relative ``path`` is inside ``engine.out``; with ``resume`` it is read
    as given, so give the run's own file.
    """

    def __init__(self, path: Path, *, resume: bool = False, map_location=None, write=True):
        self.path, self.resume, self.write = Path(path), resume, write
        self.saved = (
            torch.load(self.path, map_location=map_location, weights_only=False) if resume else None
        )
        if self.saved is not None and "step" not in self.saved["state"]:
            # Checkpoints from before step plans hold no step count or plan to continue from.
            raise ConfigError(
                f"{self.path} was written by an older medsight that kept no step plan, so the "
                "run cannot be resumed; its weights still load, evaluate and serve. To train "
                f"on, start a new run from them: --weights {self.path.parent.parent}"
            )

    @property
    def saved_state(self) -> TrainState | None:
        """The :class:`TrainState` of the checkpoint to resume (None: a fresh run)."""
        return TrainState(**self.saved["state"]) if self.saved is not None else None

    def on_fit_start(self, engine: Engine) -> None:
        if self.saved is None:
            return
        saved = self.saved
        engine.model.load_state_dict(saved["model"])
        engine.optimizer.load_state_dict(saved["optimizer"])
        if engine.schedule is not None and saved.get("scheduler") is not None:
            engine.schedule.load_state_dict(saved["scheduler"])
        engine.scaler.load_state_dict(saved["scaler"])
        if saved.get("average") is not None and engine.average is not None:
            engine.average.module.load_state_dict(saved["average"])
        elif engine.average is not None:
            # A run that began without an average (or before there was one) goes on without
            # one: averaging from the middle would make it a different run.
            engine.average = None
        engine.state = TrainState(**saved["state"])
        if engine.state.pace:
            engine.pace = Pace(**engine.state.pace)
        engine.resumed = True
        self.saved = None

    def on_epoch_end(self, engine: Engine, row: dict) -> None:
        engine.state.pace = engine.pace.to_dict()
        if not self.write:  # a process other than rank 0 under torchrun
            return
        payload = {
            "model": engine.model.state_dict(),
            "average": engine.average.module.state_dict() if engine.average is not None else None,
            "optimizer": engine.optimizer.state_dict(),
            "scheduler": engine.schedule.state_dict() if engine.schedule is not None else None,
            "scaler": engine.scaler.state_dict(),
            "state": engine.state.__dict__,
        }
        runs.write_atomic(_in_run(engine, self.path), lambda tmp: _save(payload, tmp))


def _save(payload: dict, path: Path) -> None:
    # Through a Python file, so a full disk is an OSError naming errno (torch's own writer
    # on a path reports a bare RuntimeError).
    with open(path, "wb") as file:
        torch.save(payload, file)


class CommitRun(Handler):
    """Move a new run into place (:class:`medsight.runs.NewRun`) once its first checkpoint is
    written, and point ``engine.out`` there: a start that fails or is killed before leaves no
    run folder, and a run folder that exists can always be resumed. Goes right after
    :class:`Checkpoint`."""

    def __init__(self, new_run: runs.NewRun):
        self.new_run = new_run

    def on_epoch_end(self, engine: Engine, row: dict) -> None:
        if not self.new_run.committed:
            engine.out = self.new_run.commit()


class History(Handler):
    """Rewrite ``history.csv`` (atomically) with every validation so far, in ``columns`` order."""

    def __init__(self, path: Path, columns: Sequence[str]):
        self.path, self.columns = Path(path), list(columns)

    def on_validation(self, engine: Engine, row: dict) -> None:
        # rows of a checkpoint from before a column existed get it empty
        table = pd.DataFrame(engine.state.history).reindex(columns=self.columns)
        runs.write_text(_in_run(engine, self.path), table.to_csv(index=False))


class ExperimentLog(Handler):
    """Send each validation's row to TensorBoard or MLflow (``none``: nowhere), at its step;
    see ``loggers.py``."""

    def __init__(self, kind: str, run_dir: Path, config: dict):
        self.kind, self.run_dir, self.config = kind, Path(run_dir), config
        self.logger: EpochLogger | None = None

    def on_fit_start(self, engine: Engine) -> None:
        self.logger = create_logger(self.kind, self.run_dir, self.config)

    def on_validation(self, engine: Engine, row: dict) -> None:
        if self.logger is not None:
            self.logger.log(row, row["step"])

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
    """Tell ``reporter`` how training goes: the plan, progress (with ``progress``: throughput,
    time left in the epoch, the run and the budget), each validation's scores, resuming, an
    interruption, early stopping, the budget reached and the best epoch (``medsight.events``).
    ``n_train`` and ``n_val``: the sizes the plan is told with."""

    def __init__(
        self,
        reporter: Reporter,
        *,
        monitor: str,
        patience: int,
        progress: bool = True,
        shown: tuple[str, ...] = (),
        n_train: int = 0,
        n_val: int = 0,
    ):
        self.reporter, self.monitor, self.patience = reporter, monitor, patience
        self.progress, self.shown = progress, shown
        self.n_train, self.n_val = n_train, n_val
        self._bar = False
        self._last_row: dict | None = None

    def on_fit_start(self, engine: Engine) -> None:
        state, plan = engine.state, engine.plan
        if engine.resumed:
            fraction = state.step / plan.steps_per_epoch
            self.reporter(Resumed(engine.out, state.epoch, state.step, fraction))
        if engine.stop or state.step >= plan.total_steps:
            return  # nothing left to train
        run_left = engine.pace.seconds(plan, state.step, plan.total_steps)
        self.reporter(
            TrainingPlan(
                steps=plan.total_steps,
                steps_per_epoch=plan.steps_per_epoch,
                batch_size=engine.batch_size,
                n_train=self.n_train,
                n_val=self.n_val,
                basis=plan.basis,
                steps_done=state.step,
                val_every=plan.val_every,
                subsample=plan.subsample,
                budget_s=state.budget,
                budget_left_s=engine.budget_left,
                images_per_s=engine.pace.images_per_second(engine.batch_size),
                finish_at=None if run_left is None else time.time() + run_left,
            )
        )
        if self.progress:
            self.reporter(
                ProgressStart(
                    "training", total=plan.total_steps, completed=state.step, own_eta=True
                )
            )
            self._bar = True

    def on_batch_end(self, engine: Engine) -> None:
        if not self._bar:
            return
        plan, step, pace = engine.plan, engine.state.step, engine.pace
        epoch_end = min(plan.total_steps, engine.epoch * plan.steps_per_epoch)
        text = f"epoch {engine.epoch} loss {engine.loss:.4f}"
        self.reporter(
            TrainingProgress(
                1,
                text,
                step=step,
                total=plan.total_steps,
                epoch=engine.epoch,
                epochs=plan.epochs,
                images_per_s=pace.images_per_second(engine.batch_size),
                epoch_left_s=pace.seconds(plan, step, epoch_end),
                run_left_s=pace.seconds(plan, step, plan.total_steps),
                budget_left_s=engine.budget_left,
            )
        )

    def on_validation(self, engine: Engine, row: dict) -> None:
        if engine.epoch_ending:
            return  # reported as the epoch's end
        best = engine.state.best_step == row["step"]
        fraction = row["epoch_fraction"]
        sample = row.get("val_images", self.n_val) < self.n_val
        event = ValidationEnd(
            fraction, engine.epochs, dict(row), best=best, shown=self.shown, subsample=sample
        )
        self.reporter(event)
        self._last_row = row

    def on_epoch_end(self, engine: Engine, row: dict) -> None:
        if row is self._last_row:
            return  # the run ended on a validation already reported
        best = engine.state.best_step == row["step"]
        event = EpochEnd(row["epoch"], engine.epochs, dict(row), best=best, shown=self.shown)
        self.reporter(event)

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
        if engine.stop_reason == "budget" and state.budget is not None:
            fraction = state.step / engine.plan.steps_per_epoch
            self.reporter(BudgetReached(state.budget, state.elapsed, state.step, fraction))
        best_fraction = state.best_step / engine.plan.steps_per_epoch if state.best_step else None
        self.reporter(
            TrainingEnd(engine.out, state.best_epoch, self.monitor, state.best_score, best_fraction)
        )


def fire(handlers: Sequence[Handler], hook: str, engine: Engine, *args) -> None:
    """Call ``hook`` on every handler, in order."""
    for handler in handlers:
        getattr(handler, hook)(engine, *args)
