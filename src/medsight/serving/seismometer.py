"""The worklist's reviews as post-deployment outcomes for seismometer, beside the evaluation.

Each reviewed study scored by the run becomes one prediction row, written as
:mod:`medsight.evaluation.seismometer` writes an evaluation: ``PatientId`` (the pseudonym the
study already carries; for a study without a patient, one made from its worklist number),
``EncounterId`` (``study-<worklist number>``: no patient information, and it lets an auditor
open the study in the worklist), ``ScoreTime`` (when it was received and scored: real times
here), one score per class and cohort attributes (the model version, the modality and the
clinical context: priority, setting, age band). The reviewer's label becomes one event per
class, ``"<class> (reviewer)"``, at the time of the review, Value 1 or 0; the events' window
spans the longest wait for review, so each study's review counts for it.

Studies not reviewed yet are left out: seismometer would count a prediction without its event
as negative.

>>> store = WorklistStore("sqlite:///work/worklist.db", "work")  # doctest: +SKIP
>>> export_worklist("runs/cxr", store, "seismometer/reviews")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from medsight import runs
from medsight.data.privacy import pseudonymise
from medsight.errors import DataError
from medsight.evaluation import seismometer as sm
from medsight.evaluation.subgroups import bin_numeric
from medsight.serving.worklist import Study, WorklistStore, utc
from medsight.tasks import get_task

#: Context fields exported as cohorts (those some study has).
CONTEXT_COHORTS = ("priority", "setting")


def review_event(name: str) -> str:
    """The event type of a reviewer's label for class ``name``."""
    return f"{name} (reviewer)"


def export_worklist(
    run_path: str | Path, store: WorklistStore, out: str | Path, *, primary: str | None = None
) -> sm.SeismometerExport:
    """Write the reviewed studies that ``run_path``'s model scored as a seismometer folder."""
    run = runs.Run.load(run_path)
    task = get_task(run.task)
    reviewed = [s for s in store.list("reviewed") if s.reviewer_label is not None]
    ours = [s for s in reviewed if s.model_run == run.path.name]
    if not ours:
        scored_by = sorted({s.model_run for s in reviewed})
        raise DataError(
            f"the worklist has no reviewed study scored by the run {run.path.name!r}"
            + (f" (reviewed studies were scored by {scored_by})" if scored_by else "")
            + "; review studies first, or give the run that served them"
        )
    ours.sort(key=lambda s: s.id)
    outputs = task.prediction_columns(run.classes)
    predictions = pd.DataFrame(
        {
            sm.ENTITY: [s.patient or pseudonymise(f"worklist-study-{s.id}") for s in ours],
            sm.CONTEXT: [f"study-{s.id}" for s in ours],
            sm.PREDICT_TIME: _times([s.received_at for s in ours]),
        }
    )
    for column, name in zip(outputs, run.classes):
        predictions[column] = [float(s.probabilities.get(name, np.nan)) for s in ours]
    cohorts = _cohorts(ours)
    for name, values in cohorts.items():
        predictions[name] = sm.cohort_values(values)

    labels = [s.reviewer_label for s in ours]
    truth = sm.truth_matrix(labels, run.classes, single_label=task.samples_by_class)
    review_times = _times([s.reviewed_at for s in ours])
    events = sm.one_vs_rest_events(
        predictions[[sm.ENTITY, sm.CONTEXT]], review_times, truth, run.classes, review_event
    )
    waits = (review_times - predictions[sm.PREDICT_TIME]).dt.total_seconds() / 3600
    result = sm.write_export(
        out,
        predictions=predictions,
        events=events,
        classes=run.classes,
        outputs=outputs,
        primary_class=sm.primary_class(run, primary),
        event_name=review_event,
        window_hr=float(max(1, math.ceil(waits.max()))),
        cohorts=list(cohorts),
        model_name=sm.model_name(run),
        thresholds=sm.evaluated_thresholds(run, sm.primary_class(run, primary)),
        about=(
            f"the worklist's reviewed studies scored by the run `{run.path.name}` "
            f"({len(ours)} studies), each with the reviewer's label as its outcome"
        ),
        time_note=(
            "ScoreTime is when the study was received and scored, EventTime when it was "
            "reviewed (UTC)"
        ),
        event_text="1 when the reviewer's label includes {name}, else 0",
    )
    waiting = [s for s in store.list() if s.model_run == run.path.name and s.status != "reviewed"]
    if waiting:
        result.notes.append(
            f"{len(waiting)} {'study' if len(waiting) == 1 else 'studies'} not reviewed yet "
            "left out (seismometer would count a study without its review as negative)"
        )
    return result


def _times(values) -> pd.Series:
    """UTC times without a zone (seismometer compares zone-less times)."""
    stamps = pd.to_datetime([utc(v) for v in values], utc=True)
    return pd.Series(stamps.tz_localize(None), dtype="datetime64[us]")


def _cohorts(studies: list[Study]) -> dict[str, pd.Series]:
    """Model version and modality always; priority, setting and age band where a study has
    them."""
    context = [s.context or {} for s in studies]
    columns = {
        "model_version": pd.Series([s.model_version for s in studies], dtype=object),
        "modality": pd.Series([s.modality for s in studies], dtype=object),
    }
    for name in CONTEXT_COHORTS:
        if any(c.get(name) is not None for c in context):
            columns[name] = pd.Series([c.get(name) for c in context], dtype=object)
    ages = [c.get("age_years") for c in context]
    if any(a is not None for a in ages):
        columns["age_band"] = bin_numeric([np.nan if a is None else a for a in ages])
    return columns
