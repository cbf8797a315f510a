"""Evaluation: a run's split predicted and scored (``evaluate``), subgroups, comparisons, the
report and model card.

The metric functions themselves belong to their task (classification's are in
:mod:`medsight.tasks.classify_metrics`) and calibration to :mod:`medsight.calibration`; the
names below are re-exported so ``from medsight.evaluation import compute_metrics`` keeps working.
"""

from __future__ import annotations

from medsight.calibration import (
    TemperatureScaler,
    apply_calibration,
    expected_calibration_error,
    reliability_curve,
)
from medsight.evaluation.subgroups import age_bands, bin_numeric, subgroup_metrics
from medsight.tasks.classify_metrics import (
    HEADLINE,
    compute_metrics,
    operating_points,
    paired_bootstrap_auroc,
    stratified_bootstrap_indices,
)

__all__ = [
    "HEADLINE",
    "TemperatureScaler",
    "age_bands",
    "apply_calibration",
    "bin_numeric",
    "compute_metrics",
    "expected_calibration_error",
    "operating_points",
    "paired_bootstrap_auroc",
    "reliability_curve",
    "stratified_bootstrap_indices",
    "subgroup_metrics",
]
