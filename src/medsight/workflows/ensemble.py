"""``medsight ensemble``: several runs of one task combined into a run that behaves like any other.

The ensemble run holds one :class:`~medsight.models.ensemble.EnsembleClassifier` — the members'
weights, each member's temperature (fitted on that member's own validation split, so the
probabilities averaged are calibrated ones) and its weight — plus the usual run files, so
``evaluate``, ``report``, ``explain``, ``export``, ``predict`` and ``serve`` need no special case.
``ensemble.json`` lists the member runs and how each was weighted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medsight import runs
from medsight.errors import ConfigError, DataError
from medsight.events import EnsembleSaved, Note, Reporter, silent


def build_ensemble(
    members: Sequence[str | Path],
    out: str | Path,
    *,
    weighted: bool = False,
    calibrate: bool = True,
    overwrite: bool = False,
    events: Reporter | None = None,
) -> runs.Run:
    """Combine the runs ``members`` into a new run at ``out`` and return it.

    ``calibrate``: fit a temperature per member on its validation split (a member's own
    ``calibration.json`` is used when it has one). ``weighted``: weight members by validation
    skill, ``max(AUROC − 0.5, 0.001)``, instead of equally. The test split of the ensemble is
    the samples every member held out as test; samples any member trained on are never tested.
    ``events`` hears of members resized or left out of the test split (:mod:`medsight.events`).

    >>> build_ensemble(["runs/cv/fold_0", "runs/cv/fold_1"], "runs/cv-ensemble")  # doctest: +SKIP
    """
    from medsight.models.ensemble import EnsembleClassifier

    events = events or silent
    loaded = _load_members(members)
    first = loaded[0]
    temperatures, skills = [], []
    for run in loaded:
        temperature, skill = _member_calibration(run, calibrate, need_skill=weighted)
        temperatures.append(temperature)
        skills.append(skill)
    weights = [max(s - 0.5, 1e-3) for s in skills] if weighted else [1.0] * len(loaded)

    model = EnsembleClassifier(
        [run.load_model() for run in loaded],
        weights=weights,
        temperatures=temperatures,
        preprocess=first.preprocess.to_dict(),
        member_preprocess=[run.preprocess.to_dict() for run in loaded],
    )
    resized = [
        str(run.path) for run in loaded if tuple(run.preprocess.size) != first.preprocess.size
    ]
    if resized:
        events(
            Note(
                f"{len(resized)} member(s) take another input size; the ensemble resizes its "
                f"{first.preprocess.size[0]} px input for them (bilinear): {resized}"
            )
        )

    target = runs.prepare_run_dir(out, overwrite=overwrite)
    splits, leaked = _ensemble_splits(loaded)
    if leaked:
        events(
            Note(
                f"{leaked} sample(s) are test images for some members but were trained or "
                "validated on by others; they are left out of the ensemble's test split"
            )
        )
    config = first.config.with_overrides({"out": str(target)})
    runs.write_text(target / runs.CONFIG, config.to_yaml())
    runs.save_weights(target / runs.WEIGHTS, model.state_dict())
    runs.write_json(
        target / runs.MODEL,
        {
            **model.config(),
            "image_size": list(first.preprocess.size),
            "mode": "ensemble",
            "frozen_stages": None,
            "pretrained_source": None,
        },
    )
    first.preprocess.save(target / runs.PREPROCESS)
    runs.write_json(
        target / runs.CLASSES, {"classes": first.classes, "positive": first.positive_class}
    )
    runs.write_json(target / runs.VERSIONS, runs.library_versions())
    runs.write_text(target / runs.SPLITS, splits.to_csv(index=False))
    total = float(sum(weights))
    runs.write_json(
        target / runs.ENSEMBLE,
        {
            "members": [
                {
                    "run": str(run.path.resolve()),
                    "model": run.model_config.get("name"),
                    "weight": w / total,
                    "temperature": t,
                    "val_auroc": s,
                }
                for run, w, t, s in zip(loaded, weights, temperatures, skills)
            ],
            "weighting": "validation AUROC above chance" if weighted else "equal",
            "calibrated": calibrate,
        },
    )
    events(EnsembleSaved(target, tuple(w / total for w in weights)))
    return runs.Run.load(target)


def _load_members(members: Sequence[str | Path]) -> list[runs.Run]:
    if len(members) < 2:
        raise ConfigError(f"an ensemble needs at least 2 runs, got {len(members)}")
    loaded = [runs.Run.load(m) for m in members]
    paths = [run.path.resolve() for run in loaded]
    if len(set(paths)) != len(paths):
        raise ConfigError("the same run is listed twice; each member must be a different run")
    for run in loaded:
        if run.task != "classify":
            raise ConfigError(
                f"{run.path} is a {run.task} run; `medsight ensemble` averages single-label "
                "classifiers (softmax probabilities of one class per image) only"
            )
        if not (run.path / runs.WEIGHTS).exists():
            raise DataError(f"{run.path} has no {runs.WEIGHTS}: the run never finished an epoch")
    first = loaded[0]
    for run in loaded[1:]:
        if run.classes != first.classes:
            raise DataError(
                f"{run.path} has classes {run.classes}, {first.path} has {first.classes}; "
                "an ensemble averages probabilities of the same classes in the same order"
            )
    return loaded


def _member_calibration(run: runs.Run, calibrate: bool, need_skill: bool) -> tuple[float, float]:
    """(temperature, validation AUROC) of one member; AUROC is NaN when not needed."""
    from medsight.calibration import TemperatureScaler, apply_calibration
    from medsight.evaluation.evaluate import load_table, select_split
    from medsight.inference import Predictor
    from medsight.tasks.classify_metrics import headline_scores

    saved = run.calibration()
    if saved is not None and saved.get("method") != "temperature":
        raise ConfigError(f"{run.path}: only temperature calibration can be ensembled")
    if not calibrate and not need_skill:
        return 1.0, float("nan")
    try:
        val = select_split(run, load_table(run, None), "val")
    except (DataError, FileNotFoundError, OSError) as exc:
        raise DataError(
            f"{run.path}: its validation images are needed to calibrate or weight it, "
            f"but cannot be read ({exc}); pass --no-calibrate (and no --weighted)"
        ) from None
    y = np.array([run.classes.index(v) for v in val["label"]])
    logits = Predictor(run, run.load_model()).logits_table(val)
    if not calibrate:
        temperature = 1.0
    elif saved is not None:
        temperature = float(saved["temperature"])
    else:
        temperature = float(TemperatureScaler().fit(logits, y).temperature_)
    probs = apply_calibration(logits, {"method": "temperature", "temperature": temperature})
    positive = run.classes.index(run.positive_class)
    skill = headline_scores(y, probs, positive)["auroc"]
    return temperature, 0.5 if skill is None else float(skill)


def _ensemble_splits(loaded: list[runs.Run]) -> tuple[pd.DataFrame, int]:
    """One split per sample: ``test`` where every member held it out, ``val`` where every
    member validated on it, else ``train``; and how many test samples of some member leaked."""
    tables = [run.splits().set_index("sample_id") for run in loaded]
    base = tables[0].copy()
    splits = pd.concat([t["split"].rename(i) for i, t in enumerate(tables)], axis=1)
    all_test = (splits == "test").all(axis=1)
    any_test = (splits == "test").any(axis=1)
    all_val = (splits == "val").all(axis=1)
    merged = np.where(all_test, "test", np.where(all_val, "val", "train"))
    base = base.reindex(splits.index)
    base["split"] = merged
    return base.reset_index(), int((any_test & ~all_test).sum())
