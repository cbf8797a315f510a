"""Several findings per image (CheXNet's setting): one sigmoid output per finding, binary
cross-entropy with per-finding positive weights, ignored (uncertain) labels masked out.

Targets are ``(N, K)`` float matrices: 1 present, 0 absent, NaN ignored
(:mod:`medsight.data.findings` writes and reads them). The triage urgency of an image is the
highest probability among the urgent findings, each against its own threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn

from medsight.data.findings import NO_FINDING, SEPARATOR, multi_hot, positives
from medsight.errors import ConfigError, DataError
from medsight.tasks.base import Task

#: Positive weights (negatives / positives of a finding) are capped here: a finding seen a
#: handful of times would otherwise dominate the loss.
MAX_POSITIVE_WEIGHT = 50.0


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
    each finding's positives weighted by ``pos_weight``; the mean over the known entries."""

    def __init__(self, pos_weight: Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        known = ~torch.isnan(targets)
        target = torch.nan_to_num(targets, nan=0.0)
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        loss = nn.functional.binary_cross_entropy_with_logits(
            logits.float(), target, pos_weight=self.pos_weight, reduction="none"
        )
        return (loss * known).sum() / known.sum().clamp(min=1)


class MultiLabelTask(Task):
    """Independent sigmoid outputs, one per finding."""

    name = "multilabel"
    validation_metrics = ("average_precision", "auroc")
    progress_metrics = ("auroc",)
    headline_metrics = (
        "auroc_macro",
        "auroc_micro",
        "average_precision_macro",
        "average_precision_micro",
        "hamming_loss",
        "subset_accuracy",
        "label_ranking_average_precision",
    )
    report_sections = (
        "summary",
        "findings",
        "finding_curves",
        "thresholds",
        "cooccurrence",
        "subgroups",
        "training",
        "examples",
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

    def build_loss(self, class_counts: np.ndarray | None, label_smoothing: float) -> nn.Module:
        """``class_counts``: ``(2, K)`` — positives and negatives per finding (None: unweighted)."""
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
        thresholds: Sequence[float] | None = None,
    ) -> list[dict[str, Any]]:
        """Each finding with its probability against its threshold (default 0.5); ``label``:
        the findings above threshold joined by ``|`` (``"no finding"`` when none is)."""
        probs = np.asarray(probs, dtype=np.float64)
        cut = np.full(len(classes), 0.5) if thresholds is None else np.asarray(thresholds)
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

    def urgency(self, probs: np.ndarray, classes: Sequence[str], positive: str | None) -> float:
        """The highest probability among the findings (``positive``: only that one)."""
        probs = np.asarray(probs, dtype=np.float64)
        if positive:
            return float(probs[list(classes).index(positive)])
        return float(probs.max())

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
