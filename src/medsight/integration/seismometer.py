"""A run's predictions as the folder Epic's open-source seismometer loads, for validation there.

seismometer (``pip install seismometer``, github.com/epic-open-source/seismometer) reads a
*predictions* table (one row per scored image: its keys, the time it was scored, the model's
scores and the cohort attributes) and an *events* table in long format (the keys, ``Type``,
``EventTime``, ``Value``) that it merges onto the predictions by keys and time.
``config.yml`` says where the files are, ``usage_config.yml`` which column is what (keys,
outputs, cohorts, events with their windows), ``dictionary.yml`` what each column means, and
``metadata.json`` the model's name and the thresholds its plots mark. What medsight writes:

* keys: ``PatientId``, the patient's salted pseudonym (:func:`medsight.data.privacy.pseudonymise`;
  the image's own when the data have no ``patient_id``), and ``EncounterId``, the image's
  (one scored image is one encounter). No raw identifier leaves medsight.
* ``ScoreTime``: an evaluation has no clock times, so every image is scored at
  :data:`REFERENCE_TIME` and its ground truth happens at that same instant (a 1-hour window
  ending at it, offset 0): seismometer's windowed merge then pairs each image with its own
  label. Post-deployment exports (the worklist's reviews) carry the real times instead.
* one score column per class, ``p_<class>`` as in ``predictions.csv``: for a classifier each
  class's probability against the rest (one-vs-rest), for findings each finding's, for a
  detector each class's top box score; the primary output is the positive class's (else the
  first class's, or ``primary``).
* one event per image and class, ``"<class> (ground truth)"``, Value 1 or 0 (an uncertain
  finding has none).
* cohorts: the ``--by`` columns as text; numbers with more than 10 values in decade bands, as
  medsight's own subgroup analysis bins them.

>>> export_evaluation("runs/cxr", "seismometer/cxr", by=["sex", "site"])  # doctest: +SKIP

The worklist's reviews as post-deployment outcomes for seismometer, beside the evaluation.

Each reviewed study scored by the run becomes one prediction row, written as
an evaluation is written: ``PatientId`` (the pseudonym the
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

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from medsight import runs
from medsight.data.findings import multi_hot
from medsight.data.privacy import pseudonymise
from medsight.errors import ConfigError, DataError
from medsight.evaluation.subgroups import MISSING, bin_numeric
from medsight.serving.worklist import Study, WorklistStore, utc
from medsight.tasks import get_task

#: The prediction (and event) time of every row of an evaluation export: medsight's
#: evaluation has no clock times, and seismometer's merge needs one.
REFERENCE_TIME = pd.Timestamp("2000-01-01 00:00:00")
#: The names of the files seismometer reads, as ``config.yml`` points at them.
PREDICTIONS_FILE = "predictions.parquet"
EVENTS_FILE = "events.parquet"
CONFIG_FILE = "config.yml"
USAGE_FILE = "usage_config.yml"
DICTIONARY_FILE = "dictionary.yml"
METADATA_FILE = "metadata.json"
README_FILE = "README.md"
#: The key and time columns of both tables.
ENTITY = "PatientId"
CONTEXT = "EncounterId"
PREDICT_TIME = "ScoreTime"
#: The events table's own columns (seismometer's defaults for ``event_table``).
EVENT_TYPE, EVENT_TIME, EVENT_VALUE = "Type", "EventTime", "Value"
#: Columns that identify a patient or an image: never a cohort.
IDENTIFIERS = ("patient_id", "sample_id", "path", "source", "study_uid")
#: The hours before an event that a prediction counts for it (evaluation: the same instant).
TRUTH_WINDOW_HR = 1.0
#: seismometer's smallest cohort shown (it hides cohorts of this many rows or fewer).
CENSOR_MIN_COUNT = 10


def truth_event(name: str) -> str:
    """The event type of the ground truth of class ``name`` in an evaluation export."""
    return f"{name} (ground truth)"


@dataclass
class SeismometerExport:
    """What was written: the folder, the two tables' row counts and what the config names."""

    path: Path
    predictions: int
    events: int
    primary_output: str
    primary_target: str
    outputs: list[str]
    cohorts: list[str]
    notes: list[str] = field(default_factory=list)


def export_evaluation(
    run_path: str | Path,
    out: str | Path,
    *,
    by: Sequence[str] | None = None,
    primary: str | None = None,
) -> SeismometerExport:
    """Write an evaluated run's ``predictions.csv`` as a seismometer folder at ``out``.

    ``by``: the cohort columns (default: those ``metrics.json`` has subgroups for, i.e. the
    ``--by`` columns of the last ``medsight evaluate``); ``primary``: the class whose score is
    seismometer's primary output (default: the run's positive class, else its first).
    """
    run = runs.Run.load(run_path)
    task = get_task(run.task)
    path = run.path / runs.PREDICTIONS
    if not path.is_file():
        raise DataError(
            f"{run.path} has no {runs.PREDICTIONS}: run `medsight evaluate {run.path}` first "
            "(or pass --seismometer DIR to it)"
        )
    text = {"sample_id": str, "label": str, "patient_id": str}
    table = runs.read_csv(path, dtype=text, keep_default_na=False, na_values=[""])
    if by is None:
        metrics = run.path / runs.METRICS
        by = list(json.loads(metrics.read_text()).get("subgroups", {})) if metrics.is_file() else []
    outputs = task.prediction_columns(run.classes)
    missing = [c for c in outputs if c not in table.columns]
    if missing:
        raise DataError(f"{path} lacks the score column(s) {missing}: evaluate the run again")
    cohorts = _cohort_names(by, table, outputs)
    main = primary_class(run, primary)

    # an image without a patient ID stands for its own patient
    patients = table["sample_id"]
    if "patient_id" in table.columns:
        patients = table["patient_id"].where(table["patient_id"].notna(), patients)
    predictions = pd.DataFrame(
        {
            ENTITY: [pseudonymise(p) for p in patients],
            CONTEXT: [pseudonymise(s) for s in table["sample_id"]],
            PREDICT_TIME: pd.Series([REFERENCE_TIME] * len(table), dtype="datetime64[us]"),
        }
    )
    for name in outputs:
        predictions[name] = table[name].astype(np.float64)
    for name in cohorts:
        predictions[name] = cohort_values(table[name])

    truth = truth_matrix(table["label"], run.classes, single_label=task.samples_by_class)
    notes = []
    uncertain = int(np.isnan(truth).sum())
    if uncertain:
        notes.append(
            f"{uncertain} uncertain finding label(s) have no ground-truth event; seismometer "
            "counts an image without one as negative for that finding"
        )
    events = one_vs_rest_events(
        predictions[[ENTITY, CONTEXT]], predictions[PREDICT_TIME], truth, run.classes, truth_event
    )
    result = write_export(
        out,
        predictions=predictions,
        events=events,
        classes=run.classes,
        outputs=outputs,
        primary_class=main,
        event_name=truth_event,
        window_hr=TRUTH_WINDOW_HR,
        cohorts=cohorts,
        model_name=model_name(run),
        thresholds=evaluated_thresholds(run, main),
        about=(
            f"the evaluated predictions of the run `{run.path.name}` ({len(predictions)} images), "
            "each with its ground truth"
        ),
        time_note=(
            f"medsight's evaluation has no clock times: every image is scored at "
            f"{REFERENCE_TIME} and its ground truth happens at that instant"
        ),
    )
    result.notes.extend(notes)
    return result


def truth_matrix(labels: Sequence, classes: Sequence[str], *, single_label: bool) -> np.ndarray:
    """``(N, K)`` float: 1 where class ``k`` is (one of) the image's label(s), 0 where it is
    not, NaN for an uncertain finding (``?name``). ``single_label``: each label is one class
    name; else findings joined by ``|`` or ``"no finding"``. An unknown name is refused."""
    classes = list(classes)
    if not single_label:
        return multi_hot(list(labels), classes).astype(np.float64)
    unknown = sorted({str(v) for v in labels} - set(classes))
    if unknown:
        raise DataError(f"label(s) {unknown} are not classes of this run; classes: {classes}")
    return (np.asarray(labels, dtype=object)[:, None] == np.asarray(classes)[None, :]).astype(
        np.float64
    )


def one_vs_rest_events(
    keys: pd.DataFrame,
    times: pd.Series,
    truth: np.ndarray,
    classes: Sequence[str],
    event_name,
) -> pd.DataFrame:
    """The long events table: per row of ``keys`` and per class, an event
    ``event_name(class)`` at that row's time with Value 1 or 0 (none where truth is NaN)."""
    parts = []
    for k, name in enumerate(classes):
        known = ~np.isnan(truth[:, k])
        part = keys[known].reset_index(drop=True)
        part[EVENT_TYPE] = event_name(name)
        part[EVENT_TIME] = times[known].reset_index(drop=True)
        part[EVENT_VALUE] = truth[known, k].astype(np.int64)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def cohort_values(values: pd.Series) -> pd.Series:
    """A cohort column as seismometer selects on it: text, numbers with more than 10 values
    in decade bands (as :func:`medsight.evaluation.subgroups.bin_numeric`), ``"missing"`` for
    none."""
    if pd.api.types.is_numeric_dtype(values) and values.nunique() > 10:
        values = bin_numeric(values)
    text = values.astype(object).where(values.notna(), MISSING)
    return text.map(str).astype(object)


def write_export(
    out: str | Path,
    *,
    predictions: pd.DataFrame,
    events: pd.DataFrame,
    classes: Sequence[str],
    outputs: Sequence[str],
    primary_class: str,
    event_name,
    window_hr: float,
    cohorts: Sequence[str],
    model_name: str,
    thresholds: Sequence[float],
    about: str,
    time_note: str,
    event_text: str = "1 when the image's ground truth includes {name}, else 0",
    usage: str = "target",
) -> SeismometerExport:
    """Write the tables and the configuration seismometer reads into the folder ``out``.

    ``predictions`` has the key and time columns, ``outputs`` (one score per class, in class
    order) and ``cohorts``; ``events`` is long (keys, ``Type``, ``EventTime``, ``Value``),
    one type ``event_name(class)`` per class, each a ``usage`` event (target, outcome)
    counted for a prediction up to ``window_hr`` hours before it and described by
    ``event_text`` (formatted with the class ``name``).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give --seismometer a folder")
    primary_output = outputs[list(classes).index(primary_class)]
    primary_target = event_name(primary_class)
    _write_parquet(out / PREDICTIONS_FILE, predictions)
    _write_parquet(out / EVENTS_FILE, events)
    config = {
        "other_info": {
            "usage_config": USAGE_FILE,
            "info_dir": "outputs",
            "prediction_definition": DICTIONARY_FILE,
            "event_definition": DICTIONARY_FILE,
            # seismometer reads data_dir from the folder it is started in: this one.
            "data_dir": ".",
            "prediction_path": PREDICTIONS_FILE,
            "event_path": EVENTS_FILE,
            "metadata_path": METADATA_FILE,
        }
    }
    usage_config = {
        "data_usage": {
            "entity_id": ENTITY,
            "context_id": CONTEXT,
            "primary_output": primary_output,
            "primary_target": primary_target,
            "predict_time": PREDICT_TIME,
            # seismometer's first output is the one its notebook opens on: the primary
            "outputs": [primary_output, *[o for o in outputs if o != primary_output]],
            "cohorts": [{"source": name, "display_name": name} for name in cohorts],
            "event_table": {"type": EVENT_TYPE, "time": EVENT_TIME, "value": EVENT_VALUE},
            "events": [
                {
                    "source": event_name(name),
                    "display_name": event_name(name),
                    "window_hr": window_hr,
                    "offset_hr": 0,
                    "usage": usage,
                    "aggregation_method": "max",
                    "merge_strategy": "forward",
                }
                for name in classes
            ],
            "censor_min_count": CENSOR_MIN_COUNT,
        }
    }
    dictionary = {
        "predictions": [
            _item(ENTITY, "object", "the patient's salted pseudonym (never the raw ID)"),
            _item(CONTEXT, "object", "the scored image's (study's) pseudonym: one encounter"),
            _item(PREDICT_TIME, "datetime64[ns]", f"when the image was scored; {time_note}"),
            *[
                _item(column, "float64", f"the model's score for {name} (one-vs-rest)")
                for column, name in zip(outputs, classes)
            ],
            *[_item(name, "object", f"cohort attribute {name!r}") for name in cohorts],
        ],
        "events": [
            _item(event_name(name), "int64", event_text.format(name=name)) for name in classes
        ],
    }
    runs.write_text(out / CONFIG_FILE, _yaml(config))
    runs.write_text(out / USAGE_FILE, _yaml(usage_config))
    runs.write_text(out / DICTIONARY_FILE, _yaml(dictionary))
    metadata = {"modelname": model_name, "thresholds": [float(t) for t in thresholds]}
    runs.write_json(out / METADATA_FILE, metadata)
    runs.write_text(
        out / README_FILE,
        _readme(about, time_note, len(predictions), len(events), primary_output, primary_target),
    )
    return SeismometerExport(
        path=out,
        predictions=len(predictions),
        events=len(events),
        primary_output=primary_output,
        primary_target=primary_target,
        outputs=list(outputs),
        cohorts=list(cohorts),
    )


def primary_class(run: runs.Run, primary: str | None) -> str:
    """``primary`` (checked), else the run's positive class, else its first class."""
    if primary is not None:
        if primary not in run.classes:
            raise ConfigError(
                f"--primary {primary!r} is not a class of this run; classes: {run.classes}"
            )
        return primary
    return run.positive_class if run.positive_class in run.classes else run.classes[0]


def model_name(run: runs.Run) -> str:
    """The model's name as seismometer shows it: architecture and run folder."""
    return f"{run.model_config.get('name', 'model')} (medsight run {run.path.name})"


def evaluated_thresholds(run: runs.Run, name: str) -> list[float]:
    """The primary class's evaluated operating thresholds, highest first (0.5 without any)."""
    metrics = run.path / runs.METRICS
    points = {}
    if metrics.is_file():
        points = (json.loads(metrics.read_text()).get("thresholds") or {}).get(name) or {}
    found = {
        round(float(p["threshold"]), 4)
        for p in points.values()
        if isinstance(p, dict) and p.get("threshold") is not None
    }
    found = {t for t in found if 0 < t < 1}  # 1.0: a point that calls nothing positive
    return sorted(found, reverse=True) or [0.5]


# --------------------------------------------------------------------------- helpers


def _cohort_names(by: Sequence[str], table: pd.DataFrame, outputs: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(by))
    taken = [c for c in names if c in (ENTITY, CONTEXT, PREDICT_TIME, *outputs)]
    if taken:
        raise DataError(f"--by {taken[0]} is a column the export makes itself; choose another")
    identifiers = [c for c in names if c in IDENTIFIERS]
    if identifiers:
        raise DataError(
            f"--by {identifiers[0]} identifies a patient or an image, not a cohort; the export "
            "keeps it only as a pseudonym (PatientId, EncounterId)"
        )
    unknown = [c for c in names if c not in table.columns]
    if unknown:
        raise DataError(
            f"cohort column(s) {unknown} are not in predictions.csv; available: "
            f"{[c for c in table.columns if c not in IDENTIFIERS]}"
        )
    return names


def _item(name: str, dtype: str, definition: str) -> dict:
    return {"name": name, "dtype": dtype, "definition": definition}


def _yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    try:
        import pyarrow  # noqa: F401 - pandas writes Parquet with it
    except ImportError:
        raise ConfigError(
            "the seismometer export writes Parquet, which needs pyarrow: pip install pyarrow"
        ) from None
    runs.write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


def _readme(
    about: str, time_note: str, n_predictions: int, n_events: int, output: str, target: str
) -> str:
    return f"""# For seismometer

This folder holds {about}, written by medsight for Epic's open-source seismometer
(github.com/epic-open-source/seismometer).

- `{PREDICTIONS_FILE}`: {n_predictions} rows, one per scored image: `{ENTITY}` and
  `{CONTEXT}` (salted pseudonyms), `{PREDICT_TIME}`, one score per class, the cohorts;
- `{EVENTS_FILE}`: {n_events} rows in long format: `{ENTITY}`, `{CONTEXT}`, `{EVENT_TYPE}`,
  `{EVENT_TIME}`, `{EVENT_VALUE}` (1 or 0), one per image and class;
- `{CONFIG_FILE}` (where the files are), `{USAGE_FILE}` (which column is what),
  `{DICTIONARY_FILE}` (what each column means), `{METADATA_FILE}` (model name, thresholds).

Primary output `{output}`, primary target `{target}`. Times: {time_note}.

## Open it

seismometer needs pandas < 3, so give it an environment of its own:

    python -m venv seismometer-env
    seismometer-env/bin/pip install seismometer
    seismometer-env/bin/jupyter lab

then, in a notebook in this folder (the paths in `{CONFIG_FILE}` are relative to it):

    import seismometer as sm
    sm.run_startup(config_path=".")
    sm.show_info()
    sm.ExploreModelEvaluation()
"""


# --------------------------------------------------------------------------- the worklist


#: Context fields exported as cohorts (those some study has).
CONTEXT_COHORTS = ("priority", "setting")


def review_event(name: str) -> str:
    """The event type of a reviewer's label for class ``name``."""
    return f"{name} (reviewer)"


def export_worklist(
    run_path: str | Path, store: WorklistStore, out: str | Path, *, primary: str | None = None
) -> SeismometerExport:
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
            ENTITY: [s.patient or pseudonymise(f"worklist-study-{s.id}") for s in ours],
            CONTEXT: [f"study-{s.id}" for s in ours],
            PREDICT_TIME: _times([s.received_at for s in ours]),
        }
    )
    for column, name in zip(outputs, run.classes):
        predictions[column] = [float(s.probabilities.get(name, np.nan)) for s in ours]
    cohorts = _cohorts(ours)
    for name, values in cohorts.items():
        predictions[name] = cohort_values(values)

    labels = [s.reviewer_label for s in ours]
    truth = truth_matrix(labels, run.classes, single_label=task.samples_by_class)
    review_times = _times([s.reviewed_at for s in ours])
    events = one_vs_rest_events(
        predictions[[ENTITY, CONTEXT]], review_times, truth, run.classes, review_event
    )
    waits = (review_times - predictions[PREDICT_TIME]).dt.total_seconds() / 3600
    result = write_export(
        out,
        predictions=predictions,
        events=events,
        classes=run.classes,
        outputs=outputs,
        primary_class=primary_class(run, primary),
        event_name=review_event,
        window_hr=float(max(1, math.ceil(waits.max()))),
        cohorts=list(cohorts),
        model_name=model_name(run),
        thresholds=evaluated_thresholds(run, primary_class(run, primary)),
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
