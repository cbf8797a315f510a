"""Several findings per image (CheXNet's setting): one sigmoid output per finding, binary
cross-entropy with per-finding positive weights, ignored (uncertain) labels masked out.

Targets are ``(N, K)`` float matrices: 1 present, 0 absent, NaN ignored
(:mod:`medsight.data.findings` writes and reads them).

Each finding is decided by its own threshold (:meth:`MultiLabelTask.decision_thresholds`:
the evaluated operating point, Youden's by default, else 0.5). The triage urgency of an image
(:func:`threshold_scaled`) is the highest, over the urgent findings, of the finding's
probability rescaled so that its own threshold sits at 0.5: an image with any urgent finding
above its threshold ranks above every image with none, and with thresholds of 0.5 the urgency
is the highest probability.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn

from medsight.data.findings import NO_FINDING, SEPARATOR, multi_hot, positives
from medsight.errors import ConfigError, DataError
from medsight.tasks.base import Task
from medsight.tasks.multilabel_metrics import HEADLINE

#: Positive weights (negatives / positives of a finding) are capped here: a finding seen a
#: handful of times would otherwise dominate the loss.
MAX_POSITIVE_WEIGHT = 50.0
#: A finding's threshold when the run was not evaluated (or its point is undefined).
DEFAULT_THRESHOLD = 0.5
#: The operating point findings are decided at by default (metrics.json ``thresholds``).
DEFAULT_POINT = "youden"


class FindingScore(BaseModel):
    """One finding of one image."""

    name: str
    probability: float
    above_threshold: bool = Field(description="Whether the probability reaches its threshold.")
    threshold: float


class FindingsPrediction(BaseModel):
    """The findings of one image: each with its probability, and those above threshold."""

    label: str = Field(description="The findings above their thresholds, joined by '|'.")
    confidence: float = Field(description="The highest finding probability.")
    findings: list[FindingScore]


class MaskedBCEWithLogits(nn.Module):
    """Binary cross-entropy over the known entries of an ``(N, K)`` target (NaN: ignored),
    each finding's positives weighted by ``pos_weight``; the mean over the known entries.
    ``focal``: torchvision's sigmoid focal loss (alpha 0.25, gamma 2) instead, masked alike."""

    def __init__(
        self,
        pos_weight: Tensor | None = None,
        label_smoothing: float = 0.0,
        *,
        focal: bool = False,
    ):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.label_smoothing = label_smoothing
        self.focal = focal

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        known = ~torch.isnan(targets)
        target = torch.nan_to_num(targets, nan=0.0)
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        if self.focal:
            from torchvision.ops import sigmoid_focal_loss

            loss = sigmoid_focal_loss(logits.float(), target, reduction="none")
        else:
            loss = nn.functional.binary_cross_entropy_with_logits(
                logits.float(), target, pos_weight=self.pos_weight, reduction="none"
            )
        return (loss * known).sum() / known.sum().clamp(min=1)


class MultiLabelTask(Task):
    """Independent sigmoid outputs, one per finding."""

    name = "multilabel"
    validation_metrics = ("average_precision", "auroc")
    progress_metrics = ("auroc",)
    headline_metrics = HEADLINE
    report_sections = (
        "summary",
        "findings",
        "finding_curves",
        "thresholds",
        "cooccurrence",
        "subgroups",
        "training",
        "examples",
        "explanations",
        "model_card",
    )
    subgroup_metrics = ("auroc_macro", "average_precision_macro", "hamming_loss")
    prediction_schema = FindingsPrediction

    samples_by_class = False

    # ------------------------------------------------------------------ training

    def check_training_table(self, table: pd.DataFrame) -> tuple[list[str], list[str]]:
        """The table's findings, in order. A finding with no positive image in the training
        split cannot be learned and one with none in validation cannot be scored: both are
        notes (its metrics are shown as undefined), not errors."""
        findings = list(table.attrs.get("classes") or [])
        if not findings:
            raise DataError("a multi-label table names no finding (table.attrs['classes'])")
        development = table[table["split"].isin(["train", "val"])]
        unlabelled = int(development["label"].isna().sum())
        if unlabelled:
            raise DataError(
                f"{unlabelled} training/validation images have no label; training needs "
                "labelled data (an image with no finding is labelled 'no finding', not left blank)"
            )
        notes = []
        for split in ("train", "val"):
            rows = development[development["split"] == split]
            if rows.empty:
                raise DataError(
                    f"the {split} split is empty; check the split ratios or split column"
                )
            present = positives(rows["label"], findings).sum(axis=0)
            missing = [name for name, n in zip(findings, present) if n == 0]
            if missing:
                effect = "cannot be learned" if split == "train" else "cannot be validated"
                notes.append(
                    f"finding(s) {missing} have no positive image in the {split} split: they "
                    f"{effect}, and their metrics are undefined"
                )
        return findings, notes

    def positive_class(self, classes: Sequence[str], requested: str | None) -> str | None:
        """None: each finding has its own threshold; the urgent ones are in ``classes.json``."""
        if requested is not None and requested not in classes:
            raise ConfigError(f"positive_class {requested!r} is not a finding; findings: {classes}")
        return requested

    def targets(self, labels: Sequence[Any], classes: Sequence[str]) -> np.ndarray:
        return multi_hot(list(labels), classes)

    def build_loss(
        self, class_counts: np.ndarray | None, label_smoothing: float, loss: str = "auto"
    ) -> nn.Module:
        """``class_counts``: ``(2, K)`` — positives and negatives per finding (None: unweighted).
        ``loss="focal"``: the sigmoid focal loss, which balances by down-weighting easy entries
        instead of by positive weights."""
        if loss == "focal":
            return MaskedBCEWithLogits(label_smoothing=label_smoothing, focal=True)
        weight = positive_weights(class_counts) if class_counts is not None else None
        return MaskedBCEWithLogits(weight, label_smoothing)

    def validation_scores(
        self, logits: Tensor, targets: Tensor, positive_index: int
    ) -> dict[str, float | None]:
        loss = MaskedBCEWithLogits()(logits.float(), targets.float()).item()
        probs = torch.sigmoid(logits.float()).numpy()
        y = targets.numpy()
        return {"loss": loss, **mean_scores(y, probs)}

    # ------------------------------------------------------------------ prediction

    def probabilities(self, logits: np.ndarray, calibration: dict | None = None) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float64)
        if calibration and calibration.get("method") == "per-finding temperature":
            logits = logits / np.asarray(calibration["temperatures"], dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-logits))

    def calibrate(self, logits: np.ndarray, targets: np.ndarray) -> dict:
        """One temperature per finding, fitted by binary log-loss on the known entries."""
        from scipy.optimize import minimize_scalar

        logits = np.asarray(logits, dtype=np.float64)
        targets = np.asarray(targets, dtype=np.float64)
        temperatures = []
        for k in range(logits.shape[1]):
            known = ~np.isnan(targets[:, k])
            z, t = logits[known, k], targets[known, k]
            if known.sum() == 0 or t.min() == t.max():
                temperatures.append(1.0)
                continue

            def nll(log_t, z=z, t=t):
                s = z / np.exp(log_t)
                return float(np.mean(np.logaddexp(0, s) - t * s))

            best = minimize_scalar(nll, bounds=(-3, 3), method="bounded")
            temperatures.append(float(np.exp(best.x)))
        return {"method": "per-finding temperature", "temperatures": temperatures}

    def decode(
        self,
        probs: np.ndarray,
        classes: Sequence[str],
        thresholds: Sequence[float] | Mapping[str, float] | None = None,
        sizes=None,
    ) -> list[dict[str, Any]]:
        """Each finding with its probability against its threshold (default 0.5; a sequence
        in finding order or a ``{finding: threshold}`` mapping); ``label``: the findings above
        threshold joined by ``|`` (``"no finding"`` when none is)."""
        probs = np.asarray(probs, dtype=np.float64)
        cut = _thresholds(thresholds, classes)
        out = []
        for row in probs:
            above = row >= cut
            findings = [
                {
                    "name": name,
                    "probability": float(p),
                    "above_threshold": bool(a),
                    "threshold": float(c),
                }
                for name, p, a, c in zip(classes, row, above, cut)
            ]
            names = [name for name, a in zip(classes, above) if a]
            label = SEPARATOR.join(names) if names else NO_FINDING
            out.append({"label": label, "confidence": float(row.max()), "findings": findings})
        return out

    def decision_thresholds(
        self, classes: Sequence[str], operating_points: dict[str, dict], point: str = DEFAULT_POINT
    ) -> list[float]:
        """Each finding's threshold at the evaluated operating ``point`` (``metrics.json``'s
        ``thresholds``: ``{finding: {point: {"threshold": t, ...}}}``); 0.5 for every finding
        of a run that was not evaluated, and for a finding whose point is undefined (no
        positive image in the evaluated split). A point the evaluation did not compute is
        refused, listing those it did."""
        operating_points = operating_points or {}
        if not operating_points:
            return [DEFAULT_THRESHOLD] * len(classes)
        known = sorted({p for points in operating_points.values() for p in (points or {})})
        if point not in known:
            raise ConfigError(
                f"operating point {point!r} is not in the run's metrics.json; evaluated points: "
                f"{', '.join(known) or 'none'}"
            )
        out = []
        for name in classes:
            value = ((operating_points.get(name) or {}).get(point) or {}).get("threshold")
            out.append(DEFAULT_THRESHOLD if value is None else float(value))
        return out

    def triage(
        self,
        probs: np.ndarray,
        classes: Sequence[str],
        positive: str | None,
        *,
        thresholds: Sequence[float] | Mapping[str, float] | None = None,
        urgent: Sequence[str] | None = None,
    ) -> tuple[float, str]:
        """The urgency of one image's ``(K,)`` probabilities and the finding that set it.

        Over the ``urgent`` findings (default: ``positive`` when set, else every finding), the
        highest :func:`threshold_scaled` probability, each finding against its own threshold
        (default 0.5); ties go to the earlier finding. An urgency of 0.5 or more means the
        driving finding reached its threshold.

        >>> MultiLabelTask().triage(np.array([0.4, 0.6]), ["a", "b"], None, thresholds=[0.2, 0.8])
        (0.625, 'a')
        """
        probs = np.asarray(probs, dtype=np.float64).reshape(-1)
        names = list(classes)
        watched = list(urgent) if urgent else ([positive] if positive else names)
        unknown = [name for name in watched if name not in names]
        if unknown:
            raise ConfigError(
                f"urgent finding(s) {unknown} are not findings of this run; findings: {names}"
            )
        cut = _thresholds(thresholds, names)
        scores = [threshold_scaled(probs[names.index(n)], cut[names.index(n)]) for n in watched]
        best = int(np.argmax(scores))
        return float(scores[best]), watched[best]

    def urgency(
        self,
        probs: np.ndarray,
        classes: Sequence[str],
        positive: str | None,
        *,
        thresholds: Sequence[float] | Mapping[str, float] | None = None,
        urgent: Sequence[str] | None = None,
    ) -> float:
        """The triage score of :meth:`triage` (with default thresholds: the highest
        probability among the urgent findings; ``positive``: only that one)."""
        return self.triage(probs, classes, positive, thresholds=thresholds, urgent=urgent)[0]

    def explain_targets(
        self,
        probs: np.ndarray,
        classes: Sequence[str],
        thresholds: Sequence[float] | Mapping[str, float] | None = None,
    ) -> list[str]:
        """The findings above their thresholds, most probable first; the most probable
        finding when none is."""
        probs = np.asarray(probs, dtype=np.float64).reshape(-1)
        cut = _thresholds(thresholds, classes)
        order = np.argsort(-probs, kind="stable")
        above = [classes[int(i)] for i in order if probs[i] >= cut[i]]
        return above or [classes[int(order[0])]]

    def prediction_columns(self, classes: Sequence[str]) -> list[str]:
        return [f"p_{name}" for name in classes]

    # ------------------------------------------------------------------ evaluation

    def metrics(self, y, probs, classes, positive, *, n_bootstrap=1000, seed=0):
        from medsight.tasks.multilabel_metrics import compute_metrics

        return compute_metrics(y, probs, list(classes), n_bootstrap=n_bootstrap, seed=seed)

    def subgroup_scores(
        self, y, probs, classes, positive, masks, *, n_bootstrap=1000, seed=0, confidence=0.95
    ):
        from medsight.tasks.multilabel_metrics import subgroup_scores

        return subgroup_scores(
            y,
            probs,
            list(classes),
            masks,
            n_bootstrap=n_bootstrap,
            seed=seed,
            confidence=confidence,
        )

    def paired_difference(
        self, y, probs, base_probs, classes, positive, *, n_bootstrap=1000, seed=0
    ):
        from medsight.tasks.multilabel_metrics import paired_bootstrap_auroc

        return paired_bootstrap_auroc(
            y, probs, base_probs, list(classes), n_bootstrap=n_bootstrap, seed=seed
        )


def threshold_scaled(p: float, threshold: float) -> float:
    """``p`` rescaled piecewise-linearly so that ``threshold`` maps to 0.5, 0 to 0 and 1 to 1:
    ``0.5·p/t`` below the threshold, ``0.5 + 0.5·(p − t)/(1 − t)`` at or above it. Monotone in
    ``p``, and equal to ``p`` when ``t`` is 0.5.

    >>> threshold_scaled(0.3, 0.2), threshold_scaled(0.1, 0.2), threshold_scaled(0.7, 0.5)
    (0.5625, 0.25, 0.7)
    """
    t = min(max(float(threshold), 1e-6), 1 - 1e-6)
    p = float(p)
    return 0.5 * p / t if p < t else 0.5 + 0.5 * (p - t) / (1 - t)


def _thresholds(
    thresholds: Sequence[float] | Mapping[str, float] | None, classes: Sequence[str]
) -> np.ndarray:
    """Thresholds in finding order from a sequence, a ``{finding: t}`` mapping (missing
    findings: 0.5) or None (all 0.5)."""
    if thresholds is None:
        return np.full(len(classes), DEFAULT_THRESHOLD)
    if isinstance(thresholds, Mapping):
        unknown = sorted(set(thresholds) - set(classes))
        if unknown:
            raise ConfigError(f"thresholds name {unknown}, not findings; findings: {list(classes)}")
        return np.array([float(thresholds.get(n, DEFAULT_THRESHOLD)) for n in classes])
    cut = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if cut.shape != (len(classes),):
        raise ConfigError(f"got {cut.size} thresholds for {len(classes)} findings; give one each")
    return cut


def positive_weights(counts: np.ndarray) -> torch.Tensor:
    """``negatives / positives`` per finding, capped at :data:`MAX_POSITIVE_WEIGHT`; a finding
    with no positive example gets 1 (it cannot be learned; the trainer warns)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != 2:
        raise DataError("multi-label class counts must be (2, K): positives and negatives")
    pos, neg = counts
    weight = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
    return torch.tensor(np.clip(weight, 1e-3, MAX_POSITIVE_WEIGHT), dtype=torch.float32)


def mean_scores(y: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """Mean AUROC and average precision over the findings where both classes are present
    among the known entries (None when no finding is)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    aurocs, aps = [], []
    for k in range(y.shape[1]):
        known = ~np.isnan(y[:, k])
        t = y[known, k]
        if t.size == 0 or t.min() == t.max():
            continue
        aurocs.append(roc_auc_score(t, probs[known, k]))
        aps.append(average_precision_score(t, probs[known, k]))
    return {
        "average_precision": float(np.mean(aps)) if aps else None,
        "auroc": float(np.mean(aurocs)) if aurocs else None,
    }
