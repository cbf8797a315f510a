"""The Task seam: what differs between kinds of problems, in one object per kind.

Trainer, evaluator, predictor, report, API and worklist ask the run's task; none of them
branches on its kind. A task is stateless configuration (scikit-learn style): everything it
needs about a run (classes, the urgent class) comes in as arguments.

Shapes: ``probs`` is ``(N, K)``, one column per output, named by :meth:`Task.prediction_columns`;
``y`` is what :meth:`Task.targets` made of the table's labels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel
from torch import Tensor, nn

from medsight.errors import ConfigError


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
    #: The few of those the epoch line of ``medsight train`` shows.
    progress_metrics: tuple[str, ...] = ()
    #: The metrics ``metrics.json`` leads with (value and 95 % CI each), in display order.
    headline_metrics: tuple[str, ...]
    #: The report's sections for this task, in page order: names from
    #: ``medsight.evaluation.report.SECTIONS`` (the template renders only these).
    report_sections: tuple[str, ...]
    #: The metrics of a subgroup analysis (``evaluate --by``): per group, and the gap between
    #: the best and the worst group.
    subgroup_metrics: tuple[str, ...]
    #: One decoded prediction: the fields of each dict :meth:`decode` returns. The API's
    #: prediction, the worklist and ``medsight predict`` show them. ``label`` (a string) is
    #: required: it is the answer a reviewer confirms or corrects on the worklist.
    prediction_schema: type[BaseModel]

    #: Whether targets are class indices a class-balanced sampler can draw by.
    samples_by_class: bool = True
    #: The network ``--model auto`` trains (None: the recipe chooses a classifier).
    default_model: str | None = None
    #: The batch size ``batch_size: auto`` takes, unless the training set is smaller.
    default_batch_size: int = 64
    #: The learning rate ``lr: auto`` takes (AdamW, the head's; the backbone's is scaled).
    default_lr: float = 3e-3
    #: Whether geometric augmentation must move the targets with the image (boxes).
    augments_boxes: bool = False
    #: Whether test-time augmentation may average the outputs of transformed views.
    averages_views: bool = True
    #: Whether heat maps (``medsight.explain``) explain its outputs.
    explains: bool = True
    #: Whether its networks export with a free batch size (a detector's: one image per call).
    dynamic_batch_export: bool = True
    #: Whether ``medsight compare`` tests its runs (paired bootstrap of the key metric), and
    #: what to compare instead where it does not.
    compares_runs: bool = True
    compare_hint: str = ""

    def input_side(self, native_side: int, default_size: int) -> int:
        """The square input side for images of ``native_side`` pixels when ``--image-size`` is
        not given: small images (≤ 128 px) as they are, larger ones at the network's size."""
        return native_side if native_side <= 128 else default_size

    def prepare_table(self, table: pd.DataFrame) -> pd.DataFrame:
        """The training table as this task reads it (a detector makes boxes of masks)."""
        return table

    def check_model(self, spec) -> None:
        """Refuse a network (its :class:`~medsight.models.spec.ModelSpec`) the task cannot
        train: classification and findings take classifiers, not detectors."""
        if spec.family == "detector":
            raise ConfigError(
                f"{spec.name} is a box detector: train it with --task detect on data with boxes"
            )

    # ------------------------------------------------------------------ training

    @abstractmethod
    def check_training_table(self, table: pd.DataFrame) -> tuple[list[str], list[str]]:
        """The classes (or findings) of a split training table, in order, and notes a user
        should read; refuses, naming the class and split at fault, data that cannot train."""

    def positive_class(self, classes: Sequence[str], requested: str | None) -> str | None:
        """The run's urgent class (``classes.json``'s ``positive``): ``requested`` or a guess
        from the names; None for tasks whose outputs each have their own threshold."""
        from medsight.runs import guess_positive_class

        positive = requested or guess_positive_class(list(classes))
        if positive not in classes:
            raise ConfigError(f"positive_class {positive!r} is not a class; classes: {classes}")
        return positive

    def num_outputs(self, classes: Sequence[str]) -> int:
        """Width of the network's output layer."""
        return len(classes)

    def output_shape(self, classes: Sequence[str]) -> tuple[int, ...]:
        """The shape of one image's outputs (``(K,)``; a detector's ``(D, 6)`` boxes)."""
        return (self.num_outputs(classes),)

    def table_targets(self, rows: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
        """The targets of a SampleTable's rows: :meth:`targets` of their labels (a task whose
        targets live in other columns, such as boxes, reads those)."""
        return self.targets(rows["label"], classes)

    def batch_loss(self, forward, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """One batch's training loss: ``loss_fn(forward(x), y)`` (a detector takes the targets
        itself)."""
        return loss_fn(forward(x), y)

    @abstractmethod
    def targets(self, labels: Sequence[Any], classes: Sequence[str]) -> np.ndarray:
        """Table labels → the targets of training and evaluation (class indices, multi-hot
        rows…); raises :class:`~medsight.errors.DataError` naming labels it cannot use."""

    @abstractmethod
    def build_loss(
        self, class_counts: np.ndarray | None, label_smoothing: float, loss: str = "auto"
    ) -> nn.Module:
        """The training loss; ``class_counts`` (None: unweighted) balances rare classes;
        ``loss`` names a variant (``optim.loss``: ``auto`` is the task's own)."""

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
        """Raw ``(N, K)`` network outputs → probabilities, through a saved calibration
        (None: uncalibrated)."""

    @abstractmethod
    def calibrate(self, logits: np.ndarray, targets: np.ndarray) -> dict:
        """Fit the calibration :meth:`probabilities` applies, on validation ``logits`` and
        :meth:`targets`; the dict is saved as the run's ``calibration.json``."""

    @abstractmethod
    def decode(self, probs: np.ndarray, classes: Sequence[str], sizes=None) -> list[dict[str, Any]]:
        """Probabilities → one prediction per row, each with the fields of
        :attr:`prediction_schema`; ``sizes`` (each row's original ``(height, width)``) place
        outputs that have a position (boxes) in the image's pixels."""

    @abstractmethod
    def urgency(self, probs: np.ndarray, classes: Sequence[str], positive: str) -> float:
        """One image's ``(K,)`` probabilities → its triage score (higher: read sooner); the
        worklist is ordered by it."""

    def decision_thresholds(
        self, classes: Sequence[str], operating_points: dict[str, dict], point: str
    ) -> list[float] | None:
        """The threshold each output is decided by (``decode(..., thresholds=)``), from the
        evaluated ``operating_points`` (``metrics.json``'s ``thresholds``) at ``point``; None
        for tasks that decide without thresholds (the default: the most probable class)."""
        return None

    def decision_point(self, point: str) -> str:
        """The operating point a requested ``point`` means for this task (the same name; a
        task with its own kind of points maps the serving default onto its own)."""
        return point

    def triage(
        self,
        probs: np.ndarray,
        classes: Sequence[str],
        positive: str | None,
        *,
        thresholds: Sequence[float] | None = None,
        urgent: Sequence[str] | None = None,
    ) -> tuple[float, str | None]:
        """One image's :meth:`urgency` and the class (or finding) that set it: by default the
        urgent class ``positive``. ``urgent`` (the classes triage watches) and ``thresholds``
        (:meth:`decision_thresholds`) matter to tasks with several urgent outputs."""
        return self.urgency(probs, classes, positive), positive

    def explain_targets(
        self, probs: np.ndarray, classes: Sequence[str], thresholds: Sequence[float] | None = None
    ) -> list[str]:
        """The classes whose heat maps explain one image's ``(K,)`` prediction, most probable
        first: by default the predicted (most probable) class alone."""
        return [classes[int(np.argmax(probs))]]

    def column_values(self, probs: np.ndarray, classes: Sequence[str]) -> np.ndarray:
        """The ``(N, K)`` values of :meth:`prediction_columns` (the probabilities themselves; a
        detector's top box score per class)."""
        return np.asarray(probs)

    def parity_difference(self, expected: np.ndarray, got: np.ndarray) -> float:
        """How far an exported network's outputs ``got`` are from torch's ``expected`` (the
        export parity check): the largest absolute difference of the probabilities."""
        return float(np.abs(np.asarray(got) - np.asarray(expected)).max())

    def prediction_extras(
        self, rows: pd.DataFrame, probs: np.ndarray, classes: Sequence[str]
    ) -> dict[str, list]:
        """Columns of ``predictions.csv`` beyond the probabilities (a detector's boxes, as
        JSON text), one value per row; none by default."""
        return {}

    def prediction_columns(self, classes: Sequence[str]) -> list[str]:
        """Names of the ``K`` probability columns, in column order: in ``predictions.csv`` and
        ``medsight predict``."""
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

    @abstractmethod
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
        """Per subgroup (a boolean mask over the samples): :attr:`subgroup_metrics` as
        ``{"value", "ci"}`` each, and notes on those that are undefined in that group.
        The inputs are checked once, before any group is scored."""

    @abstractmethod
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
        """``medsight compare``: the paired bootstrap test of the task's key metric, ``probs``
        against ``base_probs`` on the same samples (``difference``, ``ci``, ``p_value``…)."""
