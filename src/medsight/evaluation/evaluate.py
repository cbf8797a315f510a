"""``medsight evaluate``: predict a run's split, then write predictions.csv and metrics.json.

Reads only the run directory and the data; the numbers come from the run's task (its metric
set and calibration) and :mod:`.subgroups`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from medsight import runs
from medsight.errors import DataError
from medsight.evaluation.subgroups import bin_numeric, subgroup_metrics
from medsight.inference import Predictor
from medsight.tasks import Task, get_task


def load_table(run: runs.Run, data: str | Path | None, split: str = "test") -> pd.DataFrame:
    """The run's own data with its recorded splits, or other data (all of it one split)."""
    table = get_task(run.task).prepare_table(run.load_data(data))
    if data is not None and table["split"].isna().all():
        table = table.assign(split=split)  # an external set: all of it is evaluated
    return table


def select_split(
    run: runs.Run, table: pd.DataFrame, split: str, task: Task | None = None
) -> pd.DataFrame:
    """The labelled rows of ``split``; refuses classes (or findings) the run does not know."""
    task = task or get_task(run.task)
    rows = table[table["split"] == split]
    if rows.empty:
        raise DataError(
            f"the {split} split is empty (splits present: "
            f"{sorted(table['split'].dropna().unique())}); choose one with --split"
        )
    if task.samples_by_class:  # a label is one class name
        extra = sorted(set(rows["label"].dropna()) - set(run.classes))
        if extra:
            raise DataError(
                f"the data has class(es) {extra} that the run does not know; "
                f"the run's classes are {run.classes}"
            )
    else:  # the task reads its own labels (findings "a|b") and names what it cannot use
        task.table_targets(rows[rows["label"].notna()], run.classes)
    if rows["label"].isna().any():
        raise DataError(f"{int(rows['label'].isna().sum())} {split} images have no label")
    return rows.reset_index(drop=True)


def evaluate_run(
    path: str | Path,
    *,
    data: str | Path | None = None,
    split: str = "test",
    by: Sequence[str] = (),
    n_bootstrap: int = 1000,
    calibrate: bool = False,
    seed: int = 0,
    backend: str = "torch",
    tta: str | None = None,
    device: str = "cpu",
) -> dict:
    """Evaluate the run at ``path``; writes ``predictions.csv`` and ``metrics.json`` into it.

    The metrics are the run's task's; ``predictions.csv`` holds ``sample_id``, the true
    ``label``, the ``predicted`` label (the task's decoded prediction), the task's probability
    columns and the data's other columns.

    ``backend`` runs the network with torch or ONNX Runtime (see :class:`Predictor`); ``tta``
    averages test-time augmented views (``"flip"`` or ``"rot"``, where the modality allows);
    ``device`` is where it runs (:func:`medsight.devices.resolve_device`).
    """
    run = runs.Run.load(path)
    if not (run.path / runs.WEIGHTS).exists():
        raise DataError(f"{run.path} has no {runs.WEIGHTS}: the run never finished an epoch")
    table = load_table(run, data, split)
    available = [c for c in table.columns if c not in ("sample_id", "source")]
    missing = [c for c in by if c not in available]
    if missing:
        raise DataError(f"--by column(s) {missing} not in the data; available: {available}")
    predictor = Predictor.from_run(run.path, backend=backend, tta=tta, device=device)
    task = predictor.task
    if calibrate:
        val = select_split(run, table, "val", task)
        y_val = task.table_targets(val, run.classes)
        predictor.calibration = task.calibrate(predictor.logits_table(val), y_val)
        runs.write_json(run.path / runs.CALIBRATION, predictor.calibration)
    rows = select_split(run, table, split, task)
    probs = predictor.predict_table(rows)
    y = task.table_targets(rows, run.classes)
    metrics = task.metrics(
        y, probs, run.classes, run.positive_class, n_bootstrap=n_bootstrap, seed=seed
    )
    metrics["split"] = split
    metrics["data"] = str(data or run.config.data.path)
    metrics["calibration"] = predictor.calibration
    metrics["tta"] = predictor.tta
    metrics["subgroups"] = {}
    for column in by:
        groups = rows[column]
        if pd.api.types.is_numeric_dtype(groups) and groups.nunique() > 10:
            groups = bin_numeric(groups)
        metrics["subgroups"][column] = subgroup_metrics(
            y,
            probs,
            run.classes,
            groups,
            column=column,
            positive=run.positive_class,
            n_bootstrap=n_bootstrap,
            seed=seed,
            task=task,
        )
    predictions = pd.DataFrame(
        {
            "sample_id": rows["sample_id"],
            "label": rows["label"],
            "predicted": [p["label"] for p in predictor.decode(probs)],
        }
    )
    values = task.column_values(probs, run.classes)
    for k, name in enumerate(task.prediction_columns(run.classes)):
        predictions[name] = values[:, k]
    for name, column in task.prediction_extras(rows, probs, run.classes).items():
        predictions[name] = column
    meta = [c for c in rows.columns if c not in ("sample_id", "source", "label", "split")]
    meta = [c for c in meta if c not in predictions.columns]
    predictions = pd.concat([predictions, rows[meta].reset_index(drop=True)], axis=1)
    runs.write_text(run.path / runs.PREDICTIONS, predictions.to_csv(index=False))
    runs.write_json(run.path / runs.METRICS, metrics)
    return metrics
