"""Classification metrics with stratified-bootstrap confidence intervals, and operating points.

Point values come from scikit-learn. The bootstrap recomputes every metric on the same resamples
in one vectorised pass: a resample is a row of multiplicities over the original samples, so
means (accuracy, log loss, Brier), confusion matrices, ECE bins and rank-based AUROC / AP are
weighted sums rather than 1,000 calls into scikit-learn.

>>> result = compute_metrics(y, probs, ["normal", "pneumonia"])     # doctest: +SKIP
>>> result["auroc"]                                                  # doctest: +SKIP
{'value': 0.94, 'ci': [0.92, 0.96]}
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import sparse
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    roc_auc_score,
    roc_curve,
)

from medsight.calibration import (
    bin_index,
    check_labels,
    check_probs,
    expected_calibration_error,
)
from medsight.errors import ConfigError
from medsight.stats import interval, value_entry

__all__ = [
    "HEADLINE",
    "SUBGROUP_METRICS",
    "headline_scores",
    "compute_metrics",
    "operating_points",
    "paired_bootstrap_auroc",
    "stratified_bootstrap_indices",
    "subgroup_scores",
]

HEADLINE = (
    "accuracy",
    "balanced_accuracy",
    "auroc",
    "average_precision",
    "f1_macro",
    "f1_weighted",
    "log_loss",
    "brier",
    "ece",
)
PER_CLASS = ("sensitivity", "specificity", "precision", "npv", "f1")
SUBGROUP_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "auroc",
    "sensitivity",
    "specificity",
    "precision",
)
SENSITIVITY_TARGETS = (0.90, 0.95)
ECE_BINS = 15
_CHUNK_ELEMENTS = 2_000_000  # multiplicity-matrix cells per bootstrap chunk (~16 MB)


# --------------------------------------------------------------------------- validation


def _validate(y_true, probs, classes, positive) -> tuple[np.ndarray, np.ndarray, list, int | None]:
    p = check_probs(probs)
    k = p.shape[1]
    names = [str(c) for c in classes]
    if len(names) != k:
        raise ConfigError(
            f"probs has {k} columns but {len(names)} class names were given ({names}); "
            "give one name per probability column, in column order"
        )
    if len(set(names)) != k:
        raise ConfigError(f"class names must be unique; got {names}")
    y = check_labels(y_true, n=p.shape[0], k=k)
    if positive is None:
        pos = k - 1 if k == 2 else None
    elif str(positive) in names:
        pos = names.index(str(positive))
    else:
        raise ConfigError(f"positive class {positive!r} is not one of the classes {names}")
    return y, p, names, pos


def _check_bootstrap(n_bootstrap: int, confidence: float) -> None:
    if isinstance(n_bootstrap, bool) or int(n_bootstrap) != n_bootstrap or n_bootstrap < 0:
        raise ConfigError(f"n_bootstrap must be a whole number ≥ 0; got {n_bootstrap!r}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be between 0 and 1 (e.g. 0.95); got {confidence!r}")


# --------------------------------------------------------------------------- bootstrap engine


def stratified_bootstrap_indices(y_true, n_bootstrap: int, seed: int = 0) -> np.ndarray:
    """Resample indices, shape (n_bootstrap, N), drawn with replacement *within* each true class.

    Column ``j`` of every row holds a sample of the same class as sample ``j``, so each resample
    keeps the class counts exactly (``y[idx] == y`` row by row).

    >>> stratified_bootstrap_indices([0, 0, 1], 2, seed=0).shape
    (2, 3)
    """
    y = check_labels(y_true)
    return _draw_indices(y, int(n_bootstrap), np.random.default_rng(seed))


def _draw_indices(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    idx = np.empty((n, y.shape[0]), dtype=np.int64)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        idx[:, members] = members[rng.integers(0, members.shape[0], size=(n, members.shape[0]))]
    return idx


def _multiplicities(y: np.ndarray, n_bootstrap: int, seed: int):
    """Yield (b, N) float arrays: how often each sample occurs in each resample, chunk by chunk."""
    rng = np.random.default_rng(seed)
    n = y.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // n)
    done = 0
    while done < n_bootstrap:
        b = min(chunk, n_bootstrap - done)
        idx = _draw_indices(y, b, rng)
        flat = (idx + (np.arange(b) * n)[:, None]).ravel()
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
        done += b


class _Ranking:
    """One-vs-rest AUROC and AP of one score column under sample weights (rank-based)."""

    def __init__(self, scores: np.ndarray, is_pos: np.ndarray):
        self.order = np.argsort(scores, kind="stable")
        s = scores[self.order]
        self.starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # tie groups, ascending
        self.pos = is_pos[self.order].astype(np.float64)
        self.n_pos = float(is_pos.sum())
        self.n_neg = float(is_pos.shape[0] - is_pos.sum())

    def __call__(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ws = w[:, self.order]
        pw = np.add.reduceat(ws * self.pos, self.starts, axis=1)
        nw = np.add.reduceat(ws * (1.0 - self.pos), self.starts, axis=1)
        # AUROC = P(score_pos > score_neg) + ½ P(tie): Mann–Whitney with mid-ranks.
        below = np.cumsum(nw, axis=1) - nw
        auroc = (pw * (below + 0.5 * nw)).sum(axis=1) / (self.n_pos * self.n_neg)
        # AP = Σ over thresholds (descending) of Δrecall · precision, as scikit-learn defines it.
        tp = np.cumsum(pw[:, ::-1], axis=1)
        fp = np.cumsum(nw[:, ::-1], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        ap = (pw[:, ::-1] * precision).sum(axis=1) / self.n_pos
        return auroc, ap


def _ratios(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class one-vs-rest ratios from confusion matrices (..., K, K); 0/0 → NaN."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    fn = cm.sum(axis=-1) - tp
    fp = cm.sum(axis=-2) - tp
    tn = cm.sum(axis=(-2, -1))[..., None] - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "precision": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
        }


class _Context:
    """Everything per sample that the resampled metrics are weighted sums of."""

    def __init__(self, y: np.ndarray, p: np.ndarray, pos: int | None, ranked: bool = True):
        n, k = p.shape
        self.n, self.k, self.pos = n, k, pos
        pred = p.argmax(axis=1)
        self.correct = (pred == y).astype(np.float64)
        eps = np.finfo(np.float64).eps
        self.log_loss = -np.log(np.clip(p[np.arange(n), y], eps, 1 - eps))
        onehot = np.eye(k)[y]
        if k == 2:
            self.brier = (p[:, pos] - onehot[:, pos]) ** 2
        else:
            self.brier = ((p - onehot) ** 2).sum(axis=1)
        # (N, K²) one-hot confusion cell of each sample, sparse so that many classes stay cheap.
        self.cell = sparse.csr_matrix(
            (np.ones(n), (np.arange(n), y * k + pred)), shape=(n, k * k)
        ).T.tocsr()
        confidence = p.max(axis=1)
        self.ece_terms = (
            np.eye(ECE_BINS)[bin_index(confidence, ECE_BINS)] * (self.correct - confidence)[:, None]
        )
        self.support = np.bincount(y, minlength=k).astype(np.float64)
        present = self.support > 0
        self.rankings: list[_Ranking] = []
        if ranked and present.all():
            columns = [pos] if k == 2 else range(k)
            self.rankings = [_Ranking(p[:, c], y == c) for c in columns]

    def resampled(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """Metric values for each resample (rows of multiplicities ``w``); NaN = undefined."""
        n, k = self.n, self.k
        cm = np.asarray(self.cell @ w.T).T.reshape(-1, k, k)
        ratios = _ratios(cm)
        present = self.support > 0
        f1_zero = np.nan_to_num(ratios["f1"], nan=0.0)
        out = {
            "accuracy": w @ self.correct / n,
            "balanced_accuracy": ratios["sensitivity"][:, present].mean(axis=1),
            "f1_macro": f1_zero.mean(axis=1),
            "f1_weighted": f1_zero @ self.support / n,
            "log_loss": w @ self.log_loss / n,
            "brier": w @ self.brier / n,
            "ece": np.abs(w @ self.ece_terms).sum(axis=1) / n,
            **ratios,
        }
        nan = np.full(w.shape[0], np.nan)
        out["auroc"], out["average_precision"] = nan, nan
        if self.rankings:
            pairs = [r(w) for r in self.rankings]
            out["auroc"] = np.mean([a for a, _ in pairs], axis=0)
            out["average_precision"] = np.mean([ap for _, ap in pairs], axis=0)
        return out


def _bootstrap(ctx: _Context, y: np.ndarray, n_bootstrap: int, seed: int) -> dict[str, np.ndarray]:
    parts = [ctx.resampled(w) for w in _multiplicities(y, n_bootstrap, seed)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


# --------------------------------------------------------------------------- point values


def headline_scores(y: np.ndarray, p: np.ndarray, pos: int | None) -> dict:
    """AUROC (binary: of the positive class; else macro one-vs-rest), accuracy and balanced
    accuracy; AUROC is None when a class is absent. The trainer's validation metrics and the
    evaluation's point values both come from here.

    >>> headline_scores(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), 1)["auroc"]
    1.0
    """
    k = p.shape[1]
    pred = p.argmax(axis=1)
    present = np.bincount(y, minlength=k) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message=".*y_pred contains classes not in y_true")
        scores = {
            "auroc": None,
            "accuracy": float(accuracy_score(y, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        }
        if present.all():
            if k == 2:
                scores["auroc"] = float(roc_auc_score(y == pos, p[:, pos]))
            else:
                scores["auroc"] = float(
                    roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(k)))
                )
    return scores


def _point_values(y: np.ndarray, p: np.ndarray, pos: int | None) -> dict:
    """Headline metrics (scikit-learn) and per-class ratios; None where undefined."""
    n, k = p.shape
    labels = list(range(k))
    pred = p.argmax(axis=1)
    present = np.bincount(y, minlength=k) > 0
    with warnings.catch_warnings():
        # scikit-learn's undefined-metric chatter: medsight reports those values as None.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message=".*y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message=".*single label was found in 'y_true'")
        values = {
            **headline_scores(y, p, pos),
            "f1_macro": f1_score(y, pred, labels=labels, average="macro", zero_division=0),
            "f1_weighted": f1_score(y, pred, labels=labels, average="weighted", zero_division=0),
            "log_loss": log_loss(y, p, labels=labels),
            "average_precision": None,
        }
        if k == 2:
            values["brier"] = brier_score_loss(y == pos, p[:, pos])
        else:  # multi-class Brier: mean over samples of Σ_k (p_k − onehot_k)²
            values["brier"] = float(((p - np.eye(k)[y]) ** 2).sum(axis=1).mean())
        if present.all():
            if k == 2:
                values["average_precision"] = average_precision_score(y == pos, p[:, pos])
            else:
                values["average_precision"] = float(
                    np.mean([average_precision_score(y == c, p[:, c]) for c in labels])
                )
        cm = confusion_matrix(y, pred, labels=labels)
    values["ece"] = expected_calibration_error(y, p, n_bins=ECE_BINS)
    values["per_class"] = _ratios(cm.astype(np.float64))
    values["confusion_matrix"] = cm
    return values


def operating_points(y_binary, scores) -> dict:
    """Thresholds on ``scores`` (probability of one class) at clinically useful ROC points.

    ``sensitivity_0.90`` / ``sensitivity_0.95``: the highest threshold whose sensitivity reaches
    the target (the most specific such point); ``youden``: the threshold maximising
    sensitivity + specificity − 1 (the highest one on ties). A sample counts as positive when its
    score is ≥ the threshold; each point reports sensitivity, specificity, PPV and NPV on the data
    given (None when a ratio is 0/0). All points are None when only one class is present.

    >>> operating_points([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9])["youden"]["threshold"]
    0.9
    """
    y = np.asarray(y_binary).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    names = [f"sensitivity_{t:.2f}" for t in SENSITIVITY_TARGETS] + ["youden"]
    n_pos = int(y.sum())
    n_neg = int(y.shape[0] - n_pos)
    if n_pos == 0 or n_neg == 0:
        return dict.fromkeys(names)
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    thresholds = np.minimum(thresholds, 1.0)  # the first threshold is +inf: nothing positive
    tp = np.rint(tpr * n_pos).astype(np.int64)
    fp = np.rint(fpr * n_neg).astype(np.int64)

    def point(i: int) -> dict:
        fn, tn = n_pos - tp[i], n_neg - fp[i]
        return {
            "threshold": float(thresholds[i]),
            "sensitivity": float(tp[i] / n_pos),
            "specificity": float(tn / n_neg),
            "ppv": float(tp[i] / (tp[i] + fp[i])) if tp[i] + fp[i] else None,
            "npv": float(tn / (tn + fn)) if tn + fn else None,
        }

    out = {}
    for name, target in zip(names, SENSITIVITY_TARGETS):
        need = math.ceil(target * n_pos - 1e-9)
        out[name] = point(int(np.argmax(tp >= need)))  # thresholds descend: first = highest
    out["youden"] = point(int(np.argmax(tpr - fpr)))
    return out


# --------------------------------------------------------------------------- public API


def _absent_warnings(y: np.ndarray, names: list[str], k: int) -> list[str]:
    present = np.bincount(y, minlength=k) > 0
    if present.all():
        return []
    if present.sum() == 1:
        only = names[int(np.flatnonzero(present)[0])]
        return [
            f"AUROC is undefined because the split has only class {only!r} "
            f"(n={y.shape[0]}); average precision and operating points are undefined too"
        ]
    missing = ", ".join(repr(names[c]) for c in np.flatnonzero(~present))
    return [
        f"macro AUROC is undefined because class(es) {missing} are absent from the split; "
        "macro average precision and their operating points are undefined too"
    ]


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    positive: str | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Headline, per-class and threshold metrics of predicted probabilities, with bootstrap CIs.

    ``y_true`` holds class indices (N,), ``probs`` rows (N, K) summing to 1 (they are renormalised
    exactly), ``classes`` the K names. ``positive`` names the positive / most urgent class: for a
    binary task AUROC, average precision and Brier are those of that class (default
    ``classes[-1]``); for multi-class tasks AUROC and AP are macro one-vs-rest and Brier is
    ``mean_i Σ_k (p_ik − onehot_ik)²`` (``positive`` is only recorded). Predictions are the argmax.

    CIs are percentile intervals at ``confidence`` over ``n_bootstrap`` stratified resamples
    (with replacement within each true class, seeded by ``seed``), the same resamples for every
    metric; a metric undefined on a resample is skipped there. ECE's interval is extended to
    include its point value when needed: resampling only adds binning noise, so for a well-
    calibrated model the resampled ECEs can all lie above the point value. ``n_bootstrap=0``
    gives ``"ci": None``.

    Undefined values (0/0 ratios, AUROC of a one-class split) are None, never NaN, and are
    explained in ``"warnings"``. The result holds only plain Python types (``json.dumps`` works).
    Thresholds: one set of operating points (:func:`operating_points`) for the positive class of
    a binary task, one per class (one-vs-rest) for multi-class.
    """
    y, p, names, pos = _validate(y_true, probs, classes, positive)
    _check_bootstrap(n_bootstrap, confidence)
    n, k = p.shape
    point = _point_values(y, p, pos)
    boot = None
    if n_bootstrap > 0:
        boot = _bootstrap(_Context(y, p, pos), y, int(n_bootstrap), seed)

    def resampled(name: str, c: int | None = None):
        if boot is None:
            return None
        return boot[name] if c is None else boot[name][:, c]

    result: dict = {
        "n": int(n),
        "classes": names,
        "positive": names[pos] if pos is not None else None,
    }
    for name in HEADLINE:
        # Plug-in ECE is biased upward under resampling (binning noise only adds to it), so for a
        # well-calibrated model its percentile interval can lie wholly above the point value.
        reach = name == "ece"
        result[name] = value_entry(point[name], resampled(name), confidence, reach=reach)

    support = np.bincount(y, minlength=k)
    result["per_class"] = {
        name: {
            **{
                metric: value_entry(
                    float(point["per_class"][metric][c]), resampled(metric, c), confidence
                )
                for metric in PER_CLASS
            },
            "support": int(support[c]),
        }
        for c, name in enumerate(names)
    }
    result["confusion_matrix"] = [[int(v) for v in row] for row in point["confusion_matrix"]]
    columns = [pos] if k == 2 else range(k)
    result["thresholds"] = {names[c]: operating_points(y == c, p[:, c]) for c in columns}

    notes = _absent_warnings(y, names, k)
    reasons = {
        "sensitivity": "the split has no samples of that class",
        "specificity": "every sample belongs to that class",
        "precision": "it is never predicted",
        "npv": "it is always predicted",
        "f1": "it is neither present nor predicted",
    }
    for metric, why in reasons.items():
        undefined = [names[c] for c in range(k) if np.isnan(point["per_class"][metric][c])]
        if undefined:
            notes.append(f"per-class {metric} is undefined (null) for {undefined}: {why}")
    result["warnings"] = notes
    return result


def paired_bootstrap_auroc(
    y_true,
    probs_a,
    probs_b,
    classes,
    *,
    positive=None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Compare two models' AUROC on the same test samples with a paired stratified bootstrap.

    Both models are scored on the same resamples; ``difference`` is ``auroc_a − auroc_b`` (binary:
    AUROC of ``positive``; multi-class: macro one-vs-rest) and ``ci`` its percentile interval.
    ``p_value`` is two-sided: ``min(1, 2 · min((1 + #{d ≤ 0}) / (B + 1), (1 + #{d ≥ 0}) /
    (B + 1)))`` over the B resampled differences d (identical models give 1; a model better on
    every resample gives 2 / (B + 1)). ``ci`` and ``p_value`` are None when ``n_bootstrap`` is 0,
    every value is None (with a warning) when AUROC is undefined on these labels.
    """
    y, pa, names, pos = _validate(y_true, probs_a, classes, positive)
    _, pb, _, _ = _validate(y, probs_b, classes, positive)
    _check_bootstrap(n_bootstrap, confidence)
    result = {"auroc_a": None, "auroc_b": None, "difference": None, "ci": None, "p_value": None}
    notes = _absent_warnings(y, names, pa.shape[1])
    if notes:
        return {**result, "warnings": notes}
    auroc_a = _point_values(y, pa, pos)["auroc"]
    auroc_b = _point_values(y, pb, pos)["auroc"]
    result.update(
        auroc_a=float(auroc_a), auroc_b=float(auroc_b), difference=float(auroc_a - auroc_b)
    )
    if n_bootstrap > 0:
        ctx_a, ctx_b = _Context(y, pa, pos), _Context(y, pb, pos)
        diffs = []
        for w in _multiplicities(y, int(n_bootstrap), seed):
            auroc_a = np.mean([r(w)[0] for r in ctx_a.rankings], axis=0)
            auroc_b = np.mean([r(w)[0] for r in ctx_b.rankings], axis=0)
            diffs.append(auroc_a - auroc_b)
        d = np.concatenate(diffs)
        d = np.where(np.abs(d) < 1e-12, 0.0, d)  # rounding noise of identical models is a tie
        m = d.shape[0]
        p_value = 2 * min((1 + (d <= 0).sum()) / (m + 1), (1 + (d >= 0).sum()) / (m + 1))
        result.update(ci=interval(d, confidence), p_value=float(min(1.0, p_value)))
    return {**result, "warnings": []}


# --------------------------------------------------------------------------- subgroups


def _summarise(point: dict, boot: dict | None, pos: int | None, k: int) -> tuple[dict, dict]:
    """Pick the subgroup metrics from full point values / resamples (binary: the positive class;
    multi-class: the mean over classes where each is defined)."""
    values = {m: point[m] for m in ("accuracy", "balanced_accuracy", "auroc")}
    samples = {m: (boot[m] if boot else None) for m in values}
    for metric in ("sensitivity", "specificity", "precision"):
        per_class = point["per_class"][metric]
        if k == 2:
            values[metric] = float(per_class[pos])
            samples[metric] = boot[metric][:, pos] if boot else None
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN → NaN is intended
                values[metric] = float(np.nanmean(per_class))
                samples[metric] = np.nanmean(boot[metric], axis=1) if boot else None
    return values, samples


def subgroup_scores(
    y_true,
    probs,
    classes,
    masks: Sequence[np.ndarray],
    *,
    positive=None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> list[tuple[dict, list[str]]]:
    """:data:`SUBGROUP_METRICS` (``{"value", "ci"}`` each) within each boolean mask over the
    samples, and why any is undefined there (a class the group lacks).

    For a binary task sensitivity, specificity and precision are those of the ``positive`` class
    (default ``classes[-1]``); for multi-class tasks they are macro averages over the classes on
    which each is defined (macro sensitivity then equals balanced accuracy). AUROC is binary or
    macro one-vs-rest. CIs are stratified bootstrap intervals within each group, as in
    :func:`compute_metrics`.
    """
    y, p, names, pos = _validate(y_true, probs, classes, positive)
    _check_bootstrap(n_bootstrap, confidence)
    k = p.shape[1]
    out = []
    for mask in masks:
        yg, pg = y[mask], p[mask]
        point = _point_values(yg, pg, pos)
        boot = None
        if n_bootstrap > 0:
            boot = _bootstrap(_Context(yg, pg, pos), yg, int(n_bootstrap), seed)
        values, samples = _summarise(point, boot, pos, k)
        entries = {m: value_entry(values[m], samples[m], confidence) for m in SUBGROUP_METRICS}
        notes = []
        lacking = [names[c] for c in range(k) if not (yg == c).any()]
        if lacking:
            undefined = ["AUROC"]
            if k == 2:
                undefined.append("sensitivity" if names[pos] in lacking else "specificity")
            notes.append(
                f"n={int(mask.sum())} with no samples of class {', '.join(map(repr, lacking))}: "
                f"{' and '.join(undefined)} undefined"
            )
        out.append((entries, notes))
    return out
