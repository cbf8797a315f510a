"""Subgroup metrics: per-group values, gaps that name the right groups, warnings for small or
one-class groups, a "missing" group, and numeric columns binned into bands."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from medsight.errors import DataError
from medsight.evaluation import age_bands, bin_numeric, subgroup_metrics

BINARY = ["normal", "pneumonia"]


def _binary(n: int, signal: float, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, softmax(rng.normal(size=(n, 2)) + signal * np.eye(2)[y], axis=1)


def _two_sites():
    y_a, p_a = _binary(120, signal=3.0, seed=0)  # site A: good
    y_b, p_b = _binary(100, signal=0.3, seed=1)  # site B: deliberately worse
    groups = ["A"] * 120 + ["B"] * 100
    return np.r_[y_a, y_b], np.r_[p_a, p_b], groups


def test_a_tie_is_a_zero_gap_between_two_different_groups():
    y, p = _binary(80, signal=6.0, seed=2)  # perfectly separated: AUROC 1 in both groups
    groups = ["F", "M"] * 40
    out = subgroup_metrics(y, p, BINARY, groups, column="sex", n_bootstrap=0)
    gap = out["gaps"]["auroc"]
    assert gap["gap"] == 0 and {gap["highest"], gap["lowest"]} == {"F", "M"}


def test_gap_names_the_better_and_worse_group():
    y, p, groups = _two_sites()
    out = subgroup_metrics(y, p, BINARY, groups, column="site", n_bootstrap=100)
    assert out["column"] == "site" and list(out["groups"]) == ["A", "B"]
    for metric in ("accuracy", "balanced_accuracy", "auroc"):
        assert out["gaps"][metric]["highest"] == "A"
        assert out["gaps"][metric]["lowest"] == "B"
    a, b = out["groups"]["A"], out["groups"]["B"]
    assert out["gaps"]["auroc"]["gap"] == pytest.approx(a["auroc"]["value"] - b["auroc"]["value"])
    assert a["n"] == 120 and b["n"] == 100
    assert a["warning"] is None and out["warnings"] == []
    assert a["accuracy"]["value"] == pytest.approx(accuracy_score(y[:120], p[:120].argmax(1)))
    assert b["auroc"]["value"] == pytest.approx(roc_auc_score(y[120:], p[120:, 1]), abs=1e-12)
    for entry in (a, b):
        for metric in ("accuracy", "auroc", "sensitivity", "specificity", "precision"):
            lo, hi = entry[metric]["ci"]
            assert lo <= entry[metric]["value"] <= hi
    json.dumps(out, allow_nan=False)


def test_sensitivity_is_that_of_the_positive_class():
    y, p, groups = _two_sites()
    a = subgroup_metrics(y, p, BINARY, groups, column="site", n_bootstrap=0)["groups"]["A"]
    ya, pred = y[:120], p[:120].argmax(1)
    assert a["sensitivity"]["value"] == pytest.approx(
        ((pred == 1) & (ya == 1)).sum() / (ya == 1).sum()
    )
    assert a["specificity"]["value"] == pytest.approx(
        ((pred == 0) & (ya == 0)).sum() / (ya == 0).sum()
    )
    assert a["precision"]["value"] == pytest.approx(
        ((pred == 1) & (ya == 1)).sum() / (pred == 1).sum()
    )
    assert a["auroc"]["ci"] is None


def test_small_group_gets_a_warning_with_its_size():
    y, p = _binary(70, signal=2.0, seed=2)
    groups = ["big"] * 60 + ["small"] * 10
    out = subgroup_metrics(y, p, BINARY, groups, column="site", n_bootstrap=50, min_size=30)
    assert out["groups"]["big"]["warning"] is None
    assert "n=10" in out["groups"]["small"]["warning"]
    assert any("site=small" in w and "n=10" in w for w in out["warnings"])


def test_group_lacking_a_class_has_undefined_auroc_and_sensitivity():
    y, p = _binary(80, signal=2.0, seed=3)
    groups = np.where(np.arange(80) < 60, "x", "y").astype(object)
    y = y.copy()
    y[60:] = 0  # group "y" has no pneumonia
    out = subgroup_metrics(y, p, BINARY, groups, column="scanner", n_bootstrap=30, min_size=5)
    g = out["groups"]["y"]
    assert g["auroc"] == {"value": None, "ci": None}
    assert g["sensitivity"] == {"value": None, "ci": None}
    assert g["specificity"]["value"] is not None
    assert "'pneumonia'" in g["warning"] and "AUROC" in g["warning"]
    assert out["gaps"]["auroc"] == {"gap": None, "highest": None, "lowest": None}


def test_missing_values_form_a_missing_group():
    y, p = _binary(90, signal=2.0, seed=4)
    groups = pd.Series(["F", "M", None] * 30)
    groups[4] = np.nan  # an "M"
    out = subgroup_metrics(y, p, BINARY, groups, column="sex", n_bootstrap=20)
    assert list(out["groups"]) == ["F", "M", "missing"]
    assert out["groups"]["missing"]["n"] == 31
    assert out["groups"]["M"]["n"] == 29


def test_multiclass_sensitivity_is_macro_recall():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 150)
    p = softmax(rng.normal(size=(150, 3)) + np.eye(3)[y], axis=1)
    groups = ["u", "v"] * 75
    out = subgroup_metrics(y, p, ["a", "b", "c"], groups, column="site", n_bootstrap=20)
    u = out["groups"]["u"]
    expected = balanced_accuracy_score(y[::2], p[::2].argmax(1))
    assert u["sensitivity"]["value"] == pytest.approx(expected)
    assert u["balanced_accuracy"]["value"] == pytest.approx(expected)


def test_bin_numeric_makes_decades_and_custom_bands():
    assert list(bin_numeric([23, 38.5, None, 71, 20, 29.9])) == [
        "20-29",
        "30-39",
        np.nan,
        "70-79",
        "20-29",
        "20-29",
    ]
    assert list(age_bands(pd.Series([5, 18, 64, 65, 90]), edges=[18, 65])) == [
        "<18",
        "18-64",
        "18-64",
        "65+",
        "65+",
    ]
    bands = bin_numeric(pd.Series([0.2, 1.0], index=[7, 9]), edges=[0, 0.5, 1.5])
    assert list(bands) == ["[0, 0.5)", "[0.5, 1.5)"] and list(bands.index) == [7, 9]
    with pytest.raises(DataError, match="non-numeric"):
        bin_numeric(["old", "young"])


def test_numeric_column_with_many_values_is_binned_into_decades():
    y, p = _binary(100, signal=2.0, seed=6)
    ages = pd.Series(np.random.default_rng(6).integers(20, 60, 100).astype(float))
    ages[0] = np.nan
    out = subgroup_metrics(y, p, BINARY, ages, column="age", n_bootstrap=0, min_size=1)
    assert list(out["groups"]) == ["20-29", "30-39", "40-49", "50-59", "missing"]
    assert sum(g["n"] for g in out["groups"].values()) == 100
    assert any("binned" in w for w in out["warnings"])


def test_groups_must_match_the_samples():
    y, p = _binary(10, signal=1.0, seed=7)
    with pytest.raises(DataError, match="9 values but there are 10"):
        subgroup_metrics(y, p, BINARY, ["a"] * 9, column="site")


def test_the_metrics_and_their_notes_are_the_tasks():
    from medsight.tasks.classify import ClassifyTask

    class AccuracyOnly(ClassifyTask):
        subgroup_metrics = ("accuracy",)

        def subgroup_scores(self, y, probs, classes, positive, masks, **bootstrap):
            right = probs.argmax(axis=1) == y
            return [
                ({"accuracy": {"value": float(right[m].mean()), "ci": None}}, ["a note"])
                for m in masks
            ]

    y, p, groups = _two_sites()
    out = subgroup_metrics(y, p, BINARY, groups, column="site", task=AccuracyOnly(), min_size=1)
    assert list(out["groups"]["A"]) == ["n", "accuracy", "warning"]
    assert out["groups"]["B"]["warning"] == "a note"
    assert list(out["gaps"]) == ["accuracy"] and out["gaps"]["accuracy"]["highest"] == "A"
    assert out["warnings"] == ["site=A: a note", "site=B: a note"]
