"""``medsight cv``: patient-grouped, stratified k-fold cross-validation of one training recipe.

The train+val images are cut into ``k`` folds (:func:`~medsight.data.splits.kfold_assignments`:
no patient in two folds, class shares as even as grouping allows); the test split is never
touched. Fold ``i`` is an ordinary run (``PARENT/fold_i``) trained with fold ``i`` as its
validation split, so its validation predictions are out-of-fold (OOF). ``cv.json`` holds
per-fold metrics, their mean ± sd, and the pooled OOF metrics with bootstrap CIs; ``cv.html``
shows them. By default the fold models are then combined into ``PARENT/ensemble`` and tested.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pandas as pd

from medsight import runs
from medsight.config import TrainConfig
from medsight.errors import ConfigError
from medsight.events import FoldStart, Reporter, silent
from medsight.stats import UNDEFINED, format_ci, format_number, format_value_ci

HEADLINE = ("auroc", "accuracy", "balanced_accuracy", "f1_macro", "brier", "ece")


def check_folds(config: TrainConfig, folds: int) -> pd.DataFrame:
    """Read and split the data once, and refuse ``folds`` the data cannot support (the error
    names the maximum: the patient count of the smallest class). Returns the split table."""
    from medsight.data.findings import is_multilabel
    from medsight.data.sources import load_samples
    from medsight.data.splits import assign_splits, kfold_assignments
    from medsight.tasks import task_for

    table = load_samples(config.data.path, options=config.data)
    found = task_for(config.task, table)
    if is_multilabel(table) or found != "classify":
        what = "boxes" if found == "detect" else "several findings per image"
        raise ConfigError(
            "medsight cv pools single-label classifiers' out-of-fold predictions; these data "
            f"have {what}. Train and evaluate one {found} run instead "
            "(`medsight train` then `medsight evaluate`), or choose a fold with "
            "--set data.folds=K --set data.fold=I"
        )
    table = assign_splits(table, ratios=config.data.ratios, seed=config.seed)
    development = table[table["split"].isin(["train", "val"])]
    kfold_assignments(development, folds=folds, seed=config.seed)
    return table


def cross_validate(
    config: TrainConfig,
    folds: int = 5,
    *,
    ensemble: bool = True,
    weighted: bool = False,
    n_bootstrap: int = 1000,
    overwrite: bool = False,
    resume: bool = False,
    events: Reporter | None = None,
    show_progress: bool = True,
) -> dict:
    """Train ``config`` once per fold under ``config.out`` and summarise; returns ``cv.json``.

    ``resume`` keeps the folds already finished in ``config.out`` and trains the rest.
    ``events`` hears of each fold and of its training (:mod:`medsight.events`).
    """
    from medsight.evaluation.evaluate import evaluate_run, load_table, select_split
    from medsight.inference import Predictor
    from medsight.tasks.classify_metrics import compute_metrics
    from medsight.training.trainer import train
    from medsight.workflows.ensemble import build_ensemble

    events = events or silent
    if config.data.folds is not None:
        raise ConfigError("the config already names a fold (data.fold); cv sets it per fold")
    check_folds(config, folds)
    parent = Path(config.out)
    if not resume:
        runs.prepare_run_dir(parent, overwrite=overwrite)
    parent.mkdir(parents=True, exist_ok=True)
    runs.write_text(parent / runs.CONFIG, config.to_yaml())

    per_fold, oof_parts = [], []
    classes: list[str] = []
    positive = ""
    for k in range(folds):
        fold_dir = parent / f"fold_{k}"
        fold_config = config.with_overrides(
            {"data.folds": folds, "data.fold": k, "out": str(fold_dir)}
        )
        done = (fold_dir / runs.METRICS).exists() and (fold_dir / runs.WEIGHTS).exists()
        if resume and done:
            events(FoldStart(k, folds, kept=True))
        else:
            events(FoldStart(k, folds))
            train(fold_config, overwrite=True, events=events, show_progress=show_progress)
            evaluate_run(fold_dir, split="test", n_bootstrap=0)  # the fold's own test metrics
        run = runs.Run.load(fold_dir)
        classes, positive = run.classes, run.positive_class
        val = select_split(run, load_table(run, None), "val")
        probs = Predictor(run, run.load_model(), run.config.device).predict_table(val)
        y = np.array([classes.index(v) for v in val["label"]])
        val_metrics = compute_metrics(y, probs, classes, positive=positive, n_bootstrap=0)
        test_metrics = _read_metrics(fold_dir)
        per_fold.append(
            {
                "fold": k,
                "run": str(fold_dir),
                "n_train": int((run.splits()["split"] == "train").sum()),
                "n_val": len(val),
                "val": _headline(val_metrics),
                "test": _headline(test_metrics),
            }
        )
        part = pd.DataFrame({"sample_id": val["sample_id"], "fold": k, "label": val["label"]})
        for j, name in enumerate(classes):
            part[f"p_{name}"] = probs[:, j]
        oof_parts.append(part)

    oof = pd.concat(oof_parts, ignore_index=True)
    runs.write_text(parent / runs.CV_OOF, oof.to_csv(index=False))
    y_oof = np.array([classes.index(v) for v in oof["label"]])
    probs_oof = oof[[f"p_{c}" for c in classes]].to_numpy()
    pooled = compute_metrics(
        y_oof, probs_oof, classes, positive=positive, n_bootstrap=n_bootstrap, seed=config.seed
    )
    summary = {
        "folds": folds,
        "seed": config.seed,
        "data": config.data.path,
        "classes": classes,
        "positive_class": positive,
        "per_fold": per_fold,
        "mean_sd": {
            split: {m: _mean_sd([f[split][m] for f in per_fold]) for m in HEADLINE}
            for split in ("val", "test")
        },
        "oof": {
            "n": len(oof),
            **{m: pooled[m] for m in HEADLINE if m in pooled},
            "confusion_matrix": pooled.get("confusion_matrix"),
        },
        "ensemble": None,
    }
    if ensemble:
        target = parent / "ensemble"
        build_ensemble(
            [f["run"] for f in per_fold], target, weighted=weighted, overwrite=True, events=events
        )
        metrics = evaluate_run(target, split="test", n_bootstrap=n_bootstrap, seed=config.seed)
        summary["ensemble"] = {
            "run": str(target),
            "weighting": "validation" if weighted else "equal",
            "n_test": metrics.get("n"),
            **{m: metrics[m] for m in HEADLINE if m in metrics},
        }
    runs.write_json(parent / runs.CV_JSON, summary)
    runs.write_text(parent / runs.CV_HTML, render_html(summary, oof, classes, positive))
    return summary


def _read_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / runs.METRICS).read_text())


def _headline(metrics: dict) -> dict:
    out = {}
    for name in HEADLINE:
        entry = metrics.get(name)
        out[name] = _float(entry["value"] if isinstance(entry, dict) else entry)
    return out


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _mean_sd(values: list[float]) -> dict:
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return {"mean": None, "sd": None}
    sd = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "sd": sd}


# --------------------------------------------------------------------------- HTML


def render_html(summary: dict, oof: pd.DataFrame, classes: list[str], positive: str) -> str:
    """A self-contained page: fold table, mean ± sd, pooled OOF with CIs, the ensemble's test
    metrics and the per-fold OOF ROC curves (embedded PNG), from ``templates/cv.html.j2``."""
    from medsight.evaluation.report import HEADLINE_TILES, render_page

    labels = {key: label for key, label, _ in HEADLINE_TILES}
    test_columns = ("auroc", "accuracy")
    ensemble = summary["ensemble"]
    return render_page(
        "cv.html.j2",
        folds=summary["folds"],
        seed=summary["seed"],
        data_path=str(summary["data"]),
        out_path=str(Path(summary["per_fold"][0]["run"]).parent),
        positive=positive,
        n_oof=summary["oof"]["n"],
        tiles=_tiles(summary, labels),
        metrics=[labels.get(m, m) for m in HEADLINE],
        test_metrics=[labels.get(m, m) for m in test_columns],
        per_fold=[
            {
                "fold": f["fold"],
                "n_val": f["n_val"],
                "cells": [format_number(f["val"][m]) for m in HEADLINE]
                + [format_number(f["test"][m]) for m in test_columns],
            }
            for f in summary["per_fold"]
        ],
        mean_sd=[_mean_sd_cell(summary["mean_sd"]["val"][m]) for m in HEADLINE]
        + [_mean_sd_cell(summary["mean_sd"]["test"][m]) for m in test_columns],
        pooled=[
            {
                "label": labels.get(m, m),
                "oof": format_value_ci(summary["oof"].get(m)),
                "ensemble": format_value_ci((ensemble or {}).get(m)),
            }
            for m in HEADLINE
        ],
        ensemble=ensemble,
        roc=_roc_figure(oof, classes, positive),
    )


def _tiles(summary: dict, labels: dict) -> list[dict]:
    """The summary tiles: pooled out-of-fold metrics, the mean fold AUROC and the ensemble."""
    oof, ensemble = summary["oof"], summary["ensemble"]
    mean = summary["mean_sd"]["val"]["auroc"]
    tiles = [
        _tile(f"{labels['auroc']}, pooled out-of-fold", oof.get("auroc"), f"n = {oof['n']}"),
        _tile(f"{labels['accuracy']}, pooled out-of-fold", oof.get("accuracy"), f"n = {oof['n']}"),
        _tile(
            f"{labels['auroc']}, mean over folds",
            mean["mean"],
            f"{summary['folds']} validation folds",
            detail=f"sd {format_number(mean['sd'])}",
        ),
    ]
    if ensemble:
        tiles.append(
            _tile(
                f"{labels['auroc']}, ensemble on test",
                ensemble.get("auroc"),
                f"n = {ensemble.get('n_test')}",
            )
        )
    return tiles


def _tile(label: str, entry, note: str, detail: str | None = None) -> dict:
    """A tile: a metric entry (``{"value", "ci"}`` or a number), its CI unless ``detail``."""
    value, ci = (entry.get("value"), entry.get("ci")) if isinstance(entry, dict) else (entry, None)
    text = format_number(value)
    if detail is None:
        interval = format_ci(ci)
        detail = f"95 % CI {interval}" if interval else "no CI"
    return {
        "label": label,
        "text": text,
        "undefined": text == UNDEFINED,
        "detail": detail,
        "note": note,
    }


def _mean_sd_cell(entry: dict) -> dict:
    if entry["mean"] is None:
        return {"mean": UNDEFINED, "sd": None}
    return {"mean": format_number(entry["mean"]), "sd": format_number(entry["sd"])}


def _roc_figure(oof: pd.DataFrame, classes: list[str], positive: str) -> dict:
    from sklearn.metrics import roc_curve

    from medsight.evaluation.report import embed_figure, new_figure

    fig = new_figure(5.2, 5.2)
    ax = fig.add_subplot()
    for fold, part in oof.groupby("fold"):
        truth = part["label"] == positive
        if truth.nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(truth, part[f"p_{positive}"])
        ax.plot(fpr, tpr, lw=1, alpha=0.7, label=f"fold {fold}")
    truth = oof["label"] == positive
    if truth.nunique() == 2:
        fpr, tpr, _ = roc_curve(truth, oof[f"p_{positive}"])
        ax.plot(fpr, tpr, lw=2.2, color="black", label="pooled")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(loc="lower right")
    return embed_figure(fig, "Out-of-fold ROC curves per fold and pooled")
