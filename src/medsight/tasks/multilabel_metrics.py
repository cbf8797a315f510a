"""Multi-label metrics: per finding and across findings, with image-level bootstrap CIs.

``y`` is an ``(N, K)`` matrix of 1 (present), 0 (absent) and NaN (ignored: an uncertain label
left out), ``probs`` the ``(N, K)`` sigmoid probabilities. Point values come from scikit-learn.

How ignored (NaN) entries are treated: they are masked, never guessed.

* Per finding, only the images where that finding is known count.
* ``auroc_macro`` / ``average_precision_macro``: the mean over the findings that are defined
  (both present and absent among their known entries); the others are named in ``notes``.
* ``auroc_micro`` / ``average_precision_micro``: all known (image, finding) entries pooled.
* ``hamming_loss``: the share of known entries called wrongly, at the decision threshold
  :data:`DECISION_THRESHOLD` (0.5, the threshold the decoded label uses, so it describes the
  ``predicted`` column of ``predictions.csv``; per-finding Youden thresholds would be chosen on
  the very split they score, and flatter it).
* ``subset_accuracy``: the share of images whose known findings are all called right.
* ``label_ranking_average_precision``: scikit-learn's per-image LRAP over that image's known
  findings (an image whose known findings are all present or all absent scores 1).
* Images with no known entry at all are left out of the last three.

CIs are percentile intervals over bootstrap resamples of *images*, drawn once for all findings
(each resample is one set of image indices, so the findings stay paired, as do two models in
:func:`paired_bootstrap_auroc`); a finding undefined in a resample (say, no positive drawn) is
skipped there. The resampled values are weighted sums (a resample is a row of multiplicities
over the images), so 1,000 resamples cost a few vectorised passes, not 1,000 scikit-learn calls.

>>> result = compute_metrics(y, probs, ["effusion", "mass"])     # doctest: +SKIP
>>> result["per_finding"]["mass"]["auroc"]                        # doctest: +SKIP
{'value': 0.91, 'ci': [0.87, 0.94]}
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    hamming_loss,
    label_ranking_average_precision_score,
    roc_auc_score,
    roc_curve,
)

from medsight.calibration import bin_index
from medsight.errors import ConfigError, DataError
from medsight.stats import interval, value_entry
from medsight.tasks.classify_metrics import ECE_BINS, operating_points

__all__ = [
    "DECISION_THRESHOLD",
    "HEADLINE",
    "PER_FINDING",
    "SUBGROUP_METRICS",
    "compute_metrics",
    "paired_bootstrap_auroc",
    "subgroup_scores",
]

HEADLINE = (
    "auroc_macro",
    "auroc_micro",
    "average_precision_macro",
    "average_precision_micro",
    "hamming_loss",
    "subset_accuracy",
    "label_ranking_average_precision",
)
PER_FINDING = ("prevalence", "auroc", "average_precision", "ece")
SUBGROUP_METRICS = ("auroc_macro", "average_precision_macro", "hamming_loss")
#: A finding is called present when its probability is at least this (as the decoded label).
DECISION_THRESHOLD = 0.5
#: ROC curves in metrics.json are thinned to at most this many points per finding.
MAX_CURVE_POINTS = 200
_CHUNK_ELEMENTS = 2_000_000  # weight-matrix cells per bootstrap chunk (~16 MB)


# --------------------------------------------------------------------------- validation


def _validate(y_true, probs, findings) -> tuple[np.ndarray, np.ndarray, list[str]]:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise DataError(f"probs must be a non-empty (images × findings) array; got shape {p.shape}")
    if not np.isfinite(p).all():
        row = int(np.flatnonzero(~np.isfinite(p).all(axis=1))[0])
        raise DataError(f"probs row {row} holds NaN or infinity: {p[row].tolist()}")
    if (p < 0).any() or (p > 1).any():
        row = int(np.flatnonzero(((p < 0) | (p > 1)).any(axis=1))[0])
        raise DataError(
            f"probs row {row} holds values outside [0, 1]: {p[row].tolist()}; pass sigmoid "
            "probabilities, not logits"
        )
    names = [str(f) for f in findings]
    if len(names) != p.shape[1]:
        raise ConfigError(
            f"probs has {p.shape[1]} columns but {len(names)} finding names were given "
            f"({names}); give one name per probability column, in column order"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"finding names must be unique; got {names}")
    try:
        y = np.asarray(y_true, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError("y must be an (images × findings) matrix of 1, 0 or NaN") from None
    if y.shape != p.shape:
        raise DataError(
            f"y has shape {y.shape} but probs {p.shape}; they must match (images × findings)"
        )
    bad = ~(np.isnan(y) | (y == 0) | (y == 1))
    if bad.any():
        i, k = (int(v[0]) for v in np.nonzero(bad))
        raise DataError(
            f"y[{i}, {k}] (finding {names[k]!r}) is {y[i, k]!r}; entries must be 1 (present), "
            "0 (absent) or NaN (ignored)"
        )
    return y, p, names


def _check_bootstrap(n_bootstrap: int, confidence: float) -> None:
    if isinstance(n_bootstrap, bool) or int(n_bootstrap) != n_bootstrap or n_bootstrap < 0:
        raise ConfigError(f"n_bootstrap must be a whole number ≥ 0; got {n_bootstrap!r}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be between 0 and 1 (e.g. 0.95); got {confidence!r}")


# --------------------------------------------------------------------------- bootstrap engine


def _multiplicities(n: int, n_bootstrap: int, seed: int, cells_per_row: int):
    """Yield ``(b, n)`` float arrays: how often each image occurs in each resample. One seeded
    stream, so every caller with the same ``seed`` and ``n`` draws the same resamples."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, cells_per_row))
    done = 0
    while done < n_bootstrap:
        b = min(chunk, n_bootstrap - done)
        idx = rng.integers(0, n, size=(b, n))
        flat = (idx + (np.arange(b) * n)[:, None]).ravel()
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
        done += b


class _WeightedRanking:
    """AUROC and average precision of one score column under sample weights, as scikit-learn
    defines them on the resampled rows (ties as one threshold). NaN where a resample lacks
    positives or negatives."""

    def __init__(self, scores: np.ndarray, is_pos: np.ndarray):
        self.order = np.argsort(scores, kind="stable")
        s = scores[self.order]
        self.starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # tie groups, ascending
        self.pos = is_pos[self.order].astype(np.float64)

    def __call__(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ws = w[:, self.order]
        pw = np.add.reduceat(ws * self.pos, self.starts, axis=1)
        nw = np.add.reduceat(ws * (1.0 - self.pos), self.starts, axis=1)
        n_pos, n_neg = pw.sum(axis=1), nw.sum(axis=1)
        defined = (n_pos > 0) & (n_neg > 0)
        below = np.cumsum(nw, axis=1) - nw  # Mann–Whitney with mid-ranks for ties
        with np.errstate(invalid="ignore", divide="ignore"):
            auroc = (pw * (below + 0.5 * nw)).sum(axis=1) / (n_pos * n_neg)
            tp = np.cumsum(pw[:, ::-1], axis=1)
            fp = np.cumsum(nw[:, ::-1], axis=1)
            precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
            ap = (pw[:, ::-1] * precision).sum(axis=1) / n_pos
        return np.where(defined, auroc, np.nan), np.where(defined, ap, np.nan)


def _row_lrap(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """scikit-learn's label ranking average precision of each image over its known findings
    (NaN for an image with none known)."""
    known = ~np.isnan(y)
    relevant = known & (y == 1)
    # at_least[i, r, j]: finding j is known and scored at least as high as finding r
    at_least = known[:, None, :] & (p[:, None, :] >= p[:, :, None])
    rank = at_least.sum(axis=2)
    above = (at_least & relevant[:, None, :]).sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(relevant, above / np.maximum(rank, 1), 0.0)
        n_rel, n_known = relevant.sum(axis=1), known.sum(axis=1)
        score = ratio.sum(axis=1) / n_rel
    score = np.where((n_rel == 0) | (n_rel == n_known), 1.0, score)
    return np.where(n_known > 0, score, np.nan)


class _Engine:
    """Everything per image and per finding that the resampled metrics are weighted sums of."""

    def __init__(self, y: np.ndarray, p: np.ndarray, *, micro: bool = True):
        self.n, self.k = y.shape
        known = ~np.isnan(y)
        target = np.nan_to_num(y, nan=0.0)
        self.known = known.astype(np.float64)
        self.target = target
        self.rankings: list[_WeightedRanking | None] = []
        self.ece_terms = []
        self.rows = []
        for k in range(self.k):
            rows = np.flatnonzero(known[:, k])
            self.rows.append(rows)
            t, s = target[rows, k], p[rows, k]
            defined = rows.size and 0 < t.sum() < rows.size
            self.rankings.append(_WeightedRanking(s, t == 1) if defined else None)
            self.ece_terms.append(np.eye(ECE_BINS)[bin_index(s, ECE_BINS)] * (t - s)[:, None])
        self.micro = None
        if micro:
            image, finding = np.nonzero(known)
            t = target[image, finding]
            if 0 < t.sum() < t.size:
                self.micro = (image, _WeightedRanking(p[image, finding], t == 1))
        wrong = known & ((p >= DECISION_THRESHOLD) != (target == 1))
        self.n_known = known.sum(axis=1).astype(np.float64)
        self.n_wrong = wrong.sum(axis=1).astype(np.float64)
        self.has_known = (self.n_known > 0).astype(np.float64)
        self.all_right = ((self.n_wrong == 0) & (self.n_known > 0)).astype(np.float64)
        self.lrap = np.nan_to_num(_row_lrap(y, p), nan=0.0)

    def cells(self) -> int:
        """Weight-matrix cells one resample needs (to size bootstrap chunks)."""
        return self.n + (self.micro[0].size if self.micro else 0)

    def resampled(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """Metric values of each resample (rows of multiplicities ``w``); NaN = undefined."""
        b = w.shape[0]
        nan = np.full((b, self.k), np.nan)
        out = {name: nan.copy() for name in PER_FINDING}
        with np.errstate(invalid="ignore", divide="ignore"):
            for k in range(self.k):
                wk = w[:, self.rows[k]]
                total = wk.sum(axis=1)
                t = self.target[self.rows[k], k]
                out["prevalence"][:, k] = np.where(total > 0, wk @ t / total, np.nan)
                gap = np.abs(wk @ self.ece_terms[k]).sum(axis=1)
                out["ece"][:, k] = np.where(total > 0, gap / total, np.nan)
                if self.rankings[k] is not None:
                    out["auroc"][:, k], out["average_precision"][:, k] = self.rankings[k](wk)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows → NaN is meant
                out["auroc_macro"] = np.nanmean(out["auroc"], axis=1)
                out["average_precision_macro"] = np.nanmean(out["average_precision"], axis=1)
            out["auroc_micro"] = out["average_precision_micro"] = np.full(b, np.nan)
            if self.micro is not None:
                image, ranking = self.micro
                out["auroc_micro"], out["average_precision_micro"] = ranking(w[:, image])
            images = w @ self.has_known
            out["hamming_loss"] = w @ self.n_wrong / (w @ self.n_known)
            out["subset_accuracy"] = w @ self.all_right / images
            out["label_ranking_average_precision"] = w @ self.lrap / images
        return out


def _bootstrap(engine: _Engine, n_bootstrap: int, seed: int) -> dict[str, np.ndarray] | None:
    if n_bootstrap <= 0:
        return None
    parts = [
        engine.resampled(w)
        for w in _multiplicities(engine.n, int(n_bootstrap), seed, engine.cells())
    ]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


# --------------------------------------------------------------------------- point values


def _finding_ece(t: np.ndarray, s: np.ndarray) -> float | None:
    """Calibration error of one finding's probability: ``Σ_b (n_b / n) · |observed frequency_b −
    mean probability_b|`` over the equal-width bins classification's ECE uses."""
    if t.size == 0:
        return None
    gap = np.bincount(bin_index(s, ECE_BINS), weights=t - s, minlength=ECE_BINS)
    return float(np.abs(gap).sum() / t.size)


def _reliability(t: np.ndarray, s: np.ndarray) -> dict:
    """Reliability-diagram data of one finding: mean probability, observed frequency and count
    of each non-empty bin."""
    b = bin_index(s, ECE_BINS)
    count = np.bincount(b, minlength=ECE_BINS)
    used = count > 0
    mean_p = np.bincount(b, weights=s, minlength=ECE_BINS)[used] / count[used]
    freq = np.bincount(b, weights=t, minlength=ECE_BINS)[used] / count[used]
    return {
        "bin_edges": [float(e) for e in np.linspace(0.0, 1.0, ECE_BINS + 1)],
        "probability": [float(v) for v in mean_p],
        "frequency": [float(v) for v in freq],
        "count": [int(c) for c in count[used]],
    }


def _roc_points(t: np.ndarray, s: np.ndarray) -> dict:
    """The ROC curve of one finding, thinned to :data:`MAX_CURVE_POINTS` (ends kept)."""
    fpr, tpr, _ = roc_curve(t, s)
    if fpr.size > MAX_CURVE_POINTS:
        keep = np.unique(np.linspace(0, fpr.size - 1, MAX_CURVE_POINTS).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": [float(v) for v in fpr], "tpr": [float(v) for v in tpr]}


def _lrap(y: np.ndarray, p: np.ndarray) -> float | None:
    """scikit-learn's LRAP over the known entries: images grouped by which findings they have
    known, each group scored by scikit-learn on those columns, the scores averaged by size."""
    known = ~np.isnan(y)
    total, images = 0.0, 0
    patterns, group = np.unique(known, axis=0, return_inverse=True)
    for g, pattern in enumerate(patterns):
        if not pattern.any():
            continue
        rows = np.flatnonzero(group.ravel() == g)
        yg, pg = y[np.ix_(rows, pattern)], p[np.ix_(rows, pattern)]
        total += label_ranking_average_precision_score(yg, pg) * rows.size
        images += rows.size
    return total / images if images else None


def _point_values(y: np.ndarray, p: np.ndarray) -> dict:
    """Per finding and aggregate point values (scikit-learn); None where undefined."""
    n, k = y.shape
    known = ~np.isnan(y)
    per: dict[str, list] = {name: [] for name in PER_FINDING}
    for c in range(k):
        t, s = y[known[:, c], c], p[known[:, c], c]
        per["prevalence"].append(float(t.mean()) if t.size else None)
        per["ece"].append(_finding_ece(t, s))
        if t.size and 0 < t.sum() < t.size:
            per["auroc"].append(float(roc_auc_score(t, s)))
            per["average_precision"].append(float(average_precision_score(t, s)))
        else:
            per["auroc"].append(None)
            per["average_precision"].append(None)
    out = {"per_finding": per}
    for name, values in (("auroc", per["auroc"]), ("average_precision", per["average_precision"])):
        defined = [v for v in values if v is not None]
        out[f"{name}_macro"] = float(np.mean(defined)) if defined else None
    t_all, s_all = y[known], p[known]
    pred = (p >= DECISION_THRESHOLD).astype(np.float64)
    both = t_all.size and 0 < t_all.sum() < t_all.size
    out["auroc_micro"] = float(roc_auc_score(t_all, s_all)) if both else None
    out["average_precision_micro"] = float(average_precision_score(t_all, s_all)) if both else None
    out["hamming_loss"] = float(hamming_loss(t_all, pred[known])) if t_all.size else None
    rows = known.any(axis=1)
    # An ignored entry takes the predicted value, so it can never make an image wrong.
    filled = np.where(known, y, pred)
    out["subset_accuracy"] = float(accuracy_score(filled[rows], pred[rows])) if rows.any() else None
    out["label_ranking_average_precision"] = _lrap(y, p)
    return out


def _finding_notes(y: np.ndarray, names: list[str]) -> list[str]:
    known = ~np.isnan(y)
    notes = []
    for c, name in enumerate(names):
        t = y[known[:, c], c]
        if t.size == 0:
            notes.append(
                f"finding {name!r} has no labelled image here (every entry is ignored): all its "
                "metrics are undefined (—)"
            )
        elif t.sum() == 0 or t.sum() == t.size:
            lacking = "positive" if t.sum() == 0 else "negative"
            notes.append(
                f"finding {name!r} has no {lacking} image here (n={t.size}): its AUROC, average "
                "precision and operating points are undefined (—), and it is left out of the "
                "macro means"
            )
    return notes


# --------------------------------------------------------------------------- public API


def compute_metrics(
    y: np.ndarray,
    probs: np.ndarray,
    findings: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """The multi-label metric set with image-level bootstrap CIs: the body of ``metrics.json``.

    Returns (plain Python types only; undefined values are None and explained in ``notes``):

    * the :data:`HEADLINE` aggregates, each ``{"value", "ci"}`` (see the module docstring for
      their definitions and how ignored entries are masked);
    * ``per_finding``: per finding ``n_positive``, ``n_negative``, ``n_ignored``,
      ``prevalence``, ``auroc``, ``average_precision``, ``ece`` (``{"value", "ci"}`` each; ECE
      is that of the finding's probability in 15 equal-width bins) and ``operating_points``;
    * ``thresholds``: ``{finding: {"sensitivity_0.90" | "sensitivity_0.95" | "youden":
      {threshold, sensitivity, specificity, ppv, npv}}}``
      (:func:`~medsight.tasks.classify_metrics.operating_points`, the shape serving reads);
    * ``curves``: per finding its ROC points (``fpr``, ``tpr``) and reliability data;
    * ``n``, ``classes`` / ``findings``, ``positive`` (None), ``decision_threshold``, ``notes``.

    >>> m = compute_metrics([[1, 0], [0, 1]], [[0.9, 0.2], [0.1, 0.7]], ["a", "b"], n_bootstrap=0)
    >>> m["auroc_macro"], m["subset_accuracy"]
    ({'value': 1.0, 'ci': None}, {'value': 1.0, 'ci': None})
    """
    y, p, names = _validate(y, probs, findings)
    _check_bootstrap(n_bootstrap, confidence)
    n, k = p.shape
    point = _point_values(y, p)
    boot = _bootstrap(_Engine(y, p), int(n_bootstrap), seed)

    def resampled(name: str, c: int | None = None):
        if boot is None:
            return None
        return boot[name] if c is None else boot[name][:, c]

    result: dict = {
        "n": int(n),
        "classes": names,
        "findings": names,
        "positive": None,
        "decision_threshold": DECISION_THRESHOLD,
    }
    for name in HEADLINE:
        result[name] = value_entry(point[name], resampled(name), confidence)
    known = ~np.isnan(y)
    per_finding, thresholds, curves = {}, {}, {}
    for c, name in enumerate(names):
        t, s = y[known[:, c], c], p[known[:, c], c]
        points = operating_points(t, s)
        entry = {
            "n_positive": int(t.sum()),
            "n_negative": int(t.size - t.sum()),
            "n_ignored": int(n - t.size),
        }
        for metric in PER_FINDING:
            # Plug-in ECE only grows under resampling (binning noise), so its interval is
            # stretched to include the point value, as classification's is.
            entry[metric] = value_entry(
                point["per_finding"][metric][c],
                resampled(metric, c),
                confidence,
                reach=metric == "ece",
            )
        entry["operating_points"] = points
        per_finding[name] = entry
        thresholds[name] = points
        curves[name] = {
            "roc": _roc_points(t, s) if entry["n_positive"] and entry["n_negative"] else None,
            "reliability": _reliability(t, s) if t.size else None,
        }
    result["per_finding"] = per_finding
    result["thresholds"] = thresholds
    result["curves"] = curves
    notes = _finding_notes(y, names)
    ignored = int((~known).sum())
    if ignored:
        notes.append(
            f"{ignored} of {y.size} (image, finding) entries are ignored (uncertain labels): "
            "each is left out of its finding's metrics, the micro averages and the Hamming loss; "
            "subset accuracy and LRAP use each image's known findings"
        )
    if point["auroc_micro"] is None:
        notes.append(
            "micro AUROC and average precision are undefined: the known entries are all "
            "present or all absent"
        )
    result["notes"] = notes
    return result


def subgroup_scores(
    y: np.ndarray,
    probs: np.ndarray,
    findings: Sequence[str],
    masks: Sequence[np.ndarray],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> list[tuple[dict, list[str]]]:
    """:data:`SUBGROUP_METRICS` (``{"value", "ci"}`` each) within each boolean mask over the
    images, and notes on the findings each group cannot score (left out of its macro means).
    CIs are image-level bootstrap intervals within each group, as in :func:`compute_metrics`."""
    y, p, names = _validate(y, probs, findings)
    _check_bootstrap(n_bootstrap, confidence)
    out = []
    for mask in masks:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (y.shape[0],):
            raise DataError(f"a subgroup mask has shape {mask.shape}; expected ({y.shape[0]},)")
        if not mask.any():
            entries = {m: {"value": None, "ci": None} for m in SUBGROUP_METRICS}
            out.append((entries, ["the group is empty: its metrics are undefined"]))
            continue
        yg, pg = y[mask], p[mask]
        point = _point_values(yg, pg)
        boot = _bootstrap(_Engine(yg, pg, micro=False), int(n_bootstrap), seed)
        entries = {
            m: value_entry(point[m], boot[m] if boot else None, confidence)
            for m in SUBGROUP_METRICS
        }
        known = ~np.isnan(yg)
        lacking = [
            name for c, name in enumerate(names) if not 0 < np.nansum(yg[:, c]) < known[:, c].sum()
        ]
        notes = []
        if lacking:
            what = (
                "macro AUROC and AP undefined"
                if len(lacking) == len(names)
                else "left out of its macro AUROC and AP"
            )
            notes.append(
                f"n={int(mask.sum())} with no positive or no negative image of finding(s) "
                f"{', '.join(map(repr, lacking))}: {what}"
            )
        out.append((entries, notes))
    return out


def paired_bootstrap_auroc(
    y: np.ndarray,
    probs: np.ndarray,
    base_probs: np.ndarray,
    findings: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Compare two models' mean (macro) AUROC over the findings on the same images, with a
    paired image-level bootstrap; and each finding's AUROC the same way.

    ``difference`` is ``auroc_a − auroc_b`` (``probs`` is model a, ``base_probs`` model b) and
    ``ci`` its percentile interval over resamples on which both are scored. ``p_value`` is
    two-sided as in classification's test: ``min(1, 2 · min((1 + #{d ≤ 0}) / (B + 1),
    (1 + #{d ≥ 0}) / (B + 1)))``. ``per_finding`` holds the same keys per finding (all None
    for a finding without positives or negatives). ``ci`` and ``p_value`` are None when
    ``n_bootstrap`` is 0; everything is None, with a warning, when no finding is defined.
    """
    y, pa, names = _validate(y, probs, findings)
    _, pb, _ = _validate(y, base_probs, names)
    _check_bootstrap(n_bootstrap, confidence)
    empty = {"auroc_a": None, "auroc_b": None, "difference": None, "ci": None, "p_value": None}
    point_a, point_b = _point_values(y, pa), _point_values(y, pb)
    result = {**empty, "metric": "auroc_macro", "per_finding": {}}
    diffs = None
    if n_bootstrap > 0:
        engine_a, engine_b = _Engine(y, pa, micro=False), _Engine(y, pb, micro=False)
        chunks = [
            (engine_a.resampled(w)["auroc"], engine_b.resampled(w)["auroc"])
            for w in _multiplicities(y.shape[0], int(n_bootstrap), seed, engine_a.cells())
        ]
        diffs = np.concatenate([a - b for a, b in chunks])  # (B, K); NaN where undefined

    def test(a: float | None, b: float | None, d: np.ndarray | None) -> dict:
        if a is None or b is None:
            return dict(empty)
        out = {**empty, "auroc_a": a, "auroc_b": b, "difference": a - b}
        if d is not None:
            d = d[np.isfinite(d)]
            d = np.where(np.abs(d) < 1e-12, 0.0, d)  # rounding noise of identical models: a tie
            if d.size:
                m = d.size
                p_value = 2 * min((1 + (d <= 0).sum()) / (m + 1), (1 + (d >= 0).sum()) / (m + 1))
                out.update(ci=interval(d, confidence), p_value=float(min(1.0, p_value)))
        return out

    for c, name in enumerate(names):
        a, b = point_a["per_finding"]["auroc"][c], point_b["per_finding"]["auroc"][c]
        result["per_finding"][name] = test(a, b, None if diffs is None else diffs[:, c])
    macro = None
    if diffs is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resamples → NaN
            macro = np.nanmean(diffs, axis=1)
    result.update(test(point_a["auroc_macro"], point_b["auroc_macro"], macro))
    notes = _finding_notes(y, names)
    if point_a["auroc_macro"] is None:
        notes.append("mean AUROC is undefined: no finding has both positive and negative images")
    result["warnings"] = notes
    return result
