"""What the library tells its user while it works: small event records and the reporter they go to.

Library code never prints. Long-running calls (``train``, ``tune``, ``cross_validate``,
``build_ensemble``, ``run_demo``) take ``events``, any callable that accepts an :class:`Event`,
and send it progress, epoch results, notes and summaries; by default they go nowhere. The CLI
passes a renderer that draws them with Rich (``medsight.cli.render``); a test can pass
``list.append``::

    seen = []
    train(config, events=seen.append)
    [e.epoch for e in seen if isinstance(e, EpochEnd)]   # [1, 2, …]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class Reporter(Protocol):
    """Receives every event a library call sends; it must not raise."""

    def __call__(self, event: Event) -> None: ...


def silent(event: Event) -> None:
    """The default reporter: drops every event."""


@dataclass(frozen=True)
class Event:
    """Base of all events."""


# --------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class ProgressStart(Event):
    """A counted piece of work begins (``completed`` of ``total`` are already done).
    ``own_eta``: its advances carry their own rate and times left (:class:`TrainingProgress`)."""

    description: str
    total: int
    completed: int = 0
    own_eta: bool = False


@dataclass(frozen=True)
class ProgressAdvance(Event):
    """``advance`` more units are done; ``description``, when given, replaces the label."""

    advance: int = 1
    description: str | None = None


@dataclass(frozen=True)
class TrainingProgress(ProgressAdvance):
    """A training step is done: ``step`` of ``total`` steps, in epoch ``epoch`` of ``epochs``;
    ``images_per_s`` the recent throughput; seconds left in the epoch and in the run (both with
    their validations) and in the time budget; None where unknown (nothing timed yet, no
    budget)."""

    step: int = 0
    total: int = 0
    epoch: int = 0
    epochs: float = 0.0
    images_per_s: float | None = None
    epoch_left_s: float | None = None
    run_left_s: float | None = None
    budget_left_s: float | None = None


@dataclass(frozen=True)
class ProgressEnd(Event):
    """The counted work ended (finished, failed or interrupted)."""


@dataclass(frozen=True)
class Step(Event):
    """Step ``index`` of ``total`` in a multi-step job begins."""

    index: int
    total: int
    text: str


@dataclass(frozen=True)
class StepDetail(Event):
    """What the current step found."""

    text: str


@dataclass(frozen=True)
class Note(Event):
    """Something the user should know that is not an error."""

    text: str


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Resumed(Event):
    """A stopped run continues after ``epoch`` (``step`` optimiser steps done, ``epoch_fraction``
    passes: 2.4 when a time budget had ended it within its third epoch)."""

    run: Path
    epoch: int
    step: int | None = None
    epoch_fraction: float | None = None


@dataclass(frozen=True)
class TrainingPlan(Event):
    """How training will go: ``steps`` optimiser steps of ``batch_size`` images,
    ``steps_per_epoch`` to a pass over the ``n_train`` training images (``steps_done`` already,
    when resuming). ``basis``: what set the length: the ``auto`` rule, the ``epochs`` given or
    the ``time`` budget (``budget_s`` in all, ``budget_left_s`` of it left). Validation every
    ``val_every`` steps within epochs (None: once per epoch), on ``subsample`` of the ``n_val``
    validation images (None: all), and on all at each epoch end. ``images_per_s`` and
    ``finish_at`` (a ``time.time()`` value): the measured throughput and the expected end, when
    measured."""

    steps: int
    steps_per_epoch: int
    batch_size: int
    n_train: int
    n_val: int
    basis: str
    steps_done: int = 0
    val_every: int | None = None
    subsample: int | None = None
    budget_s: float | None = None
    budget_left_s: float | None = None
    images_per_s: float | None = None
    finish_at: float | None = None

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch


@dataclass(frozen=True)
class EpochEnd(Event):
    """An epoch finished; ``row`` is its ``history.csv`` row, ``best`` whether it improved,
    ``shown`` the task's validation metrics worth a glance (``row["val_<name>"]``); ``epochs``
    the planned passes (3.4 when a time budget ends the run within its fourth)."""

    epoch: int
    epochs: float
    row: Mapping[str, Any]
    best: bool
    shown: tuple[str, ...] = ()


@dataclass(frozen=True)
class ValidationEnd(Event):
    """A validation within an epoch (large training sets, short runs); ``row`` is its
    ``history.csv`` row (``epoch_fraction``, ``val_images``…), ``subsample`` whether it used a
    subsample of the validation split; the rest as in :class:`EpochEnd`."""

    epoch_fraction: float
    epochs: float
    row: Mapping[str, Any]
    best: bool
    shown: tuple[str, ...] = ()
    subsample: bool = False


@dataclass(frozen=True)
class BudgetReached(Event):
    """The time budget (``budget_s``) ended training after ``elapsed_s`` seconds, at
    ``epoch_fraction`` (``step`` optimiser steps); the best weights are kept."""

    budget_s: float
    elapsed_s: float
    step: int
    epoch_fraction: float


@dataclass(frozen=True)
class Interrupted(Event):
    """Training was interrupted after ``epoch``; ``train(..., resume=True)`` continues it."""

    run: Path
    epoch: int


@dataclass(frozen=True)
class EarlyStopped(Event):
    monitor: str
    patience: int


@dataclass(frozen=True)
class TrainingEnd(Event):
    """Training finished; ``best_score`` is the monitored score (negated for a loss), reached in
    ``best_epoch``, at ``best_fraction`` passes (2.5: within the third epoch) when known."""

    run: Path
    best_epoch: int
    monitor: str
    best_score: float
    best_fraction: float | None = None


# --------------------------------------------------------------------------- workflows


@dataclass(frozen=True)
class FoldStart(Event):
    """Cross-validation reaches ``fold`` (0-based); ``kept``: it finished in an earlier call."""

    fold: int
    folds: int
    kept: bool = False


@dataclass(frozen=True)
class EnsembleSaved(Event):
    run: Path
    weights: tuple[float, ...]


@dataclass(frozen=True)
class StudyResumed(Event):
    study: str
    finished: int


@dataclass(frozen=True)
class TrialFailed(Event):
    number: int
    error: str


@dataclass(frozen=True)
class TrialRow:
    """One trial as the tuning table shows it."""

    number: int
    state: str
    value: float | None
    epochs: int
    seconds: float | None
    params: Mapping[str, Any]
    best: bool = False


@dataclass(frozen=True)
class TrialsTable(Event):
    """The study now: ``done`` of ``target`` trials finished, the latest ``rows``.
    ``final``: the last table of this call."""

    study: str
    metric: str
    done: int
    target: int
    rows: tuple[TrialRow, ...]
    final: bool = False


@dataclass(frozen=True)
class BestTrialRetrained(Event):
    """The best trial ran in another process: its config is trained again here."""

    number: int


@dataclass(frozen=True)
class TuningEnd(Event):
    """The study's best trial and where its run, config and summary are."""

    best_number: int
    metric: str
    value: float
    run: Path
    summary: Path
    config_yaml: str
