"""Shared statistics: one percentile interval, one bootstrap of a mean, one way to show a value
with its interval. Everything that reports a number with a 95 % CI goes through here, so the
report, the CLI, cv.html and the explanation tables agree on both the numbers and the text.

>>> format_value_ci({"value": 0.9123, "ci": [0.88, 0.94]})
'0.912 (0.880–0.940)'
>>> format_value_ci({"value": None, "ci": None})
'—'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["UNDEFINED", "bootstrap_ci", "format_ci", "format_number", "format_value_ci", "interval"]

#: How an undefined value (AUROC with one class present, an empty group…) is shown everywhere.
UNDEFINED = "—"


def interval(values: np.ndarray | None, confidence: float = 0.95) -> list[float] | None:
    """The central percentile interval of bootstrap ``values`` (non-finite ones ignored)."""
    if values is None:
        return None
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    alpha = (1 - confidence) / 2
    lo, hi = np.percentile(values, [100 * alpha, 100 * (1 - alpha)])
    return [float(lo), float(hi)]


def value_entry(
    value: float | None, values: np.ndarray | None, confidence: float = 0.95, *, reach: bool = False
) -> dict[str, Any]:
    """``{"value", "ci"}`` of a point value and its bootstrap ``values`` (an undefined value
    gives ``{"value": None, "ci": None}``); ``reach`` extends the interval to include the point
    value.

    >>> value_entry(0.9, np.array([0.8, 0.85, 0.95]), reach=True)["value"]
    0.9
    """
    if value is None or not math.isfinite(value):
        return {"value": None, "ci": None}
    ci = interval(values, confidence)
    if ci is not None and reach:
        ci = [min(ci[0], float(value)), max(ci[1], float(value))]
    return {"value": float(value), "ci": ci}


def bootstrap_ci(
    values: Sequence[float],
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """``{"value": mean, "ci": [lo, hi]}``: the mean with a seeded percentile-bootstrap interval.

    None and non-finite values are dropped; with one value (or ``n_bootstrap=0``) the interval
    is None, with none the value is None too.

    >>> bootstrap_ci([1.0, 1.0, 1.0])
    {'value': 1.0, 'ci': [1.0, 1.0]}
    """
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"value": None, "ci": None}
    mean = float(v.mean())
    if v.size == 1 or n_bootstrap <= 0:
        return {"value": mean, "ci": None}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(int(n_bootstrap), v.size))].mean(axis=1)
    return {"value": mean, "ci": interval(means, confidence)}


def _defined(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_number(value: float | None, digits: int = 3) -> str:
    """``0.912``; tiny non-zero values in scientific notation; None/NaN as :data:`UNDEFINED`."""
    if not _defined(value):
        return UNDEFINED
    if value != 0 and abs(value) < 10 ** (-digits):
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def format_ci(ci: Sequence[float | None] | None, digits: int = 3) -> str | None:
    """``0.880–0.940`` (``-0.31 to -0.21`` when a bound is negative: a dash between minus
    signs reads as a subtraction), or None when there is no interval."""
    if not ci or not _defined(ci[0]) or not _defined(ci[1]):
        return None
    joint = " to " if min(ci[0], ci[1]) < 0 else "–"
    return f"{format_number(ci[0], digits)}{joint}{format_number(ci[1], digits)}"


def format_value_ci(entry: Any, digits: int = 3) -> str:
    """A ``{"value", "ci"}`` entry (or a bare number) as ``0.912 (0.880–0.940)``."""
    value, ci = (entry.get("value"), entry.get("ci")) if isinstance(entry, dict) else (entry, None)
    shown = format_number(value, digits)
    if shown == UNDEFINED:
        return shown
    text = format_ci(ci, digits)
    return f"{shown} ({text})" if text else shown
