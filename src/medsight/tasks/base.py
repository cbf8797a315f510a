"""The Task seam: what differs between kinds of problems, in one object per kind.

Trainer, evaluator, predictor, API and worklist ask the run's task; none of them branches on
its kind. A task is stateless configuration (scikit-learn style): everything it needs about a
run (classes, the urgent class) comes in as arguments.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor, nn


class Task(ABC):
    """One kind of problem: its outputs, loss, decoding, metrics, report and prediction schema.

    >>> from medsight.tasks import get_task
    >>> task = get_task("classify")
    >>> task.decode(np.array([[0.2, 0.8]]), ["normal", "lesion"])
    [{'label': 'lesion', 'confidence': 0.8}]
    """

    #: The name recorded in ``model.json`` and ``config.yaml``.
    name: str
    #: The validation metrics the trainer records in ``history.csv`` (``val_<name>``) and may
    #: monitor, besides the loss.
    validation_metrics: tuple[str, ...]
    #: The metrics ``metrics.json`` leads with (value and 95 % CI each), in display order.
    headline_metrics: tuple[str, ...]
    #: The report's sections for this task, in page order (the template's section names).
    report_sections: tuple[str, ...]

    # ------------------------------------------------------------------ training

    def num_outputs(self, classes: Sequence[str]) -> int:
        """Width of the network's output layer."""
        return len(classes)

    @abstractmethod
    def targets(self, labels: Sequence[Any], classes: Sequence[str]) -> np.ndarray:
        """Table labels → the training targets (class indices, multi-hot rows…)."""

    @abstractmethod
    def build_loss(self, class_counts: np.ndarray | None, label_smoothing: float) -> nn.Module:
        """The training loss; ``class_counts`` (None: unweighted) balances rare classes."""

    @abstractmethod
    def validation_scores(
        self, logits: Tensor, targets: Tensor, positive_index: int
    ) -> dict[str, float | None]:
        """``loss`` and :attr:`validation_metrics` on the validation split (None: undefined)."""

    def monitor_score(self, monitor: str, scores: dict[str, float | None]) -> float:
        """Higher is better: the early-stopping score of one validation pass."""
        if monitor == "loss":
            return -float(scores["loss"])
        value = scores.get(monitor)
        if value is None or not np.isfinite(value):
            return float(scores.get(self.validation_metrics[-1]) or -np.inf)
        return float(value)

    # ------------------------------------------------------------------ prediction

    @abstractmethod
    def probabilities(self, logits: np.ndarray, calibration: dict | None = None) -> np.ndarray:
        """Raw ``(N, K)`` network outputs → probabilities, through a saved calibration."""

    @abstractmethod
    def decode(self, probs: np.ndarray, classes: Sequence[str]) -> list[dict[str, Any]]:
        """Probabilities → one prediction per row, in the schema the CLI, API and worklist use."""

    @abstractmethod
    def urgency(self, probs: np.ndarray, classes: Sequence[str], positive: str) -> float:
        """One image's triage score (higher: read sooner)."""

    def prediction_columns(self, classes: Sequence[str]) -> list[str]:
        """The per-class columns of ``predictions.csv`` and ``medsight predict``."""
        return [f"p_{name}" for name in classes]

    # ------------------------------------------------------------------ evaluation

    @abstractmethod
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
        """The task's metric set with bootstrap CIs (the body of ``metrics.json``)."""
