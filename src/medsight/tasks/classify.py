"""Single-label classification: one class per image, softmax outputs, cross-entropy.

The urgency of an image for triage is the probability of the run's urgent (positive) class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn

from medsight.calibration import TemperatureScaler, apply_calibration
from medsight.data.sources import class_names
from medsight.errors import ConfigError, DataError
from medsight.tasks.base import Task
from medsight.tasks.classify_metrics import (
    HEADLINE,
    SUBGROUP_METRICS,
    compute_metrics,
    headline_scores,
    paired_bootstrap_auroc,
    subgroup_scores,
)


class ClassPrediction(BaseModel):
    """One image's class: the most probable one, and its probability."""

    label: str
    confidence: float = Field(description="Probability of the predicted label.")


class ClassifyTask(Task):
    """Softmax over mutually exclusive classes."""

    name = "classify"
    validation_metrics = ("auroc", "accuracy", "balanced_accuracy")
    progress_metrics = ("auroc", "accuracy")
    headline_metrics = HEADLINE
    report_sections = (
        "summary",
        "confusion",
        "curves",
        "calibration",
        "thresholds",
        "per_class",
        "subgroups",
        "training",
        "examples",
        "explanations",
        "model_card",
    )
    subgroup_metrics = SUBGROUP_METRICS
    prediction_schema = ClassPrediction

    def targets(self, labels: Sequence[Any], classes: Sequence[str]) -> np.ndarray:
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted({str(v) for v in labels if v not in index})
        if unknown:
            raise DataError(f"label(s) {unknown} are not classes of this run; classes: {classes}")
        return np.array([index[v] for v in labels], dtype=np.int64)

    def check_training_table(self, table: pd.DataFrame) -> tuple[list[str], list[str]]:
        """Every class needs 2 training images and 1 validation image."""
        development = table[table["split"].isin(["train", "val"])]
        unlabelled = development["label"].isna().sum()
        if unlabelled:
            raise DataError(
                f"{unlabelled} training/validation images have no label; "
                "training needs labelled data"
            )
        classes = class_names(table)
        if len(classes) < 2:
            raise DataError(f"training needs at least 2 classes, found {classes}")
        for split, minimum in (("train", 2), ("val", 1)):
            counts = development[development["split"] == split]["label"].value_counts()
            if counts.sum() == 0:
                raise DataError(
                    f"the {split} split is empty; check the split ratios or split column"
                )
            for name in classes:
                if counts.get(name, 0) < minimum:
                    raise DataError(
                        f"class {name!r} has {counts.get(name, 0)} image(s) in the {split} split; "
                        f"at least {minimum} needed (add images or merge the class)"
                    )
        return classes, []

    def build_loss(
        self, class_counts: np.ndarray | None, label_smoothing: float, loss: str = "auto"
    ) -> nn.Module:
        if loss != "auto":
            raise ConfigError(
                f"--loss {loss} is a loss for several findings per image (sigmoid outputs); a "
                "classification run trains with cross-entropy: leave --loss out"
            )
        weight = class_weights(class_counts) if class_counts is not None else None
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)

    def validation_scores(
        self, logits: Tensor, targets: Tensor, positive_index: int
    ) -> dict[str, float | None]:
        logits = logits.float()
        loss = nn.functional.cross_entropy(logits, targets).item()
        probs = torch.softmax(logits, dim=1).numpy()
        return {"loss": loss, **headline_scores(targets.numpy(), probs, positive_index)}

    def probabilities(self, logits: np.ndarray, calibration: dict | None = None) -> np.ndarray:
        return apply_calibration(logits, calibration)

    def calibrate(self, logits: np.ndarray, targets: np.ndarray) -> dict:
        """Temperature scaling (one T for all classes, fitted by NLL)."""
        return TemperatureScaler().fit(logits, targets).to_dict()

    def decode(self, probs: np.ndarray, classes: Sequence[str], sizes=None) -> list[dict[str, Any]]:
        best = np.asarray(probs).argmax(axis=1)
        return [
            {"label": classes[int(i)], "confidence": float(row[i])}
            for i, row in zip(best, np.asarray(probs))
        ]

    def urgency(self, probs: np.ndarray, classes: Sequence[str], positive: str) -> float:
        """The probability of the urgent (positive) class."""
        return float(np.asarray(probs)[list(classes).index(positive)])

    def metrics(
        self,
        y: np.ndarray,
        probs: np.ndarray,
        classes: Sequence[str],
        positive: str | None,
        *,
        n_bootstrap: int = 1000,
        seed: int = 0,
    ) -> dict[str, Any]:
        return compute_metrics(
            y, probs, list(classes), positive=positive, n_bootstrap=n_bootstrap, seed=seed
        )

    def subgroup_scores(
        self,
        y: np.ndarray,
        probs: np.ndarray,
        classes: Sequence[str],
        positive: str | None,
        masks: Sequence[np.ndarray],
        *,
        n_bootstrap: int = 1000,
        seed: int = 0,
        confidence: float = 0.95,
    ) -> list[tuple[dict[str, dict], list[str]]]:
        return subgroup_scores(
            y,
            probs,
            list(classes),
            masks,
            positive=positive,
            n_bootstrap=n_bootstrap,
            seed=seed,
            confidence=confidence,
        )

    def paired_difference(
        self,
        y: np.ndarray,
        probs: np.ndarray,
        base_probs: np.ndarray,
        classes: Sequence[str],
        positive: str | None,
        *,
        n_bootstrap: int = 1000,
        seed: int = 0,
    ) -> dict[str, Any]:
        """AUROC (binary: of the positive class; else macro one-vs-rest), paired bootstrap."""
        return paired_bootstrap_auroc(
            y,
            probs,
            base_probs,
            list(classes),
            positive=positive,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )


def class_weights(counts: np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights ``N / (K · n_k)``: each class contributes equally to the loss."""
    counts = np.asarray(counts, dtype=np.float64)
    if (counts == 0).any():
        raise ConfigError("class weights need at least one training image of every class")
    return torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32)
