"""``medsight cv``: patient-grouped, stratified k-fold cross-validation of one training recipe.

The train+val images are cut into ``k`` folds (:func:`~medsight.data.splits.kfold_assignments`:
no patient in two folds, class shares as even as grouping allows); the test split is never
touched. Fold ``i`` is an ordinary run (``PARENT/fold_i``) trained with fold ``i`` as its
validation split, so its validation predictions are out-of-fold (OOF). ``cv.json`` holds
per-fold metrics, their mean ± sd, and the pooled OOF metrics with bootstrap CIs; ``cv.html``
shows them. By default the fold models are then combined into ``PARENT/ensemble`` and tested.
"""

from __future__ import annotations

import html
import json
import statistics
from pathlib import Path

import numpy as np
import pandas as pd

from medsight import runs
from medsight.config import TrainConfig
from medsight.errors import ConfigError
from medsight.events import FoldStart, Reporter, silent
from medsight.stats import UNDEFINED, format_number, format_value_ci

HEADLINE = ("auroc", "accuracy", "balanced_accuracy", "f1_macro", "brier", "ece")


def check_folds(config: TrainConfig, folds: int) -> pd.DataFrame:
    """Read and split the data once, and refuse ``folds`` the data cannot support (the error
    names the maximum: the patient count of the smallest class). Returns the split table."""
    from medsight.data.sources import load_samples
    from medsight.data.splits import assign_splits, kfold_assignments

    table = assign_splits(
        load_samples(config.data.path, options=config.data),
        ratios=config.data.ratios,
        seed=config.seed,
    )
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
        probs = Predictor(run, run.load_model()).predict_table(val)
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
    metrics and the per-fold OOF ROC curves (embedded PNG)."""
    e = html.escape

    cell, ci = format_number, format_value_ci

    head = "".join(f"<th>{e(m)}</th>" for m in HEADLINE)
    rows = []
    for f in summary["per_fold"]:
        rows.append(
            f"<tr><td>{f['fold']}</td><td>{f['n_val']}</td>"
            + "".join(f"<td>{cell(f['val'][m])}</td>" for m in HEADLINE)
            + "".join(f"<td>{cell(f['test'][m])}</td>" for m in ("auroc", "accuracy"))
            + "</tr>"
        )
    ms = summary["mean_sd"]

    def mean_sd(split, m) -> str:
        entry = ms[split][m]
        return UNDEFINED if entry["mean"] is None else f"{entry['mean']:.3f} ± {entry['sd']:.3f}"

    rows.append(
        "<tr class='sum'><td>mean ± sd</td><td></td>"
        + "".join(f"<td>{mean_sd('val', m)}</td>" for m in HEADLINE)
        + "".join(f"<td>{mean_sd('test', m)}</td>" for m in ("auroc", "accuracy"))
        + "</tr>"
    )
    pooled = "".join(
        f"<tr><td>{e(m)}</td><td>{ci(summary['oof'].get(m))}</td>"
        f"<td>{ci((summary['ensemble'] or {}).get(m))}</td></tr>"
        for m in HEADLINE
    )
    ensemble_note = (
        f"Ensemble of the {summary['folds']} fold models ({e(summary['ensemble']['weighting'])} "
        f"weights) on the test split, n = {summary['ensemble'].get('n_test')}: "
        f"run <code>{e(summary['ensemble']['run'])}</code>."
        if summary["ensemble"]
        else "No ensemble was built (--no-ensemble)."
    )
    figure = _roc_figure(oof, classes, positive)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medsight cross-validation</title>
<style>
body{{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#1b2a35}}
table{{border-collapse:collapse;margin:1rem 0}}
td,th{{padding:.3rem .6rem;border-bottom:1px solid #dde3e8;text-align:right}}
td:first-child,th:first-child{{text-align:left}}
tr.sum td{{font-weight:600;border-top:2px solid #1b2a35}}
.banner{{background:#fdecea;color:#8a1c12;padding:.5rem 1rem;border-radius:6px}}
</style></head><body>
<p class="banner">Research use only — not for diagnosis.</p>
<h1>Cross-validation: {summary["folds"]} folds</h1>
<p>Data <code>{e(str(summary["data"]))}</code>; folds grouped by patient and stratified by class
over train+val (seed {summary["seed"]}); the test split was held out from every fold.</p>
<h2>Per fold</h2>
<table><tr><th>fold</th><th>n val</th>{head}<th>test auroc</th><th>test accuracy</th></tr>
{"".join(rows)}</table>
<h2>Pooled out-of-fold and ensemble (95 % bootstrap CI)</h2>
<p>Out-of-fold: every train+val image predicted by the one model that never trained on it
(n = {summary["oof"]["n"]}). {ensemble_note}</p>
<table><tr><th>metric</th><th>pooled OOF</th><th>ensemble, test</th></tr>{pooled}</table>
<h2>Out-of-fold ROC curves ({e(positive)} vs rest)</h2>
<img alt="ROC curves per fold" src="{figure}" width="520">
</body></html>
"""


def _roc_figure(oof: pd.DataFrame, classes: list[str], positive: str) -> str:
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
    return embed_figure(fig, "Out-of-fold ROC curves")["src"]
