"""Subgroup analysis: the same metrics per value of a metadata column (sex, site, age band), and
the gaps between the best and worst subgroup, with warnings where a subgroup is too small.

>>> report = subgroup_metrics(y, probs, classes, table["sex"], column="sex")   # doctest: +SKIP
>>> report["gaps"]["sensitivity"]                                              # doctest: +SKIP
{'gap': 0.12, 'highest': 'M', 'lowest': 'F'}
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from medsight.errors import ConfigError, DataError
from medsight.tasks import Task, get_task
from medsight.tasks.classify_metrics import SUBGROUP_METRICS  # the default task's; kept public

__all__ = ["SUBGROUP_METRICS", "age_bands", "bin_numeric", "subgroup_metrics"]

MISSING = "missing"


def bin_numeric(values, edges: Sequence[float] | None = None) -> pd.Series:
    """Bin numbers into ordered bands; missing values stay missing (NaN).

    Bands are ``[edge_i, edge_i+1)``. With integer edges they read ``"20-29"``, values below the
    first edge ``"<18"`` and from the last edge on ``"65+"``; other edges read ``"[0.5, 1.5)"``.
    Without ``edges`` the bands are the decades spanning the data. The result is an ordered
    categorical Series (same index as ``values`` when that is a Series).

    >>> list(bin_numeric([23, 38.5, None, 71]))
    ['20-29', '30-39', nan, '70-79']
    >>> list(bin_numeric([5, 30, 80], edges=[18, 65]))
    ['<18', '18-64', '65+']
    """
    series = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=object)
    try:
        v = pd.to_numeric(series, errors="raise").astype(np.float64).to_numpy()
    except (TypeError, ValueError) as exc:
        raise DataError(f"cannot bin non-numeric values into bands: {exc}") from None
    finite = np.isfinite(v)
    if edges is None:
        if not finite.any():
            return pd.Series(pd.Categorical([np.nan] * len(v)), index=series.index)
        lo = math.floor(v[finite].min() / 10) * 10
        hi = math.floor(v[finite].max() / 10) * 10 + 10
        e = np.arange(lo, hi + 1, 10, dtype=np.float64)
        below, above = False, False
    else:
        e = np.asarray(list(edges), dtype=np.float64)
        if e.ndim != 1 or e.size == 0 or not np.isfinite(e).all() or (np.diff(e) <= 0).any():
            raise ConfigError(f"edges must be finite and strictly increasing; got {list(edges)}")
        below, above = True, True
    integer = bool(np.all(e == np.round(e)))

    def fmt(x: float) -> str:
        return str(int(x)) if integer else f"{x:g}"

    labels = [f"<{fmt(e[0])}"] if below else []
    for a, b in zip(e[:-1], e[1:]):
        labels.append(f"{fmt(a)}-{fmt(b - 1)}" if integer else f"[{fmt(a)}, {fmt(b)})")
    if above:
        labels.append(f"{fmt(e[-1])}+")
    position = np.searchsorted(e, v, side="right") - 1  # -1: below the first edge
    position = position + (1 if below else 0)
    position = np.clip(position, 0, len(labels) - 1)
    codes = np.where(finite, position, -1)
    return pd.Series(
        pd.Categorical.from_codes(codes, categories=labels, ordered=True), index=series.index
    )


def age_bands(values, edges: Sequence[float] | None = None) -> pd.Series:
    """Ages in bands (default: decades such as ``"20-29"``); see :func:`bin_numeric`."""
    return bin_numeric(values, edges)


def _group_labels(groups, n: int, max_levels: int) -> tuple[np.ndarray, list[str], list[str]]:
    """Return each sample's group name, the names in display order, and notes."""
    series = groups if isinstance(groups, pd.Series) else pd.Series(list(groups), dtype=object)
    if len(series) != n:
        raise DataError(f"groups has {len(series)} values but there are {n} samples")
    series = series.reset_index(drop=True)
    notes = []
    is_numeric = pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
    if is_numeric and series.nunique(dropna=True) > max_levels:
        notes.append(
            f"numeric values with {series.nunique(dropna=True)} distinct levels were binned "
            "into decades"
        )
        series = bin_numeric(series)
    missing = series.isna().to_numpy()
    if isinstance(series.dtype, pd.CategoricalDtype):
        order = [str(c) for c in series.cat.categories if (series == c).any()]
    else:
        present = pd.unique(series[~missing])
        try:
            present = sorted(present)
        except TypeError:
            present = sorted(present, key=str)
        order = list(dict.fromkeys(str(v) for v in present))
    names = np.array([MISSING if m else str(v) for v, m in zip(series, missing)], dtype=object)
    if missing.any() and MISSING not in order:
        order.append(MISSING)
    return names, order, notes


def subgroup_metrics(
    y_true,
    probs,
    classes,
    groups: pd.Series | Sequence,
    *,
    column: str,
    positive=None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_size: int = 30,
    confidence: float = 0.95,
    max_levels: int = 10,
    task: Task | str | None = None,
) -> dict:
    """Metrics with bootstrap CIs for each subgroup given by ``groups`` (one value per sample).

    The metrics are the ``task``'s (default: classification) :attr:`~Task.subgroup_metrics`.
    Per group: ``n``, each metric as ``{"value", "ci"}``, and ``warning``. For classification
    they are ``accuracy``, ``balanced_accuracy``, ``auroc``, ``sensitivity``, ``specificity`` and
    ``precision``; for a binary task the last three are those of the ``positive`` class (default
    ``classes[-1]``), for multi-class tasks macro averages over the classes on which each is
    defined (macro sensitivity then equals balanced accuracy). AUROC is binary or macro
    one-vs-rest.

    Missing group values (NaN/None) form the group ``"missing"``. A numeric column with more than
    ``max_levels`` distinct values (e.g. age) is binned into decades first (:func:`bin_numeric`).
    A group smaller than ``min_size`` gets a warning, and so does one where the task finds a
    metric undefined (a class it lacks). ``gaps`` gives, per
    metric, ``max − min`` over the groups where it is defined and which groups those are (all
    None with fewer than two such groups). CIs are bootstrap intervals within each group (for
    classification stratified, as in :func:`~medsight.tasks.classify_metrics.compute_metrics`).
    """
    task = task if isinstance(task, Task) else get_task(task)
    if int(min_size) != min_size or min_size < 1:
        raise ConfigError(f"min_size must be a positive whole number; got {min_size!r}")
    labels, order, notes = _group_labels(groups, len(probs), max_levels)
    notes = [f"{column}: {note}" for note in notes]
    masks = [labels == name for name in order]
    scores = task.subgroup_scores(
        y_true,
        probs,
        classes,
        positive,
        masks,
        n_bootstrap=n_bootstrap,
        seed=seed,
        confidence=confidence,
    )

    out_groups: dict[str, dict] = {}
    for name, mask, (entries, undefined) in zip(order, masks, scores):
        entry: dict = {"n": int(mask.sum()), **entries}
        problems = []
        if mask.sum() < min_size:
            problems.append(
                f"only n={int(mask.sum())} samples (< {min_size}): its confidence intervals are "
                "too wide for its metrics to mean much"
            )
        problems += undefined
        entry["warning"] = "; ".join(problems) if problems else None
        notes += [f"{column}={name}: {problem}" for problem in problems]
        out_groups[name] = entry

    gaps = {}
    for metric in task.subgroup_metrics:
        defined = {g: e[metric]["value"] for g, e in out_groups.items()}
        defined = {g: v for g, v in defined.items() if v is not None}
        if len(defined) < 2:
            gaps[metric] = {"gap": None, "highest": None, "lowest": None}
            continue
        highest = max(defined, key=defined.get)
        # Another group than the highest, even when all are tied (a gap is between two groups).
        lowest = min((g for g in defined if g != highest), key=defined.get)
        gaps[metric] = {
            "gap": float(defined[highest] - defined[lowest]),
            "highest": highest,
            "lowest": lowest,
        }
    return {"column": column, "groups": out_groups, "gaps": gaps, "warnings": notes}
