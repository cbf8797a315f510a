"""Rich rendering of the library's events (:mod:`medsight.events`) for the CLI: progress bars,
the epoch lines of training, the live table of a tuning study, the steps of the demo.

The library reports; only the CLI draws. Pass a :class:`Renderer` as ``events``::

    with Renderer(err_console) as events:
        train(config, events=events)
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from rich import box
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from medsight.events import (
    BestTrialRetrained,
    BudgetReached,
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
    TrainingPlan,
    TrainingProgress,
    TrialFailed,
    TrialsTable,
    TuningEnd,
    ValidationEnd,
)
from medsight.stats import format_ci, format_number, format_value_ci

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
            TrainingProgress: self._training_progress,
            ProgressEnd: lambda event: self._end_bar(),
            Resumed: self._resumed,
            TrainingPlan: self._plan,
            EpochEnd: self._epoch,
            ValidationEnd: self._validation,
            BudgetReached: self._budget_reached,
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
        # work that reports its own rate and times left (training) shows them; else Rich guesses
        guess = () if event.own_eta else (TimeRemainingColumn(),)
        self._bar = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            *guess,
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=True,
        )
        self._bar.add_task(event.description, total=event.total, completed=event.completed, info="")
        self._bar.start()

    def _progress_advance(self, event: ProgressAdvance) -> None:
        if self._bar is None:
            return
        task = self._bar.task_ids[0]
        self._bar.advance(task, event.advance)
        if event.description is not None:
            self._bar.update(task, description=event.description)

    def _training_progress(self, event: TrainingProgress) -> None:
        self._progress_advance(event)
        if self._bar is not None:
            self._bar.update(self._bar.task_ids[0], info=progress_info(event))

    def _end_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    # ------------------------------------------------------------------ training

    def _resumed(self, event: Resumed) -> None:
        fraction = event.epoch_fraction
        if fraction is None or float(fraction).is_integer():
            self.console.print(f"resuming {event.run} after epoch {event.epoch}")
        else:
            self.console.print(f"resuming {event.run} at epoch {fraction:.2f}")

    def _plan(self, event: TrainingPlan) -> None:
        self.console.print(plan_line(event), highlight=False, soft_wrap=True)

    def _epoch(self, event: EpochEnd) -> None:
        fraction = event.row.get("epoch_fraction")
        at = event.epoch if fraction is None or fraction == event.epoch else fraction
        self._scores(at, event.epochs, event.row, event.shown, event.best)

    def _validation(self, event: ValidationEnd) -> None:
        sample = event.row.get("val_images") if event.subsample else None
        self._scores(event.epoch_fraction, event.epochs, event.row, event.shown, event.best, sample)

    def _scores(self, at, epochs, row, shown, best: bool, sample: int | None = None) -> None:
        """One line per validation: where (``epoch 3/12``, ``epoch 1.50/2``), the losses, the
        scores shown, on how many images when a subsample, how long, and whether best."""
        mark = "  [green]best[/]" if best else ""
        scores = "".join(
            f"{_SHORT.get(name, name)} {format_number(row.get(f'val_{name}'), 4)}  "
            for name in shown
        )
        where = f"{at:>3}" if float(at).is_integer() else f"{at:.2f}"
        # a detector's validation loss is undefined (torchvision computes losses in training)
        loss = row.get("val_loss")
        val_loss = f"val loss {loss:.4f}  " if loss is not None and loss == loss else ""
        images = f"on {sample:,} images  " if sample else ""
        self.console.print(
            f"epoch {where}/{_count(epochs)}  loss {row['train_loss']:.4f}  "
            f"{val_loss}{scores}{images}({row['seconds']:.1f}s){mark}",
            highlight=False,
            soft_wrap=True,  # one line per epoch, also in a log file narrower than it
        )

    def _budget_reached(self, event: BudgetReached) -> None:
        self.console.print(
            f"time budget {_duration(event.budget_s)} reached after {_duration(event.elapsed_s)}: "
            f"stopped at epoch {event.epoch_fraction:.2f} (step {event.step:,})",
            highlight=False,
        )

    def _interrupted(self, event: Interrupted) -> None:
        self.console.print(
            f"[yellow]interrupted[/] after epoch {event.epoch}; continue with "
            f"`medsight train --resume {event.run}`"
        )

    def _early_stop(self, event: EarlyStopped) -> None:
        self.console.print(f"early stop: no {event.monitor} gain for {event.patience} epochs")

    def _training_end(self, event: TrainingEnd) -> None:
        fraction = event.best_fraction
        if fraction is None or float(fraction).is_integer():
            where = f"best epoch {event.best_epoch}"
        else:
            where = f"best at epoch {fraction:.2f}"
        self.console.print(
            f"{where}: val {event.monitor} {abs(event.best_score):.4f}; run saved in {event.run}",
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


def plan_line(event: TrainingPlan) -> str:
    """``plan: 3.4 epochs (2,180 steps of 64 images) in 10m at 312 img/s, ETA 11:52,
    validating every 400 steps`` (and what each part rests on, when it helps)."""
    steps = f"{event.steps:,} steps of {event.batch_size} images"
    if event.steps_done:
        steps += f", {event.steps_done:,} done"
    why = ""
    if event.basis == "auto":
        why = f"; auto for {event.n_train:,} training images"
    unit = "epoch" if event.epochs == 1 else "epochs"
    text = f"plan: {_count(event.epochs)} {unit} ({steps}{why})"
    if event.budget_s is not None:
        text += " in " if event.basis == "time" else " within "
        text += _duration(event.budget_s)
        left = event.budget_left_s
        if left is not None and event.steps_done:
            text += f" ({_duration(left)} left)"
    if event.images_per_s:
        text += f" at {event.images_per_s:,.0f} img/s"
    if event.finish_at is not None:
        text += f", ETA {datetime.fromtimestamp(event.finish_at):%H:%M}"
    if event.val_every is None:
        text += ", validating once per epoch"
    else:
        text += f", validating every {event.val_every:,} steps"
        if event.subsample:
            text += f" on {event.subsample:,} of {event.n_val:,} images, all at each epoch end"
    return text


def progress_info(event: TrainingProgress) -> str:
    """``312 img/s · epoch 0:41 · run 6:10 · budget 7:02 left`` (the parts known so far)."""
    parts = []
    if event.images_per_s:
        parts.append(f"{event.images_per_s:,.0f} img/s")
    if event.epoch_left_s is not None:
        parts.append(f"epoch {_clock(event.epoch_left_s)}")
    if event.run_left_s is not None:
        parts.append(f"run {_clock(event.run_left_s)}")
    if event.budget_left_s is not None:
        parts.append(f"budget {_clock(event.budget_left_s)} left")
    return " · ".join(parts)


def _count(epochs: float) -> str:
    """``12``, ``3.4`` or ``1.83`` (planned passes)."""
    return f"{epochs:.2f}".rstrip("0").rstrip(".")


def _clock(seconds: float) -> str:
    """``0:41``, ``12:05``, ``1:02:03``."""
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _duration(seconds: float) -> str:
    """``40s``, ``10m``, ``1h30m``, ``2m05s``: a budget as it is usually written."""
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes:02d}m" if hours and minutes else "")
    if not hours:
        text = (f"{minutes}m" if minutes else "") + (
            f"{secs:02d}s" if minutes and secs else (f"{secs}s" if not minutes else "")
        )
    return text or "0s"


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


# --------------------------------------------------------------------------- evaluation


def _value_ci(entry: dict | None) -> tuple[str, str]:
    entry = entry or {}
    return format_number(entry.get("value")), format_ci(entry.get("ci")) or ""


def evaluation_tables(metrics: dict, headline: Sequence[str], title: str) -> list[Table]:
    """``medsight evaluate``'s tables: the task's headline metrics with 95 % CIs, then its
    per-class (one-vs-rest) or per-finding table, whichever ``metrics.json`` holds."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95 % CI", justify="right")
    for name in headline:
        table.add_row(name, *_value_ci(metrics.get(name)))
    tables = [table]
    classes = metrics.get("per_class") or {}
    if classes:
        per_class = Table(title="Per class (one-vs-rest)", title_justify="left")
        per_class.add_column("metric")
        for name in classes:
            per_class.add_column(name, justify="right")
        for column in [c for c in next(iter(classes.values())) if c != "support"]:
            per_class.add_row(column, *(_count_or_value(v[column]) for v in classes.values()))
        if any("support" in v for v in classes.values()):
            per_class.add_row("support", *(str(v.get("support", "")) for v in classes.values()))
        tables.append(per_class)
    if metrics.get("per_finding"):
        tables.append(findings_table(metrics["per_finding"]))
    return tables


def _count_or_value(entry: object) -> str:
    """A count (lesions, images: an int) as it is; a metric with its CI."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        return str(entry)
    return format_value_ci(entry)


def findings_table(per_finding: dict) -> Table:
    """One row per finding: its positives among the known images, prevalence, AUROC and AP
    with 95 % CIs, and sensitivity / specificity at its Youden threshold."""
    # Values and intervals in columns of their own, none wrapping: the table fits 80 columns
    # with finding names of up to ~16 characters.
    table = Table(
        title="Per finding",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 0, 0, 1),
        show_edge=False,
    )
    table.add_column("finding", no_wrap=True)
    for column in ("pos/n", "prev.", "AUROC", "95 % CI", "AP", "95 % CI", "sens/spec*"):
        table.add_column(column, justify="right", no_wrap=True)
    table.caption = "* at each finding's Youden threshold"
    table.caption_justify = "left"
    for name, entry in per_finding.items():
        known = entry["n_positive"] + entry["n_negative"]
        youden = (entry.get("operating_points") or {}).get("youden")
        at = (
            f"{format_number(youden['sensitivity'], 2)}/{format_number(youden['specificity'], 2)}"
            if youden
            else format_number(None)
        )
        table.add_row(
            name,
            f"{entry['n_positive']:,}/{known:,}",
            format_number(entry["prevalence"]["value"]),
            format_number(entry["auroc"]["value"]),
            format_ci(entry["auroc"].get("ci")) or "",
            format_number(entry["average_precision"]["value"]),
            format_ci(entry["average_precision"].get("ci")) or "",
            at,
        )
    return table


#: The columns ``medsight compare`` shows for a classification run (its key metric first).
COMPARE_COLUMNS = ("auroc", "accuracy", "balanced_accuracy", "f1_macro")


def comparison_tables(result: dict, key_metrics: Sequence[str]) -> list[Table]:
    """``medsight compare``'s tables: each run's metrics (the classification columns, or else
    ``key_metrics``) and its paired difference against the first run; for tasks that test each
    finding too, a table of those differences."""
    first = result["runs"][0]["metrics"]
    columns = [m for m in COMPARE_COLUMNS if m in first] or list(key_metrics)
    key = (result["runs"][1].get("paired") or {}).get("metric") if len(result["runs"]) > 1 else None
    delta_name = "Δ mean AUROC" if key == "auroc_macro" else "ΔAUROC"
    table = Table(title=f"{result['n_shared']:,} shared samples", title_justify="left")
    table.add_column("run")
    for name in columns:
        table.add_column(name, justify="right")
    table.add_column(f"{delta_name} vs first (95 % CI)", justify="right")
    table.add_column("p", justify="right")
    for row in result["runs"]:
        paired = row.get("paired")
        table.add_row(
            row["run"],
            *(format_value_ci(row["metrics"].get(m)) for m in columns),
            _difference(paired) if paired else "",
            _p_value(paired) if paired else "",
        )
    tables = [table]
    for row in result["runs"][1:]:
        per_finding = (row.get("paired") or {}).get("per_finding")
        if not per_finding:
            continue
        detail = Table(title=f"{row['run']} vs first, per finding", title_justify="left")
        for column in ("finding", "AUROC", "AUROC of first", "Δ (95 % CI)", "p"):
            detail.add_column(column, justify="left" if column == "finding" else "right")
        for name, paired in per_finding.items():
            detail.add_row(
                name,
                format_number(paired.get("auroc_a")),
                format_number(paired.get("auroc_b")),
                _difference(paired),
                _p_value(paired),
            )
        tables.append(detail)
    return tables


def _difference(paired: dict) -> str:
    """``+0.031 (+0.004–+0.060)``; the undefined mark when there is no difference."""
    difference, ci = paired.get("difference"), paired.get("ci")
    if difference is None:
        return format_number(None)
    text = f"{difference:+.3f}"
    return f"{text} ({ci[0]:+.3f}–{ci[1]:+.3f})" if ci else text


def _p_value(paired: dict) -> str:
    p = paired.get("p_value")
    return format_number(None) if p is None else f"{p:.3g}"
