"""Calibration: how far predicted confidence is from observed accuracy, and how to fix it.

``expected_calibration_error`` and ``reliability_curve`` measure top-label calibration with
equal-width bins; ``TemperatureScaler`` (Guo et al., 2017) learns one temperature on validation
logits, and ``apply_calibration`` replays a saved calibration (``to_dict()``) at prediction time.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from medsight.errors import ConfigError, DataError

__all__ = [
    "TemperatureScaler",
    "apply_calibration",
    "expected_calibration_error",
    "reliability_curve",
]

SUM_TOLERANCE = 1e-3


def check_labels(y_true, n: int | None = None, k: int | None = None) -> np.ndarray:
    """Return ``y_true`` as a 1-D int64 array of class indices, or raise :class:`DataError`."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise DataError(f"y_true must be 1-D (one class index per sample); got shape {y.shape}")
    if y.size == 0:
        raise DataError("y_true is empty: there is nothing to evaluate")
    if y.dtype.kind not in "biu":
        try:
            yf = y.astype(float)
        except (TypeError, ValueError):
            raise DataError(
                f"y_true must hold integer class indices; got values of type {y.dtype}"
            ) from None
        bad = ~np.isfinite(yf) | (yf != np.round(yf))
        if bad.any():
            raise DataError(
                f"y_true must hold integer class indices; got {y[bad][0]!r} at position "
                f"{int(np.flatnonzero(bad)[0])}"
            )
        y = yf
    y = y.astype(np.int64)
    if n is not None and y.shape[0] != n:
        raise DataError(f"y_true has {y.shape[0]} labels but probs has {n} rows; they must match")
    if k is not None:
        out = (y < 0) | (y >= k)
        if out.any():
            raise DataError(
                f"y_true holds class index {int(y[out][0])} at position "
                f"{int(np.flatnonzero(out)[0])}; with {k} classes indices must be 0..{k - 1}"
            )
    return y


def check_probs(probs) -> np.ndarray:
    """Return ``probs`` as a float64 (N, K) array whose rows sum to 1 (renormalised exactly).

    Raises :class:`DataError` for a wrong shape, non-finite or negative values, or rows whose sum
    is off from 1 by more than ``SUM_TOLERANCE`` (the probabilities are then probably logits).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise DataError(f"probs must be 2-D (samples × classes); got shape {p.shape}")
    if p.shape[0] == 0:
        raise DataError("probs is empty: there is nothing to evaluate")
    if p.shape[1] < 2:
        raise DataError(f"probs must have one column per class (at least 2); got {p.shape[1]}")
    if not np.isfinite(p).all():
        row = int(np.flatnonzero(~np.isfinite(p).all(axis=1))[0])
        raise DataError(f"probs row {row} holds NaN or infinity: {p[row].tolist()}")
    if (p < -SUM_TOLERANCE).any() or (p > 1 + SUM_TOLERANCE).any():
        row = int(np.flatnonzero(((p < -SUM_TOLERANCE) | (p > 1 + SUM_TOLERANCE)).any(axis=1))[0])
        raise DataError(
            f"probs row {row} holds values outside [0, 1]: {p[row].tolist()}; pass "
            "probabilities (softmax of the logits), not logits"
        )
    sums = p.sum(axis=1)
    off = np.abs(sums - 1) > SUM_TOLERANCE
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise DataError(
            f"probs rows must sum to 1 (±{SUM_TOLERANCE}); row {row} sums to {sums[row]:.6g} "
            f"({int(off.sum())} rows are off): pass softmax probabilities, not logits or scores"
        )
    p = np.clip(p, 0.0, None)
    return p / p.sum(axis=1, keepdims=True)


def _check_pair(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    p = check_probs(probs)
    return check_labels(y_true, n=p.shape[0], k=p.shape[1]), p


def _check_bins(n_bins: int) -> int:
    if int(n_bins) != n_bins or n_bins < 1:
        raise ConfigError(f"n_bins must be a positive integer; got {n_bins!r}")
    return int(n_bins)


def bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each confidence on [0, 1]: bin b holds (b/M, (b+1)/M], bin 0 also 0."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)


def expected_calibration_error(y_true, probs, n_bins: int = 15) -> float:
    """Top-label ECE: ``Σ_b (n_b / N) · |accuracy_b − confidence_b|`` over equal-width bins.

    Confidence is the highest probability of a row and "correct" means its argmax is the true
    class (Guo et al., 2017).

    >>> round(expected_calibration_error([0, 0, 1, 1, 0], [[0.8, 0.2]] * 5), 6)  # 60 % right at 0.8
    0.2
    """
    y, p = _check_pair(y_true, probs)
    n_bins = _check_bins(n_bins)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    b = bin_index(confidence, n_bins)
    gap = np.bincount(b, weights=correct - confidence, minlength=n_bins)
    return float(np.abs(gap).sum() / y.shape[0])


def reliability_curve(y_true, probs, n_bins: int = 15) -> dict:
    """Data for a reliability diagram: mean confidence, accuracy and count of each non-empty bin.

    Returns ``{"bin_edges": [M + 1 edges], "confidence": [...], "accuracy": [...],
    "count": [...]}``; the last three list only the bins that hold samples, so the counts sum to N.
    """
    y, p = _check_pair(y_true, probs)
    n_bins = _check_bins(n_bins)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    b = bin_index(confidence, n_bins)
    count = np.bincount(b, minlength=n_bins)
    conf_sum = np.bincount(b, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(b, weights=correct, minlength=n_bins)
    used = count > 0
    return {
        "bin_edges": [float(e) for e in np.linspace(0.0, 1.0, n_bins + 1)],
        "confidence": [float(v) for v in conf_sum[used] / count[used]],
        "accuracy": [float(v) for v in acc_sum[used] / count[used]],
        "count": [int(c) for c in count[used]],
    }


def _check_logits(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2:
        raise DataError(f"logits must be a non-empty (samples × classes ≥ 2) array; got {z.shape}")
    if not np.isfinite(z).all():
        row = int(np.flatnonzero(~np.isfinite(z).all(axis=1))[0])
        raise DataError(f"logits row {row} holds NaN or infinity: {z[row].tolist()}")
    return z


def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    logp = log_softmax(logits / temperature, axis=1)
    return float(-logp[np.arange(y.shape[0]), y].mean())


class TemperatureScaler:
    """One temperature ``T > 0`` for all classes: ``probs = softmax(logits / T)``.

    ``T`` minimises the negative log-likelihood on held-out (validation) logits; ``T > 1`` softens
    an overconfident model. Accuracy never changes (the argmax is kept).

    >>> scaler = TemperatureScaler().fit(val_logits, val_labels)   # doctest: +SKIP
    >>> probs = scaler.transform(test_logits)                        # doctest: +SKIP
    >>> scaler.to_dict()                                             # doctest: +SKIP
    {'method': 'temperature', 'temperature': 2.7}
    """

    def __init__(self, bounds: tuple[float, float] = (1e-2, 1e2)):
        self.bounds = bounds

    def fit(self, logits, y) -> TemperatureScaler:
        """Fit ``temperature_`` on validation ``logits`` (N, K) and true class indices ``y``."""
        z = _check_logits(logits)
        y = check_labels(y, n=z.shape[0], k=z.shape[1])
        lo, hi = self.bounds
        if not 0 < lo < hi:
            raise ConfigError(f"bounds must satisfy 0 < low < high; got {self.bounds!r}")
        result = minimize_scalar(
            lambda log_t: _nll(z, y, math.exp(log_t)),
            bounds=(math.log(lo), math.log(hi)),
            method="bounded",
            options={"xatol": 1e-6},
        )
        self.temperature_ = float(math.exp(result.x))
        self.nll_before_ = _nll(z, y, 1.0)
        self.nll_after_ = _nll(z, y, self.temperature_)
        return self

    def transform(self, logits) -> np.ndarray:
        """Calibrated probabilities ``softmax(logits / temperature_)``, shape (N, K)."""
        if not hasattr(self, "temperature_"):
            raise ConfigError("TemperatureScaler is not fitted: call fit(logits, y) first")
        return softmax(_check_logits(logits) / self.temperature_, axis=1)

    def fit_transform(self, logits, y) -> np.ndarray:
        return self.fit(logits, y).transform(logits)

    def to_dict(self) -> dict:
        """``{"method": "temperature", "temperature": T}`` (JSON-ready; see ``from_dict``)."""
        if not hasattr(self, "temperature_"):
            raise ConfigError("TemperatureScaler is not fitted: call fit(logits, y) first")
        return {"method": "temperature", "temperature": float(self.temperature_)}

    @classmethod
    def from_dict(cls, d: dict) -> TemperatureScaler:
        """Rebuild a fitted scaler from ``to_dict()``'s output."""
        if not isinstance(d, dict) or d.get("method") != "temperature":
            raise ConfigError(
                f"calibration must be {{'method': 'temperature', 'temperature': T}}; got {d!r}"
            )
        t = d.get("temperature")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t < math.inf):
            raise ConfigError(f"calibration temperature must be a positive number; got {t!r}")
        scaler = cls()
        scaler.temperature_ = float(t)
        return scaler


_METHODS = {"temperature": TemperatureScaler}


def apply_calibration(logits, calibration: dict | None) -> np.ndarray:
    """Probabilities from ``logits`` with a saved calibration applied (``None``: plain softmax).

    >>> apply_calibration([[2.0, 0.0]], {"method": "temperature", "temperature": 2.0})
    array([[0.73105858, 0.26894142]])
    """
    if calibration is None:
        return softmax(_check_logits(logits), axis=1)
    method = calibration.get("method") if isinstance(calibration, dict) else None
    if method not in _METHODS:
        raise ConfigError(
            f"unknown calibration method {method!r}; known: {sorted(_METHODS)} (or null for none)"
        )
    return _METHODS[method].from_dict(calibration).transform(logits)
