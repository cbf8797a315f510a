"""Regions, not only classes: boxes found by a detector (torchvision FCOS, ``models.detection``).

Targets are ``(N, M, 5)`` float32 arrays, one row per true box: ``[x1, y1, x2, y2, class]``
with corners normalised to ``[0, 1]`` of the image, padded with class −1
(:func:`medsight.data.boxes.box_targets` makes them from a detection table's ``boxes``).
The network's outputs are ``(N, D, 6)``: ``[x1, y1, x2, y2, score, class]``, best first,
padded with score 0 and class −1. Boxes are shown in the original image's pixels (the
``sizes`` given to :meth:`DetectTask.decode`); metrics are computed on normalised corners,
which give the same IoU (scaling x and y apart scales every area alike).

A box counts as found when its score reaches its class's threshold
(:meth:`DetectTask.decision_thresholds`: the evaluated operating point, by default the score
at which the test split had 1 false positive per image; 0.5 before evaluation). An image's
triage urgency is the top score of a box of the urgent class; the image-level score of each
class (the ``p_<class>`` columns, comparable with a classifier's probabilities) is the top
score of its boxes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field
from torch import Tensor, nn

from medsight.data.findings import multi_hot
from medsight.errors import ConfigError, DataError
from medsight.tasks.base import Task
from medsight.tasks.detect_metrics import HEADLINE

#: The task name a detection table and run carry.
DETECT = "detect"
#: A class's box threshold when the run was not evaluated.
DEFAULT_THRESHOLD = 0.5
#: The operating point boxes are decided at by default (``metrics.json`` ``thresholds``).
DEFAULT_POINT = "fp_1"
#: Boxes scoring below this are left out of ``predictions.csv``.
KEPT_SCORE = 0.05


class Box(BaseModel):
    """One box found in one image, in the original image's pixel corners."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str
    score: float


class DetectionPrediction(BaseModel):
    """The boxes of one image whose score reaches their class's threshold."""

    label: str = Field(
        description="The classes with a box at or above threshold, joined by '|' "
        "('no finding' when there is none)."
    )
    confidence: float = Field(description="The highest box score in the image (0 without one).")
    boxes: list[Box] = Field(
        description="Boxes at or above threshold, best first.", json_schema_extra={"table": "json"}
    )


class SummedLosses(nn.Module):
    """torchvision's detection losses (classification, box regression, centre-ness) summed."""

    def forward(self, losses: dict[str, Tensor], targets: Tensor | None = None) -> Tensor:
        return sum(losses.values())


class DetectTask(Task):
    """Boxes with a class and a score per image: FCOS trained with its own losses."""

    name = DETECT
    validation_metrics = ("map", "map50")
    progress_metrics = ("map50",)
    headline_metrics = HEADLINE
    report_sections = ("summary", "detection", "froc", "detection_pr", "detection_gallery",
                       "subgroups", "training", "model_card")  # fmt: skip
    subgroup_metrics = ("sensitivity_at_1fp", "map50", "median_iou")
    prediction_schema = DetectionPrediction
    samples_by_class = False
    #: The network ``--model auto`` trains.
    default_model = "fcos_mobilenet_v2"
    #: The smallest input side boxes are found at: a 64-px slice's 8-px lesion is 2 cells of
    #: the pyramid's finest (stride-8) level at 128 px.
    min_image_size = 128
    #: ``batch_size: auto``: detectors learn from many small steps (torchvision trains FCOS
    #: with 2 images per GPU).
    default_batch_size = 16
    #: ``lr: auto``: at 3e-3 (the classifiers' AdamW rate) the box regression's ReLU outputs
    #: die within the first epoch and every box collapses to a point; 3e-4 trains.
    default_lr = 3e-4
    augments_boxes = True
    averages_views = False
    explains = False
    dynamic_batch_export = False
    compares_runs = False
    compare_hint = (
        "detection runs are compared by the mAP and FROC of their reports (medsight evaluate "
        "each run); with a classifier, by the image-level AUROC in the detection run's "
        "metrics.json (auroc_macro: the top box score of each image)"
    )

    def input_side(self, native_side: int, default_size: int) -> int:
        """The image's own size, at least :attr:`min_image_size` (small lesions need pyramid
        cells) and at most the detector's default (320 px: CPU time)."""
        return min(max(native_side, self.min_image_size), default_size)

    def prepare_table(self, table: pd.DataFrame) -> pd.DataFrame:
        """A table with lesion masks and no boxes becomes a detection table: one box per
        connected component of each mask."""
        from medsight.data.boxes import boxes_from_masks, is_detection

        if not is_detection(table) and "mask" in table.columns:
            return boxes_from_masks(table)
        return table

    def check_model(self, spec) -> None:
        if spec.family != "detector":
            from medsight.models.detection import DETECTORS

            raise ConfigError(
                f"--task detect trains a box detector, and {spec.name} is a classifier; use "
                f"--model {' or '.join(DETECTORS)} (or leave --model out)"
            )

    # ------------------------------------------------------------------ training

    def check_training_table(self, table: pd.DataFrame) -> tuple[list[str], list[str]]:
        from medsight.data.boxes import is_detection, parse_boxes, require_boxes

        require_boxes(table)
        classes = list(table.attrs.get("classes") or [])
        if not is_detection(table) or not classes:
            raise DataError("a detection table names its box classes (table.attrs['classes'])")
        notes = []
        for split in ("train", "val"):
            rows = table[table["split"] == split]
            if rows.empty:
                raise DataError(f"the {split} split has no images; give more images or a split")
            n_boxes = sum(len(parse_boxes(text)) for text in rows["boxes"])
            if n_boxes == 0:
                raise DataError(
                    f"the {split} split has no box; a detector learns from boxes: add "
                    "annotated images to it (medsight data check shows boxes per split)"
                )
        train = table[table["split"] == "train"]
        seen = {box[4] for text in train["boxes"] for box in parse_boxes(text)}
        missing = [name for name in classes if name not in seen]
        if missing:
            notes.append(f"no training box of class(es) {missing}: they cannot be learned")
        return classes, notes

    def positive_class(self, classes: Sequence[str], requested: str | None) -> str | None:
        """The class whose boxes set a study's urgency: ``requested``, else the only class, else
        a guess from the names."""
        if requested is None and len(classes) == 1:
            return classes[0]
        return super().positive_class(classes, requested)

    def output_shape(self, classes: Sequence[str]) -> tuple[int, ...]:
        from medsight.models.detection import MAX_DETECTIONS

        return (MAX_DETECTIONS, 6)

    def targets(self, labels: Sequence[Any], classes: Sequence[str]) -> np.ndarray:
        """Image-level targets of the labels (``"a|b"``, ``"no finding"``): ``(N, K)`` 1 where
        the image has a box of the class. Training and metrics use the boxes themselves
        (:meth:`table_targets`)."""
        return multi_hot(labels, classes)

    def table_targets(self, rows: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
        """The ``(N, M, 5)`` normalised boxes of a detection table's rows."""
        from medsight.data.boxes import box_targets, max_box_count, require_boxes

        require_boxes(rows)
        return box_targets(rows, list(classes), max(1, max_box_count(rows)))

    def build_loss(
        self, class_counts: np.ndarray | None, label_smoothing: float, loss: str = "auto"
    ) -> nn.Module:
        if loss not in ("auto",):
            raise ConfigError(
                f"--loss {loss} is not a detection loss: FCOS trains with its own focal, GIoU "
                "and centre-ness losses (leave --loss out)"
            )
        return SummedLosses()

    def batch_loss(self, forward, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """A detector computes its losses from the targets itself (torchvision's contract)."""
        return loss_fn(forward(x, y))

    def validation_scores(
        self, logits: Tensor, targets: Tensor, positive_index: int
    ) -> dict[str, float | None]:
        from medsight.tasks.detect_metrics import validation_scores

        scores = validation_scores(targets.numpy(), logits.numpy())
        return {"loss": None, **{k: scores.get(k) for k in self.validation_metrics}}

    def monitor_score(self, monitor: str, scores: dict[str, float | None]) -> float:
        """mAP@0.5 unless another validation metric is named (the loss of a detector is only
        defined in training mode, so it is never monitored)."""
        value = scores.get(monitor) if monitor != "loss" else None
        if value is None or not np.isfinite(value):
            value = scores.get("map50")
        return float(value) if value is not None and np.isfinite(value) else -np.inf

    # ------------------------------------------------------------------ prediction

    def probabilities(self, logits: np.ndarray, calibration: dict | None = None) -> np.ndarray:
        if calibration:
            raise ConfigError("a detection run's box scores are not calibrated")
        return np.asarray(logits, dtype=np.float32)

    def calibrate(self, logits: np.ndarray, targets: np.ndarray) -> dict:
        raise ConfigError(
            "--calibrate fits class probabilities; a detector's box scores are decided by "
            "their operating thresholds instead (metrics.json 'thresholds')"
        )

    def decode(
        self,
        probs: np.ndarray,
        classes: Sequence[str],
        thresholds: Sequence[float] | Mapping[str, float] | None = None,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[dict[str, Any]]:
        """Boxes at or above their class's threshold (default 0.5), in the pixels of the
        original image (``sizes``: ``(height, width)`` per row; without them, corners stay
        normalised)."""
        probs = np.asarray(probs, dtype=np.float64)
        cut = _thresholds(thresholds, classes)
        out = []
        for i, dets in enumerate(probs):
            height, width = sizes[i] if sizes is not None else (1, 1)
            real = dets[:, 5] >= 0
            boxes = []
            for x1, y1, x2, y2, score, k in dets[real]:
                k = int(k)
                if k >= len(classes) or score < cut[k]:
                    continue
                boxes.append(
                    {
                        "x1": round(float(x1 * width), 2),
                        "y1": round(float(y1 * height), 2),
                        "x2": round(float(x2 * width), 2),
                        "y2": round(float(y2 * height), 2),
                        "label": classes[k],
                        "score": round(float(score), 4),
                    }
                )
            found = {box["label"] for box in boxes}
            label = "|".join(c for c in classes if c in found) or "no finding"
            top = float(dets[real, 4].max()) if real.any() else 0.0
            out.append({"label": label, "confidence": top, "boxes": boxes})
        return out

    def image_scores(self, probs: np.ndarray, classes: Sequence[str]) -> np.ndarray:
        """``(N, K)``: per image, the top score of a box of each class (0 without one)."""
        probs = np.asarray(probs, dtype=np.float64)
        scores = np.zeros((len(probs), len(classes)))
        for k in range(len(classes)):
            of_class = np.where(probs[:, :, 5] == k, probs[:, :, 4], 0.0)
            scores[:, k] = of_class.max(axis=1) if probs.shape[1] else 0.0
        return scores

    def column_values(self, probs: np.ndarray, classes: Sequence[str]) -> np.ndarray:
        return self.image_scores(probs, classes)

    def prediction_extras(
        self, rows: pd.DataFrame, probs: np.ndarray, classes: Sequence[str]
    ) -> dict[str, list]:
        """``boxes``: every box scoring at least :data:`KEPT_SCORE`, as JSON
        ``[x1, y1, x2, y2, class, score]`` in the original image's pixels (the report draws
        those above the chosen threshold); ``true_boxes``: the annotated ones, as the data
        give them; ``width``, ``height``: the original image size."""
        import json

        sizes = list(zip(rows["height"].astype(int), rows["width"].astype(int)))
        decoded = self.decode(probs, classes, [KEPT_SCORE] * len(classes), sizes)
        boxes = [
            json.dumps([[b["x1"], b["y1"], b["x2"], b["y2"], b["label"], b["score"]]
                        for b in one["boxes"]])
            for one in decoded
        ]  # fmt: skip
        return {
            "boxes": boxes,
            "true_boxes": list(rows["boxes"]),
            "width": list(rows["width"].astype(int)),
            "height": list(rows["height"].astype(int)),
        }

    def parity_difference(self, expected: np.ndarray, got: np.ndarray) -> float:
        """The worst, over the boxes either output keeps (score ≥ :data:`KEPT_SCORE`), of the
        largest difference of corners (normalised) and score to the closest box of the same
        class in the other. Boxes are compared as sets: near-equal scores may come out in
        another order, and a box at the very end of one list may fall off the other."""
        worst = 0.0
        for mine, theirs in ((expected, got), (got, expected)):
            for a, b in zip(np.asarray(mine), np.asarray(theirs)):
                floor = max(KEPT_SCORE, float(a[-1, 4]), float(b[-1, 4])) + 1e-3
                for box in a[a[:, 4] >= floor]:
                    same = b[b[:, 5] == box[5]]
                    if not len(same):
                        return 1.0
                    gaps = np.abs(same[:, :5] - box[:5]).max(axis=1)
                    worst = max(worst, float(gaps.min()))
        return worst

    def urgency(self, probs: np.ndarray, classes: Sequence[str], positive: str) -> float:
        """The top score of a box of the urgent class."""
        scores = self.image_scores(np.asarray(probs)[None], classes)[0]
        return float(scores[list(classes).index(positive)])

    def decision_thresholds(
        self, classes: Sequence[str], operating_points: dict[str, dict], point: str
    ) -> list[float]:
        """Each class's box threshold at the evaluated operating ``point`` (``fp_1``: the score
        at which the evaluated split had one false positive per image; also ``fp_0.5``…);
        0.5 for a run that was not evaluated. A point the evaluation did not compute is
        refused, listing those it did; a classifier's point name (``youden``) means the
        default here."""
        operating_points = operating_points or {}
        if not operating_points:
            return [DEFAULT_THRESHOLD] * len(classes)
        known = sorted({p for points in operating_points.values() for p in (points or {})})
        point = self.decision_point(point)
        if point not in known:
            raise ConfigError(
                f"operating point {point!r} was not evaluated; evaluated points: {', '.join(known)}"
            )
        out = []
        for name in classes:
            entry = (operating_points.get(name) or {}).get(point) or {}
            value = entry.get("threshold")
            out.append(float(value) if value is not None else DEFAULT_THRESHOLD)
        return out

    def decision_point(self, point: str | None) -> str:
        """``fp_1`` for the classifiers' default point (``youden``) or none; else ``point``."""
        return DEFAULT_POINT if point in (None, "youden") else point

    def triage(
        self,
        probs: np.ndarray,
        classes: Sequence[str],
        positive: str | None,
        *,
        thresholds: Sequence[float] | None = None,
        urgent: Sequence[str] | None = None,
    ) -> tuple[float, str | None]:
        """The top box score over the urgent classes (default: the urgent class), and its
        class."""
        watched = list(urgent) if urgent else [positive or classes[0]]
        scores = self.image_scores(np.asarray(probs)[None], classes)[0]
        best = max(watched, key=lambda name: scores[list(classes).index(name)])
        return float(scores[list(classes).index(best)]), best

    # ------------------------------------------------------------------ evaluation

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
        from medsight.tasks.detect_metrics import detection_metrics

        result = detection_metrics(
            np.asarray(y), np.asarray(probs), list(classes), positive,
            n_bootstrap=n_bootstrap, seed=seed,
        )  # fmt: skip
        # The decision thresholds, where predictors look them up: one score threshold per FP
        # rate, the same for every class (the FROC pools the classes' lesions).
        points = {
            point_name(entry["fps_per_image_target"]): entry
            for entry in result.get("operating_points", [])
        }
        result["thresholds"] = {name: points for name in classes}
        return result

    def subgroup_scores(
        self, y, probs, classes, positive, masks, *, n_bootstrap=1000, seed=0, confidence=0.95
    ):
        """Per group of images: lesion sensitivity at 1 false positive per image (on the
        group's own FROC), mAP@0.5 and the median IoU of found lesions, with bootstrap CIs
        over the group's images."""
        from medsight.tasks.detect_metrics import detection_metrics

        y, probs = np.asarray(y), np.asarray(probs)
        out = []
        for mask in masks:
            mask = np.asarray(mask, dtype=bool)
            if not mask.any():
                empty = {m: {"value": None, "ci": None} for m in self.subgroup_metrics}
                out.append((empty, ["the group is empty: its metrics are undefined"]))
                continue
            found = detection_metrics(
                y[mask], probs[mask], list(classes), positive,
                n_bootstrap=n_bootstrap, seed=seed, confidence=confidence,
            )  # fmt: skip
            entries = {
                m: found.get(m) or {"value": None, "ci": None} for m in self.subgroup_metrics
            }
            notes = []
            if not found.get("n_lesions"):
                notes.append("no lesion in the group: lesion sensitivity and mAP are undefined")
            out.append((entries, notes))
        return out

    def paired_difference(self, y, probs, base_probs, classes, positive, **kwargs):
        raise ConfigError(f"medsight compare does not test detection runs: {self.compare_hint}")


def point_name(fps_per_image: float) -> str:
    """The operating point of a false-positive rate: ``1`` → ``"fp_1"``, ``0.5`` → ``"fp_0.5"``."""
    return f"fp_{fps_per_image:g}"


def _thresholds(thresholds, classes: Sequence[str]) -> np.ndarray:
    if thresholds is None:
        return np.full(len(classes), DEFAULT_THRESHOLD)
    if isinstance(thresholds, Mapping):
        return np.array([float(thresholds.get(c, DEFAULT_THRESHOLD)) for c in classes])
    return np.asarray(thresholds, dtype=np.float64)
