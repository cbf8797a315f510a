"""Rich rendering of the library's events (:mod:`medsight.events`) for the CLI: progress bars,
the epoch lines of training, the live table of a tuning study, the steps of the demo.

The library reports; only the CLI draws. Pass a :class:`Renderer` as ``events``::

    with Renderer(err_console) as events:
        train(config, events=events)
"""

from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from medsight.events import (
    BestTrialRetrained,
    EarlyStopped,
    EnsembleSaved,
    EpochEnd,
    Event,
    FoldStart,
    Interrupted,
    Note,
    ProgressAdvance,
    ProgressEnd,
    ProgressStart,
    Resumed,
    Step,
    StepDetail,
    StudyResumed,
    TrainingEnd,
    TrialFailed,
    TrialsTable,
    TuningEnd,
)
from medsight.stats import format_number

#: How the epoch line abbreviates metric names.
_SHORT = {"accuracy": "acc", "balanced_accuracy": "bal acc"}


class Renderer:
    """Draws each event on ``console``; ``close()`` (or leaving ``with``) ends any bar or live
    table still shown, whatever happened to the call that sent them."""

    def __init__(self, console: Console):
        self.console = console
        self._bar: Progress | None = None
        self._live: Live | None = None
        self._draw = {
            ProgressStart: self._progress_start,
            ProgressAdvance: self._progress_advance,
            ProgressEnd: lambda event: self._end_bar(),
            Resumed: self._resumed,
            EpochEnd: self._epoch,
            Interrupted: self._interrupted,
            EarlyStopped: self._early_stop,
            TrainingEnd: self._training_end,
            Step: self._step,
            StepDetail: lambda event: self.console.print(f"      {event.text}"),
            Note: lambda event: self.console.print(
                f"[yellow]note:[/] {event.text}", highlight=False
            ),
            FoldStart: self._fold,
            EnsembleSaved: self._ensemble,
            StudyResumed: self._study_resumed,
            TrialFailed: self._trial_failed,
            TrialsTable: self._trials,
            BestTrialRetrained: self._retrained,
            TuningEnd: self._tuning_end,
        }

    def __call__(self, event: Event) -> None:
        draw = self._draw.get(type(event))
        if draw is not None:
            draw(event)

    def close(self) -> None:
        self._end_bar()
        if self._live is not None:
            self._live.stop()
            self._live = None

    def __enter__(self) -> Renderer:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    # ------------------------------------------------------------------ progress

    def _progress_start(self, event: ProgressStart) -> None:
        self._end_bar()
        self._bar = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._bar.add_task(event.description, total=event.total, completed=event.completed)
        self._bar.start()

    def _progress_advance(self, event: ProgressAdvance) -> None:
        if self._bar is None:
            return
        task = self._bar.task_ids[0]
        self._bar.advance(task, event.advance)
        if event.description is not None:
            self._bar.update(task, description=event.description)

    def _end_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    # ------------------------------------------------------------------ training

    def _resumed(self, event: Resumed) -> None:
        self.console.print(f"resuming {event.run} after epoch {event.epoch}")

    def _epoch(self, event: EpochEnd) -> None:
        row = event.row
        mark = "  [green]best[/]" if event.best else ""
        scores = "".join(
            f"{_SHORT.get(name, name)} {format_number(row.get(f'val_{name}'), 4)}  "
            for name in event.shown
        )
        self.console.print(
            f"epoch {event.epoch:>3}/{event.epochs}  loss {row['train_loss']:.4f}  "
            f"val loss {row['val_loss']:.4f}  {scores}({row['seconds']:.1f}s){mark}",
            highlight=False,
            soft_wrap=True,  # one line per epoch, also in a log file narrower than it
        )

    def _interrupted(self, event: Interrupted) -> None:
        self.console.print(
            f"[yellow]interrupted[/] after epoch {event.epoch}; continue with "
            f"`medsight train --resume {event.run}`"
        )

    def _early_stop(self, event: EarlyStopped) -> None:
        self.console.print(f"early stop: no {event.monitor} gain for {event.patience} epochs")

    def _training_end(self, event: TrainingEnd) -> None:
        self.console.print(
            f"best epoch {event.best_epoch}: val {event.monitor} "
            f"{abs(event.best_score):.4f}; run saved in {event.run}",
            highlight=False,
        )

    # ------------------------------------------------------------------ workflows

    def _step(self, event: Step) -> None:
        self.console.print(f"[bold]{event.index}/{event.total}[/] {event.text}")

    def _fold(self, event: FoldStart) -> None:
        if event.kept:
            self.console.print(f"fold {event.fold + 1}/{event.folds}: kept (already finished)")
        else:
            self.console.print(f"[bold]fold {event.fold + 1}/{event.folds}[/]")

    def _ensemble(self, event: EnsembleSaved) -> None:
        self.console.print(
            f"ensemble of {len(event.weights)} runs saved in {event.run} "
            f"(weights {', '.join(f'{w:.3f}' for w in event.weights)})",
            highlight=False,
        )

    def _study_resumed(self, event: StudyResumed) -> None:
        self.console.print(
            f"study {event.study!r}: {event.finished} trial(s) already finished; continuing"
        )

    def _trial_failed(self, event: TrialFailed) -> None:
        self.console.print(
            f"[yellow]trial {event.number} failed:[/] {event.error}", highlight=False
        )

    def _trials(self, event: TrialsTable) -> None:
        if self._live is None:
            self._live = Live(console=self.console, refresh_per_second=2, transient=False)
            self._live.start()
        self._live.update(_trials_table(event))
        if event.final:
            self._live.stop()
            self._live = None

    def _retrained(self, event: BestTrialRetrained) -> None:
        self.console.print(f"trial {event.number} ran elsewhere: retraining its config here")

    def _tuning_end(self, event: TuningEnd) -> None:
        self.console.print("[bold]best config[/]\n" + event.config_yaml, highlight=False)
        self.console.print(
            f"best trial {event.best_number}: val {event.metric} {event.value:.4f}; "
            f"its run is {event.run}, the study's summary {event.summary}",
            highlight=False,
        )


def _trials_table(event: TrialsTable) -> Table:
    """The latest trials of a study, the best in bold green, the pruned ones dim."""
    table = Table(
        title=f"study {event.study}: {event.done}/{event.target} trials", title_justify="left"
    )
    for column in ("#", "state", f"val {event.metric}", "epochs", "s", "params"):
        table.add_column(column, justify="right" if column not in ("state", "params") else "left")
    for row in event.rows:
        if row.seconds is not None:
            seconds = f"{row.seconds:.0f}"
        else:
            seconds = "…" if row.state == "running" else ""
        params = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in row.params.items())
        style = "dim" if row.state == "pruned" else ""
        if row.best:
            style = "bold green"
        table.add_row(
            str(row.number),
            row.state,
            "" if row.value is None else f"{row.value:.4f}",
            str(row.epochs),
            seconds,
            params,
            style=style,
        )
    return table


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
