"""The self-contained HTML report of an evaluated run: headline metrics, curves, calibration,
operating points, subgroups, training history, example images and a model card, in one file.
The page has the sections its run's task lists (:data:`SECTIONS` names them all).

It reads only the run directory (and, for the example thumbnails, the run's data). Figures are
matplotlib PNGs embedded as ``data:`` URIs and the page carries its own CSS, so the file opens
offline and can be mailed as it is. The page is rendered from ``templates/report.html.j2`` with
autoescaping on: class names, paths and metadata values are shown, never interpreted.

>>> write_report("runs/pneumonia")            # doctest: +SKIP
PosixPath('runs/pneumonia/report.html')
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsight import runs
from medsight.calibration import bin_index, reliability_curve
from medsight.errors import ConfigError, DataError
from medsight.evaluation import modelcard
from medsight.stats import UNDEFINED, format_ci, format_number
from medsight.tasks import Task, get_task
from medsight.tasks.classify_metrics import ECE_BINS
from medsight.tasks.multilabel_metrics import DECISION_THRESHOLD

__all__ = ["SECTIONS", "render_page", "write_report"]

TEMPLATE = "report.html.j2"

#: Headline metrics shown as tiles: key in metrics.json, label, whether higher is better.
HEADLINE_TILES = (
    ("accuracy", "Accuracy", True),
    ("balanced_accuracy", "Balanced accuracy", True),
    ("auroc", "AUROC", True),
    ("average_precision", "Average precision", True),
    ("f1_macro", "F1 (macro)", True),
    ("log_loss", "Log loss", False),
    ("brier", "Brier score", False),
    ("ece", "ECE", False),
)
#: The tiles of a multi-label run: its macro / micro headline.
MULTILABEL_TILES = (
    ("auroc_macro", "AUROC (macro)", True),
    ("auroc_micro", "AUROC (micro)", True),
    ("average_precision_macro", "Average precision (macro)", True),
    ("average_precision_micro", "Average precision (micro)", True),
    ("hamming_loss", "Hamming loss", False),
    ("subset_accuracy", "Subset accuracy", True),
    ("label_ranking_average_precision", "Label ranking AP", True),
)
#: The tiles of a detection run (its image-level AUROC is the multi-label ``auroc_macro``).
DETECTION_TILES = (
    ("map50", "mAP @ IoU 0.5", True),
    ("map", "mAP @ IoU 0.5:0.95", True),
    ("sensitivity_at_1fp", "Lesion sensitivity at 1 FP / image", True),
    ("froc_score", "FROC score (mean of 7 points)", True),
    ("median_iou", "Median IoU of found lesions", True),
)
#: Every tile by its metrics.json key: the summary shows the task's headline metrics that
#: have one, in the task's order.
TILES = {
    key: (label, higher)
    for key, label, higher in (*HEADLINE_TILES, *MULTILABEL_TILES, *DETECTION_TILES)
}
#: The tile drawn as the key one.
KEY_TILES = ("auroc", "auroc_macro", "map50")
#: The sections that show boxes (the summary then describes the run as a detector).
DETECTION_SECTIONS = ("detection", "froc", "detection_pr", "detection_gallery")
OPERATING_POINTS = (
    ("sensitivity_0.90", "Sensitivity ≥ 0.90"),
    ("sensitivity_0.95", "Sensitivity ≥ 0.95"),
    ("youden", "Youden (max sens + spec − 1)"),
)
PER_CLASS_COLUMNS = (
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("precision", "Precision (PPV)"),
    ("npv", "NPV"),
    ("f1", "F1"),
)
SUBGROUP_COLUMNS = (
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Bal. accuracy"),
    ("auroc", "AUROC"),
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("precision", "Precision"),
    ("auroc_macro", "AUROC (macro)"),
    ("average_precision_macro", "AP (macro)"),
    ("hamming_loss", "Hamming loss"),
    ("sensitivity_at_1fp", "Sensitivity at 1 FP/image"),
    ("map50", "mAP @ 0.5"),
    ("median_iou", "Median IoU"),
)
#: The subgroup gaps the model card quotes, those of the task's subgroup metrics.
GAP_METRICS = (
    ("auroc", "AUROC"),
    ("sensitivity", "sensitivity"),
    ("sensitivity_at_1fp", "lesion sensitivity at 1 FP/image"),
    ("auroc_macro", "mean AUROC"),
    ("average_precision_macro", "mean average precision"),
)
#: Colour-blind-safe class colours (Okabe & Ito), then matplotlib's defaults for many classes.
CLASS_COLOURS = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#000000",
    "#F0E442",
)
ACCENT = "#1d4ed8"
INK = "#1f2933"
MUTED = "#7b8794"
DPI = 144
CSS_PX_PER_INCH = 100  # figure inches → displayed CSS pixels (10 pt text shows at ~14 px)
SMALL_TEST_SET = 200
THUMBNAIL_SIDE = 224

_SPLIT_ORDER = ("train", "val", "test")
_MONITOR_LABELS = {
    "auroc": "validation AUROC",
    "accuracy": "validation accuracy",
    "balanced_accuracy": "validation balanced accuracy",
    "average_precision": "validation average precision",
    "map50": "validation mAP @ IoU 0.5",
    "map": "validation mAP @ IoU 0.5:0.95",
    "loss": "validation loss",
}
_STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "axes.edgecolor": "#9aa5b1",
    "axes.labelcolor": INK,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e4e7eb",
    "grid.linewidth": 0.8,
    "xtick.color": "#52606d",
    "ytick.color": "#52606d",
    "legend.frameon": False,
    "legend.fontsize": 9,
    "text.color": INK,
    "text.parse_math": False,  # class names with "$" are names, not TeX
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}


def write_report(run: str | Path, *, out: str | Path | None = None, examples: int = 4) -> Path:
    """Write the run's self-contained ``report.html`` (default ``RUN/report.html``), return it.

    Needs the files ``medsight evaluate`` writes (``metrics.json``, ``predictions.csv``).
    The page has the sections the run's task lists (:attr:`~medsight.tasks.Task.report_sections`,
    names from :data:`SECTIONS`), in its order.
    ``examples`` is how many correctly and how many wrongly classified images are shown
    (0: none, so the report embeds no patient image). When the images cannot be read (the data
    moved), the report says so instead of showing them.

    >>> write_report("runs/chest", out="chest-report.html", examples=6)   # doctest: +SKIP
    PosixPath('chest-report.html')
    """
    if isinstance(examples, bool) or int(examples) != examples or examples < 0:
        raise ConfigError(f"examples must be a whole number ≥ 0; got {examples!r}")
    loaded = runs.Run.load(run)
    missing = [f for f in (runs.METRICS, runs.PREDICTIONS) if not (loaded.path / f).is_file()]
    if missing:
        raise DataError(
            f"{loaded.path} has no {' or '.join(missing)}: the run has not been evaluated; "
            f"run `medsight evaluate {loaded.path}` first"
        )
    try:
        metrics = json.loads((loaded.path / runs.METRICS).read_text())
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{loaded.path / runs.METRICS} is not valid JSON ({exc}); "
            f"run `medsight evaluate {loaded.path}` again"
        ) from None
    task = get_task(loaded.task)
    unknown = [name for name in task.report_sections if name not in SECTIONS]
    if unknown:
        raise ConfigError(
            f"task {task.name!r} lists report section(s) {unknown} that the report does not "
            f"have; sections: {list(SECTIONS)}"
        )
    predictions = runs.read_predictions(loaded.path / runs.PREDICTIONS)
    y, probs = _labels_and_probs(predictions, task, loaded.classes, loaded.path)

    target = Path(out) if out is not None else loaded.path / runs.REPORT
    if target.is_dir():
        target = target / runs.REPORT
    page = _Page(loaded, task, metrics, predictions, y, probs, int(examples))
    context = _build_context(page)
    html = render_page(TEMPLATE, **context)
    runs.write_atomic(target, lambda tmp: tmp.write_text(html, encoding="utf-8"))
    return target


# --------------------------------------------------------------------------- reading


def render_page(template: str, **context: Any) -> str:
    """One of the pages in ``evaluation/templates`` (the run report, ``cv.html.j2``,
    ``tune.html.j2``) rendered to HTML with autoescaping on, in the frame of ``base.html.j2``.

    ``context`` holds the template's variables; ``medsight_version`` and ``generated`` (now) are
    filled in when absent. A variable the template uses but ``context`` lacks is an error.

    >>> render_page("tune.html.j2", **context)     # doctest: +SKIP
    '<!DOCTYPE html>\n<html lang="en">…'
    """
    import medsight

    defaults = {
        "medsight_version": medsight.__version__,
        "generated": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }
    return _environment().get_template(template).render({**defaults, **context})


@functools.cache
def _environment():
    import jinja2

    templates = files("medsight.evaluation") / "templates"
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: (templates / name).read_text(encoding="utf-8")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _labels_and_probs(pred: pd.DataFrame, task: Task, classes: list[str], run: Path):
    """The task's targets and the probability columns of ``predictions.csv``."""
    columns = task.prediction_columns(classes)
    lacking = [c for c in ("sample_id", "label", "predicted", *columns) if c not in pred.columns]
    if lacking:
        raise DataError(
            f"{run / runs.PREDICTIONS} lacks column(s) {lacking} for the run's classes {classes}; "
            f"run `medsight evaluate {run}` again"
        )
    try:
        y = task.targets(pred["label"], classes)
    except DataError as exc:
        raise DataError(
            f"{run / runs.PREDICTIONS}: {exc}; run `medsight evaluate {run}` again"
        ) from None
    probs = pred[columns].to_numpy(dtype=np.float64)
    return y, probs


def _read_optional_csv(path: Path, **kwargs) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path, **kwargs)
    except (FileNotFoundError, pd.errors.EmptyDataError, pd.errors.ParserError):
        return None


def _read_optional_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- formatting


def _cell(entry: Any, digits: int = 3) -> dict:
    """A metric for the template: shown text, CI text, and the exact value for the tooltip."""
    if isinstance(entry, dict):
        value, ci = entry.get("value"), entry.get("ci")
    else:
        value, ci = entry, None
    text = format_number(value, digits)
    if text == UNDEFINED:
        return {"undefined": True, "text": UNDEFINED, "ci": None, "exact": None}
    return {"undefined": False, "text": text, "ci": format_ci(ci, digits), "exact": repr(value)}


def _plot_label(text: str, limit: int = 22) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- figures


def new_figure(width: float, height: float, **kwargs):
    """A matplotlib Figure (no pyplot: safe in threads) sized in inches, at the report's DPI."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained", **kwargs)


def embed_figure(fig, alt: str) -> dict:
    """The figure as an embedded PNG: ``{"src": "data:image/png;base64,…", "width", "alt"}``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    data = buf.getvalue()
    width_px = struct.unpack(">I", data[16:20])[0]
    return {
        "src": "data:image/png;base64," + base64.b64encode(data).decode("ascii"),
        "width": round(width_px / DPI * CSS_PX_PER_INCH),
        "alt": alt,
    }


def _style():
    from matplotlib import rc_context

    return rc_context(_STYLE)


def _class_colour(k: int) -> str:
    if k < len(CLASS_COLOURS):
        return CLASS_COLOURS[k]
    from matplotlib import colormaps

    return colormaps["tab20"](k % 20)


def _matrix_panel(ax, values, title, fmt, vmax, labels, *, cmap: str, size: float) -> None:
    """One annotated square matrix (confusion, co-occurrence): cells shaded up to ``vmax``,
    each written with ``fmt`` ("—" when undefined), the diagonal in bold."""
    k = len(labels)
    rotate = k > 3 or max(len(s) for s in labels) > 8
    ax.imshow(np.nan_to_num(values, nan=0.0), cmap=cmap, vmin=0, vmax=vmax, aspect="equal")
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    for i in range(k):
        for j in range(k):
            v = values[i, j]
            dark = np.isfinite(v) and v > 0.55 * vmax
            ax.text(
                j, i, "—" if not np.isfinite(v) else fmt(v), ha="center", va="center",
                fontsize=size, color="white" if dark else INK,
                fontweight="bold" if i == j else "normal",
            )  # fmt: skip
    ax.set_xticks(
        range(k), labels, rotation=35 if rotate else 0, ha="right" if rotate else "center"
    )
    ax.set_yticks(range(k), labels)
    ax.tick_params(length=0)
    ax.set_title(title, loc="left")


def _confusion_figure(cm: np.ndarray, classes: list[str]) -> dict:
    k = len(classes)
    side = max(3.4, 0.5 * k + 1.6)
    labels = [_plot_label(c, 16) for c in classes]
    support = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(support > 0, cm / np.maximum(support, 1), np.nan)
    size = 10 if k <= 6 else 8 if k <= 10 else 6
    with _style():
        fig = new_figure(2 * side + 0.6, side)
        axes = fig.subplots(1, 2)
        panels = (
            (cm.astype(float), "Counts", lambda v: f"{int(v)}", cm.max() or 1),
            (normalised, "Row-normalised", lambda v: f"{v:.2f}", 1),
        )
        for ax, (values, title, fmt, vmax) in zip(axes, panels):
            _matrix_panel(ax, values, title, fmt, vmax, labels, cmap="Blues", size=size)
            ax.set_xlabel("Predicted class")
            ax.set_ylabel("True class")
        return embed_figure(fig, "Confusion matrix: counts and row-normalised")


def _roc_pr_figure(y: np.ndarray, probs: np.ndarray, classes: list[str], metrics: dict):
    """ROC and precision–recall curves (one-vs-rest), with the operating points on the ROC."""
    from matplotlib.lines import Line2D
    from sklearn.metrics import auc as area
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

    k = len(classes)
    positive = metrics.get("positive")
    columns = [classes.index(positive)] if k == 2 and positive in classes else range(k)
    if k == 2 and positive not in classes:
        columns = [k - 1]
    skipped = []
    curves = []
    for c in columns:
        yb = y == c
        if yb.all() or not yb.any():
            skipped.append(classes[c])
            continue
        fpr, tpr, _ = roc_curve(yb, probs[:, c])
        precision, recall, _ = precision_recall_curve(yb, probs[:, c])
        curves.append(
            {
                "c": c,
                "fpr": fpr,
                "tpr": tpr,
                "precision": precision,
                "recall": recall,
                "auroc": area(fpr, tpr),
                "ap": average_precision_score(yb, probs[:, c]),
                "prevalence": float(yb.mean()),
            }
        )
    if not curves:
        return None, skipped
    markers = {"sensitivity_0.90": "o", "sensitivity_0.95": "s", "youden": "D"}
    outside = len(curves) > 4
    with _style():
        fig = new_figure(9.6 if outside else 9.0, 4.1)
        roc, pr = fig.subplots(1, 2)
        roc.plot([0, 1], [0, 1], ls="--", lw=1, color=MUTED, label="chance")
        for curve in curves:
            c = curve["c"]
            colour = _class_colour(c)
            name = _plot_label(classes[c])
            roc.plot(
                curve["fpr"],
                curve["tpr"],
                color=colour,
                lw=2,
                label=f"{name} (AUROC {curve['auroc']:.3f})",
            )
            pr.plot(
                curve["recall"],
                curve["precision"],
                color=colour,
                lw=2,
                label=f"{name} (AP {curve['ap']:.3f})",
                drawstyle="steps-post",
            )
            points = (metrics.get("thresholds") or {}).get(classes[c]) or {}
            for key, marker in markers.items():
                point = points.get(key)
                if not point or point.get("specificity") is None:
                    continue
                roc.plot(
                    1 - point["specificity"],
                    point["sensitivity"],
                    marker=marker,
                    ms=7,
                    mfc="white",
                    mec=colour,
                    mew=1.8,
                    ls="none",
                    zorder=5,
                )
        if len(curves) == 1:
            prevalence = curves[0]["prevalence"]
            pr.axhline(prevalence, ls="--", lw=1, color=MUTED, label=f"chance ({prevalence:.2f})")
        roc.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="1 − specificity (FPR)")
        roc.set_ylabel("Sensitivity (TPR)")
        roc.set_title("ROC", loc="left")
        roc.set_aspect("equal")
        pr.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="Recall (sensitivity)")
        pr.set_ylabel("Precision (PPV)")
        pr.set_title("Precision–recall", loc="left")
        pr.set_aspect("equal")
        handles = [
            Line2D([], [], marker=m, ls="none", mfc="white", mec=INK, mew=1.5, ms=7)
            for m in markers.values()
        ]
        where = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)} if outside else {}
        roc.legend(**({"loc": "lower right"} | where))
        fig.legend(
            handles,
            ["operating point: sensitivity ≥ 0.90", "sensitivity ≥ 0.95", "Youden"],
            loc="outside lower center",
            ncol=3,
            fontsize=8.5,
        )
        pr.legend(**({"loc": "best"} | where))
        return embed_figure(fig, "ROC and precision–recall curves"), skipped


def _reliability_figure(y: np.ndarray, probs: np.ndarray) -> dict:
    curve = reliability_curve(y, probs, n_bins=ECE_BINS)
    width = 1.0 / ECE_BINS
    confidence = np.asarray(curve["confidence"])
    accuracy = np.asarray(curve["accuracy"])
    count = np.asarray(curve["count"])
    left = bin_index(confidence, ECE_BINS) * width
    low = math.floor(10 / probs.shape[1]) / 10  # top-label confidence is at least 1/K
    with _style():
        fig = new_figure(5.2, 5.0)
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        top.bar(
            left,
            accuracy,
            width=width,
            align="edge",
            color=ACCENT,
            alpha=0.85,
            edgecolor="white",
            label="accuracy",
            zorder=2,
        )
        top.bar(
            left,
            confidence - accuracy,
            bottom=accuracy,
            width=width,
            align="edge",
            facecolor="none",
            edgecolor="#dc2626",
            lw=0.8,
            hatch="////",
            label="gap to mean confidence",
            zorder=3,
        )
        top.plot([0, 1], [0, 1], ls="--", lw=1, color=MUTED, label="perfect calibration")
        top.set(ylim=(0, 1.02), ylabel="Accuracy")
        top.set_title("Reliability (top-label confidence)", loc="left")
        fig.legend(loc="outside lower center", ncol=3, fontsize=8.5, handlelength=1.6)
        bottom.bar(left, count, width=width, align="edge", color="#9aa5b1", edgecolor="white")
        bottom.set(xlim=(low, 1.0), xlabel="Confidence (highest probability)", ylabel="Images")
        return embed_figure(fig, "Reliability diagram")


def _epoch_axis(history: pd.DataFrame) -> pd.Series:
    """Where each history row stands in passes: ``epoch_fraction`` (a run validating within
    epochs has several rows per epoch), or ``epoch`` in histories written before it."""
    return history["epoch_fraction"] if "epoch_fraction" in history else history["epoch"]


def _number_text(value) -> str:
    """``3e-04`` for a number; a setting left at ``auto`` (a run written by hand) as it is."""
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _epochs_text(value: float) -> str:
    """``3`` or ``2.5`` (passes over the training set)."""
    return f"{float(value):.2f}".rstrip("0").rstrip(".")


def _best_row(history: pd.DataFrame, monitor: str) -> int | None:
    """The position of the validation whose weights were saved, as the trainer keeps it: the
    first best score, or among equal best scores the lowest validation loss."""
    if history.empty or "epoch" not in history:
        return None
    if monitor == "loss" and "val_loss" in history:
        score = -history["val_loss"]
    elif f"val_{monitor}" in history:
        score = history[f"val_{monitor}"]
        if "val_balanced_accuracy" in history:
            score = score.fillna(history["val_balanced_accuracy"])
    else:
        return None
    if score.isna().all():
        return None
    values = score.to_numpy(dtype=float)
    best = np.flatnonzero(values == np.nanmax(values))
    if len(best) > 1 and "val_loss" in history:  # a tie: the trainer keeps the lower loss
        loss = history["val_loss"].to_numpy(dtype=float)[best]
        return int(best[np.argmin(np.where(np.isfinite(loss), loss, np.inf))])
    return int(best[0])


def _best_epoch(history: pd.DataFrame, monitor: str) -> float | None:
    """The epoch (``2.5``: half-way through the third) whose weights were saved."""
    row = _best_row(history, monitor)
    return None if row is None else float(_epoch_axis(history).iloc[row])


def _training_figure(history: pd.DataFrame, best: float | None, monitor: str) -> dict:
    epoch = _epoch_axis(history)
    with _style():
        fig = new_figure(9.0, 3.4)
        loss, score = fig.subplots(1, 2)
        series = (
            (loss, "train_loss", "train loss", ACCENT, "-"),
            (loss, "val_loss", "validation loss", "#D55E00", "-"),
            (score, "val_auroc", "validation AUROC", ACCENT, "-"),
            (score, "val_accuracy", "validation accuracy", "#009E73", "-"),
            (score, "val_balanced_accuracy", "validation balanced accuracy", "#009E73", ":"),
            (score, "val_average_precision", "validation average precision", "#D55E00", "-"),
            (score, "val_map50", "validation mAP @ IoU 0.5", ACCENT, "-"),
            (score, "val_map", "validation mAP @ IoU 0.5:0.95", "#D55E00", "-"),
        )
        for ax, column, label, colour, ls in series:
            if column in history and history[column].notna().any():
                ax.plot(
                    epoch,
                    history[column],
                    marker="o",
                    ms=3.5,
                    lw=1.8,
                    ls=ls,
                    color=colour,
                    label=label,
                )
        for ax in (loss, score):
            if best is not None:
                ax.axvline(best, color=MUTED, ls="--", lw=1)
                ax.annotate(
                    f"best: epoch {_epochs_text(best)}",
                    (best, 1.0),
                    xycoords=("data", "axes fraction"),
                    xytext=(4, -4),
                    textcoords="offset points",
                    va="top",
                    fontsize=8,
                    color="#52606d",
                )
            ax.set_xlabel("Epoch")
            ax.xaxis.get_major_locator().set_params(integer=True)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best")
        loss.set_title("Loss", loc="left")
        score.set_title("Validation metrics", loc="left")
        score.set_ylim(0.0, 1.02)
        return embed_figure(fig, f"Training curves (best epoch by {monitor})")


# --------------------------------------------------------------------------- sections


def _label_counts(labels: pd.Series, classes: list[str], task: Task) -> pd.Series:
    """Images per class; for a task whose labels hold several findings, images per finding."""
    if task.samples_by_class:
        return labels.astype(str).value_counts()
    try:
        y = task.targets(list(labels), classes)
    except DataError:  # labels the run does not know: shown as no counts, not a failed report
        return pd.Series(dtype=np.int64)
    return pd.Series((np.nan_to_num(y) == 1).sum(axis=0), index=classes)


def _data_summary(run: runs.Run, splits: pd.DataFrame | None, task: Task) -> dict:
    classes = run.classes
    out: dict[str, Any] = {"splits": [], "balance": [], "n_total": None, "patients": None}
    out["leak_patients"] = 0
    if splits is None or "split" not in splits:
        return out
    splits = splits.assign(split=splits["split"].fillna("unassigned").astype(str))
    order = [s for s in _SPLIT_ORDER if (splits["split"] == s).any()]
    order += sorted(set(splits["split"]) - set(order))
    has_patients = "patient_id" in splits and splits["patient_id"].notna().any()
    labels = splits["label"] if "label" in splits else pd.Series(dtype=str)
    for name in [*order, "all"]:
        rows = splits if name == "all" else splits[splits["split"] == name]
        counts = (
            _label_counts(labels.loc[rows.index], classes, task)
            if "label" in splits
            else pd.Series()
        )
        n = len(rows)
        out["balance"].append(
            {
                "split": name,
                "n": n,
                "patients": int(rows["patient_id"].nunique()) if has_patients else None,
                "cells": [
                    {
                        "n": int(counts.get(c, 0)),
                        "pct": f"{100 * counts.get(c, 0) / n:.0f} %" if n else "—",
                    }
                    for c in classes
                ],
            }
        )
        if name != "all":
            out["splits"].append({"split": name, "n": n})
    out["n_total"] = len(splits)
    if has_patients:
        known = splits[splits["patient_id"].notna()]
        per_patient = known.groupby("patient_id")["split"].nunique()
        out["patients"] = int(per_patient.shape[0])
        out["leak_patients"] = int((per_patient > 1).sum())
    return out


def _split_method(run: runs.Run, data: dict, by: str = "class") -> str:
    d = run.config.data
    if d.split_column:
        how = f"given by the data's column {d.split_column!r}"
    else:
        how = (
            "train / val / test "
            + " / ".join(f"{r:g}" for r in d.ratios)
            + f", stratified by {by} (seed {run.config.seed}) unless the data came split"
        )
    if data["patients"]:
        leak = data["leak_patients"]
        grouped = (
            f"grouped by patient ({data['patients']} patients; no patient is in two splits)"
            if not leak
            else f"grouped by patient, yet {leak} patient(s) appear in more than one split"
        )
        return f"{how}; {grouped}"
    return (
        f"{how}; by image, since no patient ID was recorded: images of one patient may sit in "
        "different splits, which can inflate the metrics"
    )


def _model_summary(run: runs.Run) -> dict:
    m, prep = run.model_config, run.preprocess
    cfg = run.config
    source = m.get("pretrained_source")
    if source:
        weights = str(source)
    elif cfg.model.weights:
        weights = str(cfg.model.weights)
    else:
        weights = "none: trained from random initialisation"
    channels = {1: "1 (grayscale)", 3: "3 (RGB)"}.get(prep.channels, str(prep.channels))
    name, attention = m.get("name", cfg.model.name), m.get("attention", cfg.model.attention)
    if name == "ensemble":
        members = m.get("members", [])
        parts = [f"{x.get('name')} ({x.get('attention', 'none')})" for x in members]
        name = f"ensemble of {len(members)}: " + ", ".join(parts)
        attention = "per member"
        weights = "each member's own (ensemble.json lists the member runs and weights)"
    return {
        "name": name,
        "attention": attention,
        "mode": m.get("mode", cfg.optim.mode),
        "frozen_stages": m.get("frozen_stages"),
        "weights": weights,
        "size": " × ".join(map(str, prep.size)) + (" voxels" if len(prep.size) == 3 else " px"),
        "channels": channels,
        "window": (f"centre {prep.window[0]:g}, width {prep.window[1]:g}" if prep.window else None),
        "normalisation": f"mean {', '.join(f'{v:.3g}' for v in prep.mean)}; "
        f"std {', '.join(f'{v:.3g}' for v in prep.std)}",
    }


def _training_summary(run: runs.Run, history: pd.DataFrame | None) -> dict:
    o = run.config.optim
    monitor = o.monitor
    planned = o.epochs if isinstance(o.epochs, int) else None
    epochs = "auto (from the training-set size)" if planned is None else str(planned)
    out: dict[str, Any] = {
        "figure": None,
        "best": None,
        "monitor": _MONITOR_LABELS.get(monitor, monitor),
        "epochs_run": 0,
        "epochs_planned": planned,
        "time_budget": o.time,
        "stopped_early": False,
        "seconds": None,
        "settings": [
            (
                "Optimiser",
                f"{o.optimizer}, learning rate {_number_text(o.lr)}, "
                f"weight decay {o.weight_decay:g}",
            ),
            ("Schedule", f"{o.schedule}, {o.warmup_epochs:g} warm-up epoch(s)"),
            ("Epochs", epochs + (f", time budget {o.time}" if o.time else "")),
            ("Batch size", str(o.batch_size)),
            ("Augmentation", o.augment),
            (
                "Class weights",
                o.class_weights + (", balanced sampler" if o.balanced_sampler else ""),
            ),
            (
                "Early stopping",
                f"patience {o.patience} epochs on {_MONITOR_LABELS.get(monitor, monitor)}",
            ),
            ("Seed", str(run.config.seed)),
        ],
    }
    if history is None or history.empty or "epoch" not in history:
        return out
    best_row = _best_row(history, monitor)
    best = _best_epoch(history, monitor)
    run_epochs = float(_epoch_axis(history).max())
    out.update(
        best=None if best is None else _epochs_text(best),
        epochs_run=_epochs_text(run_epochs),
        stopped_early=planned is not None and run_epochs < planned,
        figure=_training_figure(history, best, out["monitor"]),
    )
    if "seconds" in history:
        out["seconds"] = f"{history['seconds'].sum():.0f} s"
    if best_row is not None:
        row = history.iloc[best_row]
        out["best_row"] = [
            (label, format_number(row[column]))
            for column, label in (
                ("val_loss", "val loss"),
                ("val_auroc", "val AUROC"),
                ("val_accuracy", "val accuracy"),
                ("val_average_precision", "val AP"),
            )
            if column in row
        ]
    return out


def _subgroups(metrics: dict, columns=SUBGROUP_COLUMNS) -> list[dict]:
    tables = []
    for column, result in (metrics.get("subgroups") or {}).items():
        rows = []
        for name, entry in (result.get("groups") or {}).items():
            rows.append(
                {
                    "name": name,
                    "n": entry.get("n"),
                    "cells": [_cell(entry.get(key)) for key, _ in columns],
                    "warning": entry.get("warning"),
                }
            )
        gaps = []
        for key, _ in columns:
            gap = (result.get("gaps") or {}).get(key) or {}
            if gap.get("gap") is None:
                gaps.append({"undefined": True, "text": "—", "detail": None})
            else:
                gaps.append(
                    {
                        "undefined": False,
                        "text": format_number(gap["gap"]),
                        "exact": repr(gap["gap"]),
                        "detail": f"{gap['highest']} vs {gap['lowest']}",
                    }
                )
        tables.append(
            {"column": column, "rows": rows, "gaps": gaps, "warnings": result.get("warnings", [])}
        )
    return tables


def _largest_gaps(metrics: dict, keys=GAP_METRICS[:2]) -> list[str]:
    """One sentence per subgroup column: its largest gaps in ``keys`` (classification: AUROC
    and sensitivity)."""
    findings = []
    for column, result in (metrics.get("subgroups") or {}).items():
        groups = result.get("groups") or {}
        parts = []
        for key, label in keys:
            gap = (result.get("gaps") or {}).get(key) or {}
            if gap.get("gap") is None:
                continue
            hi, lo = gap["highest"], gap["lowest"]
            if gap["gap"] == 0:
                value = groups[hi][key]["value"]
                parts.append(f"{label} is the same ({value:.3f}) in every group")
                continue
            parts.append(
                f"{label} differs by {gap['gap']:.3f} between {hi} "
                f"({groups[hi][key]['value']:.3f}, n={groups[hi]['n']}) and {lo} "
                f"({groups[lo][key]['value']:.3f}, n={groups[lo]['n']})"
            )
        if parts:
            findings.append(f"By {column}: " + "; ".join(parts) + ".")
        else:
            findings.append(f"By {column}: no gap could be computed (too few defined groups).")
    return findings


def _pick_examples(y: np.ndarray, predicted: np.ndarray, probs: np.ndarray, n: int):
    """Indices of up to ``n`` right and ``n`` wrong predictions, the most confident first, taken
    from the true classes in turn so that every class is shown."""
    confidence = probs[np.arange(len(y)), predicted]

    right = predicted == y
    return _take_in_turn(right, y, confidence, n), _take_in_turn(~right, y, confidence, n)


def _take_in_turn(mask: np.ndarray, groups: np.ndarray, score: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` indices of ``mask``, one group (true class, true findings) after another,
    each group's highest ``score`` first: every group is shown before any shows twice."""
    queues = []
    for group in np.unique(groups[mask]):
        members = np.flatnonzero(mask & (groups == group))
        queues.append(list(members[np.argsort(-score[members], kind="stable")]))
    chosen: list[int] = []
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(int(queue.pop(0)))
    return chosen


def _thumbnail(source: str, window, preprocess=None) -> tuple[str, bool]:
    """An embedded PNG of ``source``; a volume (``preprocess`` of dims 3) as its three
    orthogonal mid-slices side by side, as the model sees it (orientation, spacing and
    intensity applied, before normalisation)."""
    from PIL import Image

    from medsight.data.imaging import decode

    if getattr(preprocess, "dims", 2) == 3:
        from medsight.data.volumes import read_volume, volume_thumbnail

        prepared = np.clip(preprocess.prepare(read_volume(source)), 0.0, 1.0)
        if getattr(preprocess, "slices", None):  # 2.5-D: the middle one of the slices fed
            planes = prepared[len(prepared) // 2]
        else:
            planes = volume_thumbnail(prepared)
        image = Image.fromarray((planes * 255 + 0.5).astype(np.uint8))
        small = image.size[1] < 128
        # Small volumes are enlarged with sharp voxels: LANCZOS blurs a 28³ mask
        scale = max(1, THUMBNAIL_SIDE // image.size[1])
        image = image.resize(
            (image.size[0] * scale, image.size[1] * scale), Image.Resampling.NEAREST
        )
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=True)
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), small
    pixels = np.clip(decode(source, window=window).pixels, 0.0, 1.0)
    array = (pixels * 255 + 0.5).astype(np.uint8)
    image = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    small = max(image.size) < 128
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), small


def _pick_finding_examples(pred: pd.DataFrame, y: np.ndarray, probs: np.ndarray, n: int):
    """Multi-label: up to ``n`` images whose known findings are all called right (the most
    clear-cut first) and ``n`` with a finding called wrong (the most confident mistake first),
    taking the true labels ("a|b", "no finding"…) in turn."""
    known = ~np.isnan(y)
    called = probs >= DECISION_THRESHOLD
    wrong_entry = known & (called != (np.nan_to_num(y) == 1))
    margin = np.abs(probs - DECISION_THRESHOLD)
    right = known.any(axis=1) & ~wrong_entry.any(axis=1)
    clear_cut = np.where(known, margin, np.inf).min(axis=1)  # the least sure known finding
    worst = np.where(wrong_entry, margin, 0.0).max(axis=1)
    truth = pred["label"].astype(str).to_numpy()
    wrong = ~right & known.any(axis=1)
    return (
        _take_in_turn(right, truth, clear_cut, n),
        _take_in_turn(wrong, truth, worst, n),
        wrong_entry,
    )


def _shows_volumes(run) -> bool:
    """Whether the run's pictures are volumes on three planes (a 3-D run, not a 2.5-D one)."""
    return getattr(run.preprocess, "dims", 2) == 3 and not getattr(run.preprocess, "slices", None)


def _examples(run, metrics, pred, y, probs, n: int) -> dict:
    """Thumbnails of right and wrong predictions; a note instead when the images are gone."""
    out: dict[str, Any] = {
        "groups": [],
        "note": None,
        "requested": n,
        "volumes": _shows_volumes(run),
    }
    if n == 0:
        out["note"] = "No example images were requested (examples=0)."
        return out
    classes = run.classes
    if y.ndim == 2:  # several findings per image: each finding's probability is shown
        right, wrong, wrong_entry = _pick_finding_examples(pred, y, probs, n)

        def describe(i: int) -> dict:
            return {
                "truth": str(pred["label"].iloc[i]),
                "predicted": str(pred["predicted"].iloc[i]),
                "correct": not wrong_entry[i].any(),
                "scores": [
                    {"name": name, "p": f"{probs[i, k]:.2f}", "wrong": bool(wrong_entry[i, k])}
                    for k, name in enumerate(classes)
                ],
            }
    else:
        predicted = pred["predicted"].map(lambda v: classes.index(v) if v in classes else -1)
        predicted = np.where(predicted >= 0, predicted, probs.argmax(axis=1)).astype(np.int64)
        right, wrong = _pick_examples(y, predicted, probs, n)

        def describe(i: int) -> dict:
            return {
                "truth": classes[y[i]],
                "predicted": classes[predicted[i]],
                "p": f"{probs[i, predicted[i]]:.2f}",
                "p_truth": f"{probs[i, y[i]]:.2f}",
                "correct": bool(predicted[i] == y[i]),
            }

    data = metrics.get("data") or run.config.data.path
    try:
        table = run.load_data(data)
        sources = dict(zip(table["sample_id"].astype(str), table["source"]))
    except Exception as exc:  # noqa: BLE001 - a report never fails for want of its pictures
        out["note"] = (
            f"Example images are not shown: the data at {data} could not be read ({exc}). "
            "Restore the data at that path and write the report again to include them."
        )
        return out
    failed = 0
    titles = (
        ("All findings called right", "A finding called wrong")
        if y.ndim == 2
        else ("Correctly classified", "Misclassified")
    )
    for title, indices in zip(titles, (right, wrong)):
        items = []
        for i in indices:
            sample = str(pred["sample_id"].iloc[i])
            try:
                src, small = _thumbnail(sources[sample], run.preprocess.window, run.preprocess)
            except Exception:  # noqa: BLE001 - a missing or unreadable image is skipped
                failed += 1
                continue
            items.append({"src": src, "pixelated": small, "sample_id": sample, **describe(i)})
        out["groups"].append({"title": title, "items": items, "empty": not indices})
    shown = sum(len(g["items"]) for g in out["groups"])
    if failed and not shown:
        out["groups"] = []
        out["note"] = (
            f"Example images are not shown: none of the {failed} chosen images could be read "
            f"from {data} (moved or deleted?)."
        )
    elif failed:
        out["note"] = f"{failed} chosen image(s) could not be read from {data} and are left out."
    return out


#: Localisation/faithfulness columns: key, label, where it lives in localisation.json, digits.
EXPLAIN_COLUMNS = (
    ("pointing_game", "Pointing game ↑", "methods", 3),
    ("box_iou", "Box IoU ↑", "methods", 3),
    ("energy_in_mask", "Energy in mask ↑", "methods", 3),
    ("deletion_auc", "Deletion AUC ↓", "faithfulness", 3),
    ("insertion_auc", "Insertion AUC ↑", "faithfulness", 3),
    ("spearman", "Sanity ρ ↓", "sanity", 2),
)
#: Overlay colours of the lesion's box (ground truth) and the map's box.
TRUTH_BOX = (0, 200, 83)
MAP_BOX = (0, 176, 255)


def _layer_label(layer: str | None) -> str:
    """A CAM layer as a reader wants it: ``stage1 + stage2`` for fused ``backbone.stage1,…``."""
    return " + ".join(part.removeprefix("backbone.") for part in str(layer or "").split(","))


def _rounded(value: Any, digits: int) -> Any:
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return round(float(value), digits) + 0.0 if isinstance(value, (int, float)) else value


def _explanation_table(scores: dict) -> list[dict]:
    from medsight.explain.faithfulness import passes_sanity

    rows = []
    for method, entry in (scores.get("methods") or {}).items():
        cells = []
        for key, _, where, digits in EXPLAIN_COLUMNS:
            block = entry if where == "methods" else (scores.get(where) or {}).get(method) or {}
            value = block.get(key)
            if key == "spearman" and isinstance(value, dict):  # a signed ρ: 0.00, not 6e-05
                value = {k: _rounded(v, digits) for k, v in value.items()}
            cells.append(_cell(value, digits))
        seconds = entry.get("seconds_per_image")
        sanity = (scores.get("sanity") or {}).get(method)
        rows.append(
            {
                "method": method,
                "layer": _layer_label(entry.get("layer")),
                "best": method == scores.get("best_method"),
                "fails_sanity": passes_sanity(sanity) is False,
                "cells": cells,
                "seconds": "—" if seconds is None else f"{seconds:.3f}",
            }
        )
    return rows


def _explained_volume(explainer, source: str, target: int) -> str:
    """A 3-D map over its (preprocessed) volume on the three planes through its maximum."""
    from PIL import Image

    from medsight.data.volumes import read_volume
    from medsight.explain.overlay import overlay_volume

    volume = read_volume(source)
    heatmap = explainer.explain(explainer.preprocess(volume)[None], target=target)
    image = overlay_volume(explainer.preprocess.prepare(volume), heatmap, side=THUMBNAIL_SIDE)
    image.thumbnail((3 * THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _explained_thumbnail(explainer, source: str, mask_source, target: int, window) -> str:
    from PIL import Image, ImageDraw

    from medsight.data.imaging import decode
    from medsight.explain.localisation import box_from_map, mask_box, read_mask
    from medsight.explain.overlay import display_image, overlay

    prep = explainer.preprocess
    if getattr(prep, "dims", 2) == 3 and getattr(prep, "slices", None) is None:
        return _explained_volume(explainer, source, target)
    picture = decode(source, window=window)
    heatmap = explainer.explain(explainer.preprocess(picture)[None], target=target)
    shown = display_image(picture.pixels, min_side=THUMBNAIL_SIDE)
    image = overlay(shown, heatmap)
    draw = ImageDraw.Draw(image)
    sy, sx = image.height / heatmap.shape[0], image.width / heatmap.shape[1]
    mask = read_mask(mask_source)
    boxes = [(box_from_map(heatmap), MAP_BOX)]
    if mask is not None and mask.any():
        my, mx = image.height / mask.shape[0], image.width / mask.shape[1]
        truth = mask_box(mask)
        boxes.append(((truth[0] * mx / sx, truth[1] * my / sy, truth[2] * mx / sx,
                       truth[3] * my / sy), TRUTH_BOX))  # fmt: skip
    for box, colour in boxes:
        if box is not None:
            x0, y0, x1, y1 = box
            draw.rectangle((x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1), outline=colour, width=2)
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _explanations(run, metrics, pred, y, probs, n: int) -> dict | None:
    """Localisation/faithfulness table and a gallery of true positives, false positives and false
    negatives (of the positive class) with heat-maps; None until ``medsight explain --masks``
    has written ``RUN/localisation.json``."""
    from medsight.explain.faithfulness import SANITY_MAX_RHO

    scores = _read_optional_json(run.path / runs.LOCALISATION)
    if not isinstance(scores, dict) or not scores.get("methods"):
        return None
    out: dict[str, Any] = {
        "table": _explanation_table(scores),
        "columns": [label for _, label, _, _ in EXPLAIN_COLUMNS],
        "n_images": scores.get("n_images"),
        "n_missing": scores.get("n_missing_masks", 0),
        "n_faithfulness": scores.get("n_faithfulness_images"),
        "sanity_max_rho": SANITY_MAX_RHO,
        "split": scores.get("split", ""),
        "method": None,
        "layer": None,
        "groups": [],
        "note": None,
        "per_finding": [],
        "volumes": _shows_volumes(run),  # three planes per overlay, no boxes drawn
    }
    if np.ndim(y) > 1:  # findings: each method's scores per finding instead of a gallery
        best = scores["methods"].get(scores.get("best_method")) or {}
        out["per_finding"] = [
            {
                "finding": name,
                "n": entry.get("n_images"),
                "cells": [_cell(entry.get(k), 3) for k in ("pointing_game", "energy_in_mask")],
            }
            for name, entry in (best.get("per_finding") or {}).items()
        ]
        out["best_method"] = scores.get("best_method")
        out["best_layer"] = _layer_label(best.get("layer"))
        return out
    if n == 0:
        out["note"] = "No example images were requested (examples=0), so no overlays are shown."
        return out
    classes = run.classes
    positive = metrics.get("positive") or run.positive_class
    pos = classes.index(positive) if positive in classes else len(classes) - 1
    predicted = probs.argmax(axis=1)
    confidence = probs[:, pos]
    truth_pos, called_pos = y == pos, predicted == pos
    groups = (
        ("True positives", truth_pos & called_pos, -confidence),
        ("False positives", ~truth_pos & called_pos, -confidence),
        ("False negatives", truth_pos & ~called_pos, confidence),
    )
    try:
        from medsight.explain.cam import Explainer

        data = metrics.get("data") or run.config.data.path
        table = run.load_data(data)
        sources = dict(zip(table["sample_id"].astype(str), table["source"]))
        masks = (
            dict(zip(table["sample_id"].astype(str), table["mask"]))
            if "mask" in table.columns
            else {}
        )
        explainer = Explainer.from_run(run, method="auto")
    except Exception as exc:  # noqa: BLE001 - a report never fails for want of its pictures
        out["note"] = f"Overlays are not shown: {exc}"
        return out
    out["method"], out["layer"] = explainer.method, explainer.layer
    failed = 0
    for title, members, order in groups:
        chosen = np.flatnonzero(members)
        chosen = chosen[np.argsort(order[chosen], kind="stable")][:n]
        items = []
        for i in chosen:
            sample = str(pred["sample_id"].iloc[i])
            try:
                src = _explained_thumbnail(
                    explainer,
                    sources[sample],
                    masks.get(sample),
                    int(predicted[i]),
                    run.preprocess.window,
                )
            except Exception:  # noqa: BLE001 - a missing or unreadable image is skipped
                failed += 1
                continue
            items.append(
                {
                    "src": src,
                    "sample_id": sample,
                    "truth": classes[y[i]],
                    "predicted": classes[predicted[i]],
                    "p": f"{probs[i, predicted[i]]:.2f}",
                    "correct": bool(predicted[i] == y[i]),
                }
            )
        out["groups"].append({"title": title, "items": items, "empty": chosen.size == 0})
    explainer.close()
    if failed:
        out["note"] = f"{failed} chosen image(s) could not be read from {data} and are left out."
    return out


def _limitations(run, metrics: dict, pred: pd.DataFrame, data: dict, calibration) -> list[str]:
    notes = []
    n = int(metrics.get("n") or len(pred))
    if n < SMALL_TEST_SET:
        notes.append(
            f"Small evaluation set: {n} images. Every estimate here is uncertain; read the 95 % "
            "confidence intervals, not the point values."
        )
    key, name = ("auroc", "AUROC") if "auroc" in metrics else ("auroc_macro", "mean AUROC")
    auroc = metrics.get(key) or {}
    if auroc.get("ci"):
        lo, hi = auroc["ci"]
        notes.append(
            f"The 95 % CI of {name} spans {hi - lo:.3f} ({lo:.3f}–{hi:.3f}): differences between "
            "models smaller than that are not evidence of a better model."
        )
    if "site" in pred.columns:
        sites = sorted({str(s) for s in pred["site"] if str(s) != ""})
        if len(sites) == 1:
            notes.append(
                f"Single site ({sites[0]}): performance at other hospitals, scanners or "
                "populations is untested."
            )
        else:
            notes.append(
                f"{len(sites)} sites in the evaluated split, all from the same data collection: "
                "an external test set from an unseen site is still needed."
            )
    else:
        notes.append(
            "No site was recorded: the test images come from the same collection as the training "
            "images, so performance at other hospitals or on other scanners is untested."
        )
    ece = (metrics.get("ece") or {}).get("value")
    ece_name, fitted = "ECE", "a temperature"
    if "ece" not in metrics and metrics.get("per_finding"):  # one ECE per finding: the worst
        eces = [(e.get("ece") or {}).get("value") for e in metrics["per_finding"].values()]
        eces = [v for v in eces if v is not None]
        ece = max(eces) if eces else None
        ece_name, fitted = "largest per-finding ECE", "one temperature per finding"
    if calibration:
        notes.append(
            "Probabilities were calibrated by temperature scaling on the validation split; "
            "calibration can drift on data from other sources."
        )
    elif ece is not None:
        notes.append(
            f"Probabilities are not calibrated ({ece_name} {ece:.3f}); do not read them as "
            f"risks. `medsight evaluate {run.path} --calibrate` fits {fitted} on the validation "
            "split."
        )
    prep = run.preprocess
    notes.append(
        f"Images are resized to {prep.size[0]} × {prep.size[1]} px: findings smaller than "
        "that resolution can show cannot be detected."
    )
    if not data["patients"]:
        notes.append(
            "No patient IDs: images of one patient may be in both training and test splits, "
            "which inflates the metrics."
        )
    return notes


@dataclass
class _Page:
    """What the report is made of: the run, its task, and the files evaluation wrote."""

    run: runs.Run
    task: Task
    metrics: dict
    pred: pd.DataFrame
    y: np.ndarray
    probs: np.ndarray
    examples: int

    def __post_init__(self):
        self.classes = self.run.classes
        self.k = len(self.classes)
        self.positive = self.metrics.get("positive") or self.run.positive_class
        self.calibration = self.metrics.get("calibration") or self.run.calibration()
        splits = _read_optional_csv(self.run.path / runs.SPLITS, dtype={"patient_id": str})
        self.data = _data_summary(self.run, splits, self.task)
        #: Several findings per image: ``y`` is an (N, K) matrix of 1 / 0 / NaN (ignored).
        self.multilabel = self.y.ndim == 2


def _summary(page: _Page) -> dict:
    tiles = []
    shown = [(key, *TILES[key]) for key in page.task.headline_metrics if key in TILES]
    primary = next((key for key, _, _ in shown if key in KEY_TILES), None)
    for key, label, higher in shown:
        if key in ("auroc", "average_precision"):
            label += f" ({page.positive})" if page.k == 2 else " (macro, one-vs-rest)"
        tiles.append(
            {
                "key": key,
                "primary": key == primary,
                "label": label,
                "higher": higher,
                **_cell(page.metrics.get(key)),
            }
        )
    return {"tiles": tiles, "model": _model_summary(page.run)}


def _confusion(page: _Page) -> dict:
    k = page.k
    cm = np.asarray(page.metrics.get("confusion_matrix") or np.zeros((k, k)), dtype=np.int64)
    return {"confusion": _confusion_figure(cm, page.classes)}


def _curves(page: _Page) -> dict:
    roc, skipped = _roc_pr_figure(page.y, page.probs, page.classes, page.metrics)
    return {"roc": roc, "roc_skipped": skipped}


def _calibration(page: _Page) -> dict:
    metrics, calibration = page.metrics, page.calibration
    ece = metrics.get("ece") or {}
    temperature = calibration.get("temperature") if isinstance(calibration, dict) else None
    return {
        "reliability": _reliability_figure(page.y, page.probs),
        "ece": _cell(ece),
        "ece_points": None if ece.get("value") is None else f"{100 * ece['value']:.1f}",
        "log_loss": _cell(metrics.get("log_loss")),
        "brier": _cell(metrics.get("brier")),
        "temperature": None if temperature is None else f"{temperature:.3f}",
        "ece_bins": ECE_BINS,
    }


def _thresholds(page: _Page) -> dict:
    thresholds = []
    for name, points in (page.metrics.get("thresholds") or {}).items():
        for key, label in OPERATING_POINTS:
            point = (points or {}).get(key)
            thresholds.append(
                {
                    "class": name,
                    "point": label,
                    "cells": [
                        _cell((point or {}).get(m), digits=4 if m == "threshold" else 3)
                        for m in ("threshold", "sensitivity", "specificity", "ppv", "npv")
                    ],
                }
            )
    return {"thresholds": thresholds}


def _per_class(page: _Page) -> dict:
    per_class = []
    for name in page.classes:
        entry = (page.metrics.get("per_class") or {}).get(name) or {}
        per_class.append(
            {
                "class": name,
                "positive": name == page.positive,
                "cells": [_cell(entry.get(m)) for m, _ in PER_CLASS_COLUMNS],
                "support": entry.get("support"),
            }
        )
    return {"per_class": per_class, "per_class_columns": [label for _, label in PER_CLASS_COLUMNS]}


def _subgroup_section(page: _Page) -> dict:
    metadata = [
        c
        for c in page.pred.columns
        if c not in ("sample_id", "label", "predicted", "patient_id", "mask", "path")
        and c not in ("boxes", "true_boxes", "width", "height")  # a detector's, per image
        and not c.endswith("_path")  # files (per-finding masks), not groups of patients
        and c not in page.task.prediction_columns(page.classes)
    ]
    columns = _subgroup_columns(page.task)
    return {
        "subgroups": _subgroups(page.metrics, columns),
        "subgroup_columns": [label for _, label in columns],
        "metadata_columns": metadata,
    }


def _subgroup_columns(task: Task) -> tuple[tuple[str, str], ...]:
    """The subgroup table's columns: the task's subgroup metrics, labelled."""
    labels = dict(SUBGROUP_COLUMNS)
    return tuple((key, labels.get(key, key)) for key in task.subgroup_metrics)


def _training(page: _Page) -> dict:
    return {
        "training": _training_summary(page.run, _read_optional_csv(page.run.path / runs.HISTORY))
    }


def _example_section(page: _Page) -> dict:
    return {
        "examples": _examples(page.run, page.metrics, page.pred, page.y, page.probs, page.examples)
    }


def _explanation_section(page: _Page) -> dict:
    found = _explanations(page.run, page.metrics, page.pred, page.y, page.probs, page.examples)
    return {"explanations": found}


def _model_card(page: _Page) -> dict:
    versions = _read_optional_json(page.run.path / runs.VERSIONS) or {}
    return {
        "intended_use": modelcard.INTENDED_USE.format(classes=", ".join(page.classes)),
        "not_for_diagnosis": modelcard.NOT_FOR_DIAGNOSIS,
        "gap_findings": _largest_gaps(
            page.metrics, tuple((k, v) for k, v in GAP_METRICS if k in page.task.subgroup_metrics)
        ),
        "limitations": _limitations(page.run, page.metrics, page.pred, page.data, page.calibration),
        "versions": sorted(versions.items()) if isinstance(versions, dict) else [],
        "trained_on": _trained_on(page.run),
    }


def _trained_on(run) -> str | None:
    """Where the run trained, in words (``model.json``'s ``trained_on``; None for runs from
    before it was recorded)."""
    info = (_read_optional_json(run.path / runs.MODEL) or {}).get("trained_on")
    if not isinstance(info, dict) or "device" not in info:
        return None
    text = f"{info['device']}, {info.get('precision', 'fp32')}"
    if int(info.get("processes") or 1) > 1:
        text += (
            f"; {info['processes']} data-parallel processes ({info.get('backend')}), effective "
            f"batch {info.get('effective_batch')} = {info['processes']} × "
            f"{info.get('batch_per_process')}"
        )
    return text


def _findings(page: _Page) -> dict:
    """Multi-label: each finding's prevalence against its performance, and its operating
    points (sensitivity / specificity)."""
    rows = []
    for name, entry in (page.metrics.get("per_finding") or {}).items():
        points = entry.get("operating_points") or {}
        rows.append(
            {
                "name": name,
                "n": entry["n_positive"] + entry["n_negative"],
                "positives": entry["n_positive"],
                "ignored": entry.get("n_ignored", 0),
                "prevalence": _cell(entry.get("prevalence")),
                "auroc": _cell(entry.get("auroc")),
                "ap": _cell(entry.get("average_precision")),
                "ece": _cell(entry.get("ece")),
                "points": [_sens_spec(points.get(key)) for key, _ in OPERATING_POINTS],
            }
        )
    return {
        "findings": {
            "rows": rows,
            "points": ["sens. ≥ 0.90", "sens. ≥ 0.95", "Youden"],
            "figure": _prevalence_figure(page.metrics.get("per_finding") or {}) if rows else None,
            "ignored": any(row["ignored"] for row in rows),
        }
    }


def _sens_spec(point: dict | None) -> str:
    """``0.92 / 0.81``: sensitivity / specificity at one operating point."""
    if not point:
        return UNDEFINED
    return f"{format_number(point['sensitivity'], 2)} / {format_number(point['specificity'], 2)}"


def _prevalence_figure(per_finding: dict) -> dict | None:
    """AUROC and average precision of each finding against its prevalence; AP's chance level
    is the prevalence itself (the diagonal)."""
    names, prevalence, auroc, ap = [], [], [], []
    for name, entry in per_finding.items():
        p = (entry.get("prevalence") or {}).get("value")
        if p is None:
            continue
        names.append(name)
        prevalence.append(p)
        auroc.append((entry.get("auroc") or {}).get("value"))
        ap.append((entry.get("average_precision") or {}).get("value"))
    if not names or all(v is None for v in auroc):
        return None
    prevalence = np.asarray(prevalence)
    auroc = np.array([np.nan if v is None else v for v in auroc])
    ap = np.array([np.nan if v is None else v for v in ap])
    right = min(1.0, max(0.1, float(np.nanmax(prevalence)) * 1.15))
    with _style():
        fig = new_figure(6.4, 3.8)
        ax = fig.subplots()
        ax.plot([0, 1], [0, 1], ls="--", lw=1, color=MUTED, label="AP of chance (= prevalence)")
        ax.scatter(prevalence, auroc, s=36, color=ACCENT, label="AUROC", zorder=3)
        ax.scatter(
            prevalence, ap, s=36, marker="s", facecolor="white", edgecolor="#D55E00", lw=1.6,
            label="average precision", zorder=3,
        )  # fmt: skip
        for x, a, name in zip(prevalence, auroc, names):
            if np.isfinite(a):
                ax.annotate(
                    _plot_label(name, 16), (x, a), xytext=(4, 3), textcoords="offset points",
                    fontsize=7.5, color="#52606d",
                )  # fmt: skip
        ax.set(xlim=(0, right), ylim=(0, 1.1), xlabel="Prevalence in the evaluated split")
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_ylabel("Score")
        ax.set_title("Performance against prevalence", loc="left")
        fig.legend(loc="outside right upper")
        return embed_figure(fig, "AUROC and average precision of each finding by prevalence")


def _grid(k: int, columns: int = 4) -> tuple[int, int]:
    ncols = min(columns, k)
    return math.ceil(k / ncols), ncols


def _finding_roc_figure(curves: dict, thresholds: dict, per_finding: dict) -> dict | None:
    """One small ROC panel per finding, with its operating points."""
    names = list(curves)
    if not names:
        return None
    nrows, ncols = _grid(len(names))
    markers = {"sensitivity_0.90": "o", "sensitivity_0.95": "s", "youden": "D"}
    with _style():
        fig = new_figure(2.35 * ncols + 0.5, 2.35 * nrows + 0.75)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, name in zip(axes, names):
            roc = (curves[name] or {}).get("roc")
            ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color=MUTED)
            ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02))  # square by the figure's size
            ax.tick_params(labelsize=7.5)
            auroc = ((per_finding.get(name) or {}).get("auroc") or {}).get("value")
            shown = UNDEFINED if auroc is None else f"{auroc:.3f}"
            ax.set_title(f"{_plot_label(name, 16)} · AUROC {shown}", loc="left", fontsize=9)
            if roc is None:
                ax.text(
                    0.5, 0.5, "undefined:\none class only", ha="center", va="center",
                    fontsize=8.5, color=MUTED, transform=ax.transAxes,
                )  # fmt: skip
                continue
            ax.plot(roc["fpr"], roc["tpr"], color=ACCENT, lw=1.8)
            for key, marker in markers.items():
                point = (thresholds.get(name) or {}).get(key)
                if point and point.get("specificity") is not None:
                    ax.plot(
                        1 - point["specificity"], point["sensitivity"], marker=marker, ms=5.5,
                        mfc="white", mec=ACCENT, mew=1.4, ls="none", zorder=5,
                    )  # fmt: skip
        for ax in axes[len(names) :]:
            ax.set_visible(False)
        for ax in axes[: len(names)]:
            ax.label_outer()
        fig.supxlabel("1 − specificity (FPR)", fontsize=9.5)
        fig.supylabel("Sensitivity (TPR)", fontsize=9.5)
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], marker=m, ls="none", mfc="white", mec=INK, mew=1.3, ms=6)
            for m in markers.values()
        ]
        fig.legend(
            handles,
            ["operating point: sensitivity ≥ 0.90", "sensitivity ≥ 0.95", "Youden"],
            loc="outside upper center",
            ncol=3,
            fontsize=8.5,
        )
        return embed_figure(fig, "ROC curve of each finding")


def _finding_reliability_figure(curves: dict) -> dict | None:
    """One small reliability panel per finding: the observed frequency of the finding against
    its mean predicted probability in each non-empty bin, the marker's area showing how many
    images the bin holds."""
    names = [n for n in curves if (curves[n] or {}).get("reliability")]
    if not names:
        return None
    nrows, ncols = _grid(len(names))
    with _style():
        fig = new_figure(2.35 * ncols + 0.5, 2.35 * nrows + 0.5)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, name in zip(axes, names):
            data = curves[name]["reliability"]
            count = np.asarray(data["count"], dtype=np.float64)
            ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color=MUTED)
            ax.plot(data["probability"], data["frequency"], color=ACCENT, lw=1.2, zorder=2)
            ax.scatter(
                data["probability"], data["frequency"], s=12 + 120 * count / count.max(),
                color=ACCENT, edgecolor="white", lw=0.6, zorder=3,
            )  # fmt: skip
            ax.set(xlim=(-0.02, 1.02), ylim=(-0.04, 1.04))
            ax.tick_params(labelsize=7.5)
            ax.set_title(f"{_plot_label(name, 16)} · n={int(count.sum())}", loc="left", fontsize=9)
        for ax in axes[len(names) :]:
            ax.set_visible(False)
        for ax in axes[: len(names)]:
            ax.label_outer()
        fig.supxlabel("Mean predicted probability (bin)", fontsize=9.5)
        fig.supylabel("Observed frequency", fontsize=9.5)
        return embed_figure(fig, "Reliability of each finding's probability")


def _finding_curves(page: _Page) -> dict:
    curves = page.metrics.get("curves") or {}
    per_finding = page.metrics.get("per_finding") or {}
    return {
        "finding_roc": _finding_roc_figure(
            curves, page.metrics.get("thresholds") or {}, per_finding
        ),
        "finding_reliability": _finding_reliability_figure(curves),
    }


def _cooccurrence_figure(y: np.ndarray, findings: list[str]) -> dict:
    """Images with both findings (counts; the diagonal: with the finding), and the share of
    each row finding's images that also have the column finding."""
    present = (np.nan_to_num(y) == 1).astype(np.int64)
    counts = present.T @ present
    k = len(findings)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = counts / np.diag(counts)[:, None]
    share = np.where(np.diag(counts)[:, None] > 0, share, np.nan)
    side = max(3.4, 0.42 * k + 1.7)
    labels = [_plot_label(c, 16) for c in findings]
    size = 9 if k <= 6 else 7.5 if k <= 10 else 7
    stacked = k > 8  # side by side, many findings would shrink to unreadable cells
    with _style():
        fig = new_figure(side, 2 * side + 0.3) if stacked else new_figure(2 * side + 0.6, side)
        axes = fig.subplots(2, 1) if stacked else fig.subplots(1, 2)
        panels = (
            (counts.astype(float), "Images with both", lambda v: f"{int(v)}", counts.max() or 1),
            (share, "Share: row → column", lambda v: f"{v:.2f}", 1),
        )
        for ax, (values, title, fmt, vmax) in zip(axes, panels):
            _matrix_panel(ax, values, title, fmt, vmax, labels, cmap="Purples", size=size)
        return embed_figure(fig, "Co-occurrence of findings in the evaluated split")


def _cooccurrence(page: _Page) -> dict:
    y = page.y
    present = np.nan_to_num(y) == 1
    per_image = present.sum(axis=1)
    return {
        "cooccurrence": {
            "figure": _cooccurrence_figure(y, page.classes),
            "n": int(y.shape[0]),
            "none": int((per_image == 0).sum()),
            "one": int((per_image == 1).sum()),
            "several": int((per_image >= 2).sum()),
            "most": int(per_image.max()) if per_image.size else 0,
        }
    }


# --------------------------------------------------------------------------- detection

#: Boxes drawn on the detection gallery: true (green) and predicted (blue).
PRED_BOX = (37, 99, 235)
#: The FP rate whose operating point decides which predicted boxes the gallery shows.
GALLERY_FPS = 1.0
#: The predicted boxes shown when metrics.json has no operating point at GALLERY_FPS.
GALLERY_DEFAULT_THRESHOLD = 0.5
DETECTION_ROWS = (
    ("map50", "mAP @ IoU 0.5", "COCO average precision at IoU ≥ 0.5, mean over classes"),
    ("map", "mAP @ IoU 0.5:0.95", "COCO average precision, mean over IoU 0.50, 0.55 … 0.95"),
    ("sensitivity_at_1fp", "Sensitivity at 1 FP / image", "share of lesions found"),
    ("froc_score", "FROC score (CPM)", "mean sensitivity at 1/8 … 8 FP / image"),
    ("median_iou", "Median IoU of found lesions", "overlap of each found lesion's box"),
    ("auroc_macro", "Image-level AUROC (macro)", "top box score vs. image has the class"),
)


def _fps_label(value: float) -> str:
    """``1/8`` for 0.125, ``2`` for 2.0: an FP rate as the FROC literature writes it."""
    if value < 1 and abs(1 / value - round(1 / value)) < 1e-9:
        return f"1/{round(1 / value)}"
    return f"{value:g}"


def _detection(page: _Page) -> dict:
    """The detection headline table, per-class table and operating points."""
    m = page.metrics
    per_class = []
    for name in page.classes:
        entry = (m.get("per_class") or {}).get(name) or {}
        per_class.append(
            {
                "class": name,
                "lesions": entry.get("n_lesions"),
                "images": entry.get("n_images"),
                "detections": entry.get("n_detections"),
                "cells": [
                    _cell(entry.get("ap50")),
                    _cell(entry.get("ap")),
                    _cell(entry.get("sensitivity")),
                    _cell(entry.get("auroc")),
                ],
            }
        )
    points = []
    for point in m.get("operating_points") or []:
        points.append(
            {
                "target": _fps_label(point["fps_per_image_target"]),
                "cells": [
                    _cell(point.get("threshold"), 3),
                    _cell(point.get("fps_per_image"), 2),
                    _cell(point.get("sensitivity")),
                    _cell(point.get("precision")),
                ],
                "n": point.get("n_detections"),
            }
        )
    return {
        "detection": {
            "rows": [
                {"label": label, "help": help_text, **_cell(m.get(key))}
                for key, label, help_text in DETECTION_ROWS
            ],
            "per_class": per_class,
            "points": points,
            "n_images": m.get("n_images"),
            "n_lesions": m.get("n_lesions"),
            "n_detections": m.get("n_detections"),
            "iou": m.get("iou_threshold", 0.5),
            "n_map": (m.get("bootstrap") or {}).get("n_map"),
            "n_bootstrap": (m.get("bootstrap") or {}).get("n"),
        }
    }


def _froc_figure(result: dict) -> dict | None:
    """The FROC curve on a log FP axis, its bootstrap band, and the seven rates with their
    intervals."""
    from medsight.tasks.detect_metrics import froc_sensitivity

    curve = result.get("curve")
    if not curve:
        return None
    rates = np.asarray(result["fps_per_image"], dtype=np.float64)
    x = np.asarray(curve["fps_per_image"], dtype=np.float64)
    s = np.asarray(curve["sensitivity"], dtype=np.float64)
    left, right = rates.min() / 1.6, max(rates.max() * 1.6, 1.0)
    grid = np.geomspace(left, right, 400)
    with _style():
        fig = new_figure(6.6, 4.0)
        ax = fig.subplots()
        band = result.get("band")
        if band:
            lower = np.array([np.nan if v is None else v for v in band["lower"]], dtype=float)
            upper = np.array([np.nan if v is None else v for v in band["upper"]], dtype=float)
            ax.fill_between(
                band["fps_per_image"], lower, upper, color=ACCENT, alpha=0.14, lw=0,
                label="95 % CI (bootstrap over images)",
            )  # fmt: skip
        ax.plot(grid, froc_sensitivity(x, s, grid), color=ACCENT, lw=2, label="FROC")
        values, lo, hi = [], [], []
        for entry in result["sensitivity"]:
            v = entry.get("value")
            ci = entry.get("ci") or [v, v]
            values.append(np.nan if v is None else v)
            lo.append(np.nan if v is None or ci[0] is None else v - ci[0])
            hi.append(np.nan if v is None or ci[1] is None else ci[1] - v)
        ax.errorbar(
            rates, values, yerr=[lo, hi], fmt="o", ms=5.5, mfc="white", mec=ACCENT, mew=1.5,
            ecolor=ACCENT, elinewidth=1, capsize=3, zorder=5, label="the 7 FROC points",
        )  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(rates, [_fps_label(r) for r in rates])
        ax.minorticks_off()
        ax.set(xlim=(left, right), ylim=(-0.01, 1.02))
        ax.set_xlabel("False positives per image")
        ax.set_ylabel("Lesion sensitivity")
        score = (result.get("score") or {}).get("value")
        shown = UNDEFINED if score is None else f"{score:.3f}"
        ax.set_title(f"FROC · score (mean of the 7 points) {shown}", loc="left")
        ax.legend(loc="lower right")
        return embed_figure(fig, "FROC curve: lesion sensitivity against false positives per image")


def _froc_section(page: _Page) -> dict:
    result = page.metrics.get("froc") or {}
    rows = [
        {"fps": _fps_label(r), **_cell(entry)}
        for r, entry in zip(result.get("fps_per_image") or [], result.get("sensitivity") or [])
    ]
    return {
        "froc": {
            "figure": _froc_figure(result) if result else None,
            "rows": rows,
            "score": _cell(result.get("score")),
            "n_lesions": result.get("n_lesions"),
            "n_images": result.get("n_images"),
            "iou": result.get("iou_threshold", 0.5),
        }
    }


def _detection_pr_figure(curves: dict, per_class: dict) -> dict | None:
    """One precision–recall panel per class at IoU 0.5 (COCO's interpolated precision)."""
    names = list(curves)
    if not names or all(curves[n] is None for n in names):
        return None
    nrows, ncols = _grid(len(names))
    with _style():
        fig = new_figure(2.6 * ncols + 0.5, 2.5 * nrows + 0.5)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for c, (ax, name) in enumerate(zip(axes, names)):
            ap = (((per_class.get(name) or {}).get("ap50")) or {}).get("value")
            shown = UNDEFINED if ap is None else f"{ap:.3f}"
            ax.set_title(f"{_plot_label(name, 16)} · AP@0.5 {shown}", loc="left", fontsize=9)
            ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02))
            ax.tick_params(labelsize=7.5)
            curve = curves[name]
            if curve is None:
                ax.text(
                    0.5, 0.5, "undefined:\nno true box", ha="center", va="center",
                    fontsize=8.5, color=MUTED, transform=ax.transAxes,
                )  # fmt: skip
                continue
            recall = np.asarray(curve["recall"], dtype=float)
            precision = np.asarray(curve["precision"], dtype=float)
            reached = precision > 0
            colour = _class_colour(c)
            ax.fill_between(recall, 0, precision, step="post", color=colour, alpha=0.12, lw=0)
            ax.plot(
                recall[reached], precision[reached], color=colour, lw=1.8, drawstyle="steps-post"
            )
        for ax in axes[len(names) :]:
            ax.set_visible(False)
        for ax in axes[: len(names)]:
            ax.label_outer()
        fig.supxlabel("Recall (share of lesions found)", fontsize=9.5)
        fig.supylabel("Precision", fontsize=9.5)
        return embed_figure(fig, "Precision–recall curve of each class at IoU 0.5")


def _detection_pr(page: _Page) -> dict:
    curves = (page.metrics.get("curves") or {}).get("pr") or {}
    per_class = page.metrics.get("per_class") or {}
    return {"detection_pr": {"figure": _detection_pr_figure(curves, per_class)}}


def _parse_box_list(text: Any, with_score: bool) -> list:
    """A ``boxes`` / ``true_boxes`` cell: a JSON list of ``[x1, y1, x2, y2, "class"(, score)]``;
    anything unreadable is no boxes."""
    try:
        boxes = json.loads(text) if isinstance(text, str) and text.strip() else []
    except json.JSONDecodeError:
        return []
    size = 6 if with_score else 5
    return [b for b in boxes if isinstance(b, list) and len(b) == size]


def _gallery_threshold(metrics: dict) -> tuple[float, str]:
    """The score from which predicted boxes are drawn, and how it was chosen."""
    for point in metrics.get("operating_points") or []:
        target = point.get("fps_per_image_target", -1)
        if math.isclose(target, GALLERY_FPS) and point.get("threshold") is not None:
            return float(point["threshold"]), f"the {GALLERY_FPS:g} FP / image operating point"
    return GALLERY_DEFAULT_THRESHOLD, "a default threshold (no operating point was recorded)"


def _box_arrays(pred: pd.DataFrame, classes: list[str], threshold: float):
    """The ``true_boxes`` and ``boxes`` columns (pixels) as the metric arrays; predicted boxes
    below ``threshold`` and boxes of unknown classes are left out."""
    index = {name: k for k, name in enumerate(classes)}
    truth = [
        [b[:4] + [index[b[4]]] for b in _parse_box_list(t, False) if b[4] in index]
        for t in pred["true_boxes"]
    ]
    found = [
        [b[:4] + [b[5], index[b[4]]] for b in _parse_box_list(t, True) if b[4] in index]
        for t in pred["boxes"]
    ]
    found = [[b for b in boxes if b[4] >= threshold] for boxes in found]
    n = len(pred)
    gt = np.zeros((n, max(1, max(map(len, truth), default=0)), 5))
    gt[..., 4] = -1
    dt = np.zeros((n, max(1, max(map(len, found), default=0)), 6))
    dt[..., 5] = -1
    for i, (t, f) in enumerate(zip(truth, found)):
        if t:
            gt[i, : len(t)] = t
        if f:
            dt[i, : len(f)] = sorted(f, key=lambda b: -b[4])
    return gt, dt


def _boxed_thumbnail(source: str, window, truth: np.ndarray, found: np.ndarray, size) -> str:
    """The image with its true boxes (green) and predicted boxes (blue, score beside each),
    drawn at the thumbnail's own resolution so lines and text stay sharp."""
    from PIL import Image, ImageDraw, ImageFont

    from medsight.data.imaging import decode
    from medsight.explain.overlay import display_image

    pixels = np.clip(decode(source, window=window).pixels, 0.0, 1.0)
    image = Image.fromarray(display_image(pixels, min_side=1))
    width, height = size if size else image.size
    scale = THUMBNAIL_SIDE / max(image.size)
    shown = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    small = max(image.size) < THUMBNAIL_SIDE
    image = image.resize(
        shown, Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS
    ).convert("RGB")
    sx, sy = shown[0] / float(width), shown[1] / float(height)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    for x1, y1, x2, y2, _ in truth:
        draw.rectangle((x1 * sx, y1 * sy, x2 * sx - 1, y2 * sy - 1), outline=TRUTH_BOX, width=2)
    for x1, y1, x2, y2, score, _ in found:
        box = (x1 * sx, y1 * sy, x2 * sx - 1, y2 * sy - 1)
        draw.rectangle(box, outline=PRED_BOX, width=2)
        text = f"{score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left + 4, bottom - top + 3
        tx = min(max(0.0, box[0]), shown[0] - w)
        ty = box[1] - h if box[1] - h >= 0 else min(box[3] + 1, shown[1] - h)
        draw.rectangle((tx, ty, tx + w, ty + h), fill=PRED_BOX)
        draw.text((tx + 2 - left, ty + 1 - top), text, fill=(255, 255, 255), font=font)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _detection_gallery(page: _Page) -> dict:
    """Thumbnails of lesions found, lesions missed and false positives, at the 1 FP / image
    operating point; a note instead when the boxes or the images are not there."""
    from medsight.tasks.detect_metrics import match_detections

    n, pred = page.examples, page.pred
    threshold, chosen_by = _gallery_threshold(page.metrics)
    out: dict[str, Any] = {
        "groups": [],
        "note": None,
        "threshold": f"{threshold:.3f}",
        "chosen_by": chosen_by,
    }
    if n == 0:
        out["note"] = "No example images were requested (examples=0)."
        return {"detection_gallery": out}
    lacking = [c for c in ("boxes", "true_boxes") if c not in pred.columns]
    if lacking:
        out["note"] = f"predictions.csv has no {' or '.join(lacking)} column: no boxes to show."
        return {"detection_gallery": out}
    gt, dt = _box_arrays(pred, page.classes, threshold)
    m = match_detections(gt, dt)
    images = np.arange(len(pred))
    found = np.bincount(m.lesion_image[m.found], minlength=len(pred))
    missed = np.bincount(m.lesion_image[~m.found], minlength=len(pred))
    lesions = found + missed
    fp = np.bincount(m.det_image[~m.hit], minlength=len(pred))
    best_hit = np.full(len(pred), -np.inf)
    np.maximum.at(best_hit, m.det_image[m.hit], m.det_score[m.hit])
    top_fp = np.full(len(pred), -np.inf)
    np.maximum.at(top_fp, m.det_image[~m.hit], m.det_score[~m.hit])
    groups = (
        ("Lesions found", found > 0, -best_hit),
        ("Lesions missed", missed > 0, -missed.astype(float)),
        ("False positives", fp > 0, -top_fp),
    )
    data = page.metrics.get("data") or page.run.config.data.path
    try:
        table = page.run.load_data(data)
        sources = dict(zip(table["sample_id"].astype(str), table["source"]))
    except Exception as exc:  # noqa: BLE001 - a report never fails for want of its pictures
        out["note"] = (
            f"Example images are not shown: the data at {data} could not be read ({exc}). "
            "Restore the data at that path and write the report again to include them."
        )
        return {"detection_gallery": out}
    sizes = (
        list(zip(pred["width"], pred["height"]))
        if {"width", "height"} <= set(pred.columns)
        else [None] * len(pred)
    )
    failed = 0
    for title, members, order in groups:
        chosen = images[members]
        chosen = chosen[np.argsort(order[members], kind="stable")][:n]
        items = []
        for i in chosen:
            sample = str(pred["sample_id"].iloc[i])
            size = sizes[i]
            if size is not None and not all(np.isfinite(np.asarray(size, dtype=float))):
                size = None
            try:
                src = _boxed_thumbnail(
                    sources[sample], page.run.preprocess.window, gt[i][gt[i, :, 4] >= 0],
                    dt[i][dt[i, :, 5] >= 0], size,
                )  # fmt: skip
            except Exception:  # noqa: BLE001 - a missing or unreadable image is skipped
                failed += 1
                continue
            items.append(
                {
                    "src": src,
                    "sample_id": sample,
                    "found": int(found[i]),
                    "lesions": int(lesions[i]),
                    "fp": int(fp[i]),
                    "correct": bool(missed[i] == 0 and fp[i] == 0),
                    "truth": str(pred["label"].iloc[i]),
                }
            )
        out["groups"].append({"title": title, "items": items, "empty": chosen.size == 0})
    shown = sum(len(g["items"]) for g in out["groups"])
    if failed and not shown:
        out["groups"] = []
        out["note"] = (
            f"Example images are not shown: none of the {failed} chosen images could be read "
            f"from {data} (moved or deleted?)."
        )
    elif failed:
        out["note"] = f"{failed} chosen image(s) could not be read from {data} and are left out."
    return {"detection_gallery": out}


#: Every section the report can show, in the template's names: its anchor, its title in the
#: page's contents, and what it adds to the template's context. A task lists the ones it has.
SECTIONS: dict[str, tuple[str, str, Callable[[_Page], dict]]] = {
    "summary": ("summary", "Summary", _summary),
    "confusion": ("confusion", "Confusion matrix", _confusion),
    "curves": ("curves", "ROC & PR", _curves),
    "calibration": ("calibration", "Calibration", _calibration),
    "findings": ("findings", "Findings", _findings),
    "finding_curves": ("finding-curves", "Curves per finding", _finding_curves),
    "cooccurrence": ("cooccurrence", "Co-occurrence", _cooccurrence),
    "detection": ("detection", "Detection", _detection),
    "froc": ("froc", "FROC", _froc_section),
    "detection_pr": ("detection-pr", "Precision–recall", _detection_pr),
    "detection_gallery": ("detection-gallery", "Found & missed", _detection_gallery),
    "thresholds": ("operating-points", "Operating points", _thresholds),
    "per_class": ("per-class", "Per-class", _per_class),
    "subgroups": ("subgroups", "Subgroups", _subgroup_section),
    "training": ("training", "Training", _training),
    "examples": ("examples", "Examples", _example_section),
    "explanations": ("explanations", "Explanations", _explanation_section),
    "model_card": ("model-card", "Model card", _model_card),
}


def _build_context(page: _Page) -> dict:
    import medsight

    run, metrics, data = page.run, page.metrics, page.data
    versions = _read_optional_json(run.path / runs.VERSIONS) or {}
    warnings = [*(metrics.get("warnings") or []), *(metrics.get("notes") or [])]
    if data["leak_patients"]:
        warnings.append(
            f"{data['leak_patients']} patient(s) have images in more than one split (see "
            "splits.csv): the test metrics may be optimistic."
        )
    evaluated_on = str(metrics.get("data") or run.config.data.path)
    subgroup_warnings = sum(
        len(s.get("warnings") or []) for s in (metrics.get("subgroups") or {}).values()
    )
    context = {
        "title": run.path.resolve().name,
        "run_path": str(run.path),
        "generated": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "medsight_version": getattr(medsight, "__version__", versions.get("medsight", "")),
        "classes": page.classes,
        "positive": page.positive,
        "binary": page.k == 2,
        "multilabel": page.multilabel,
        "warnings": warnings,
        "subgroup_warnings": subgroup_warnings,
        "split": metrics.get("split", "test"),
        "n_eval": metrics.get("n", len(page.pred)),
        "evaluated_on": evaluated_on,
        "external": evaluated_on != str(run.config.data.path),
        "data_path": str(run.config.data.path),
        "data_format": run.config.data.format or "detected from the path",
        "data": data,
        "split_method": _split_method(
            run, data, "class" if page.task.samples_by_class else "finding"
        ),
        "sections": list(page.task.report_sections),
        "boxes": any(name in DETECTION_SECTIONS for name in page.task.report_sections),
        "nav": [],
    }
    for name in page.task.report_sections:
        anchor, title, build = SECTIONS[name]
        part = build(page)
        context.update(part)
        if any(value is not None for value in part.values()):  # e.g. no explanations yet
            context["nav"].append((anchor, title))
    context["embeds_images"] = bool(
        (context.get("examples") or {}).get("groups")
        or (context.get("detection_gallery") or {}).get("groups")
    )
    return context
