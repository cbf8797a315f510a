"""``medsight compare``: evaluated runs side by side, with a paired test of AUROC differences."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medsight import runs
from medsight.errors import DataError
from medsight.tasks import get_task


def compare_runs(paths: Sequence[str | Path], *, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """The task's metrics of each run on the samples all of them were evaluated on, and for each
    run after the first the task's paired bootstrap difference against the first (for
    classification: AUROC). The runs must share their task and classes."""
    if len(paths) < 2:
        raise DataError("compare needs at least two runs")
    loaded = []
    for path in paths:
        run = runs.Run.load(path)
        predictions_path = run.path / runs.PREDICTIONS
        if not predictions_path.exists():
            raise DataError(
                f"{run.path} has not been evaluated yet: run `medsight evaluate {path}`"
            )
        loaded.append((run, runs.read_predictions(predictions_path)))
    first_classes = loaded[0][0].classes
    first_task = loaded[0][0].task
    for run, _ in loaded[1:]:
        if run.task != first_task:
            hints = [get_task(t).compare_hint for t in (first_task, run.task)]
            raise DataError(
                f"{run.path} is a {run.task!r} run, {loaded[0][0].path} a {first_task!r} run; "
                "only runs of the same task can be compared"
                + "".join(f"; {hint}" for hint in hints if hint)
            )
        if run.classes != first_classes:
            raise DataError(
                f"{run.path} has classes {run.classes}, {loaded[0][0].path} has {first_classes}; "
                "only runs of the same task can be compared"
            )
    shared = set.intersection(*(set(p["sample_id"]) for _, p in loaded))
    if not shared:
        raise DataError("the runs were evaluated on different samples: none in common")
    order = sorted(shared)
    task = get_task(first_task)
    if not task.compares_runs:
        raise DataError(f"medsight compare does not test {task.name} runs: {task.compare_hint}")
    columns = task.prediction_columns(first_classes)
    aligned = [p.set_index("sample_id").loc[order] for _, p in loaded]
    y = task.targets(aligned[0]["label"], first_classes)
    positive = loaded[0][0].positive_class
    rows = []
    base_probs = aligned[0][columns].to_numpy()
    for (run, _), frame in zip(loaded, aligned):
        probs = frame[columns].to_numpy()
        metrics = task.metrics(
            y, probs, first_classes, positive, n_bootstrap=n_bootstrap, seed=seed
        )
        row = {"run": str(run.path), "metrics": metrics}
        if rows:
            row["paired"] = task.paired_difference(
                y, probs, base_probs, first_classes, positive, n_bootstrap=n_bootstrap, seed=seed
            )
        rows.append(row)
    return {"n_shared": len(order), "runs": rows}
