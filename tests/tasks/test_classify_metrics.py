"""compute_metrics and friends: point values are scikit-learn's, CIs are the stratified bootstrap's,
undefined values are None, and bad input gets a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from medsight.errors import ConfigError, DataError
from medsight.evaluation import (
    HEADLINE,
    compute_metrics,
    expected_calibration_error,
    operating_points,
    paired_bootstrap_auroc,
    stratified_bootstrap_indices,
)

BINARY = ["normal", "pneumonia"]
FOUR = ["a", "b", "c", "d"]


def _data(k: int, n: int = 300, seed: int = 0, signal: float = 1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    return y, softmax(rng.normal(size=(n, k)) + signal * np.eye(k)[y], axis=1)


def _values(result: dict) -> dict:
    return {name: result[name]["value"] for name in HEADLINE}


@pytest.mark.parametrize("positive", [None, "normal"])
def test_binary_point_values_equal_sklearn(positive):
    y, p = _data(2)
    pos = 1 if positive is None else 0
    pred = p.argmax(axis=1)
    result = compute_metrics(y, p, BINARY, positive=positive, n_bootstrap=0)
    expected = {
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "auroc": roc_auc_score(y == pos, p[:, pos]),
        "average_precision": average_precision_score(y == pos, p[:, pos]),
        "f1_macro": f1_score(y, pred, average="macro"),
        "f1_weighted": f1_score(y, pred, average="weighted"),
        "log_loss": log_loss(y, p),
        "brier": brier_score_loss(y == pos, p[:, pos]),
        "ece": expected_calibration_error(y, p),
    }
    assert result["positive"] == BINARY[pos]
    assert _values(result) == pytest.approx(expected, abs=1e-9)
    assert result["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    assert list(result["thresholds"]) == [BINARY[pos]]


def test_multiclass_point_values_equal_sklearn():
    y, p = _data(4, n=400, seed=1)
    pred = p.argmax(axis=1)
    result = compute_metrics(y, p, FOUR, n_bootstrap=0)
    brier = np.mean([sum((p[i, c] - (y[i] == c)) ** 2 for c in range(4)) for i in range(len(y))])
    expected = {
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "auroc": roc_auc_score(y, p, multi_class="ovr", average="macro"),
        "average_precision": np.mean([average_precision_score(y == c, p[:, c]) for c in range(4)]),
        "f1_macro": f1_score(y, pred, average="macro"),
        "f1_weighted": f1_score(y, pred, average="weighted"),
        "log_loss": log_loss(y, p),
        "brier": brier,
        "ece": expected_calibration_error(y, p),
    }
    assert _values(result) == pytest.approx(expected, abs=1e-9)
    assert result["positive"] is None
    assert list(result["thresholds"]) == FOUR


def test_per_class_ratios_come_from_the_confusion_matrix():
    y, p = _data(4, n=400, seed=2)
    pred = p.argmax(axis=1)
    per_class = compute_metrics(y, p, FOUR, n_bootstrap=0)["per_class"]
    cm = confusion_matrix(y, pred)
    recall = recall_score(y, pred, average=None)
    precision = precision_score(y, pred, average=None)
    f1 = f1_score(y, pred, average=None)
    for c, name in enumerate(FOUR):
        tn = cm.sum() - cm[c].sum() - cm[:, c].sum() + cm[c, c]
        fn = cm[c].sum() - cm[c, c]
        fp = cm[:, c].sum() - cm[c, c]
        got = {m: per_class[name][m]["value"] for m in ("sensitivity", "specificity", "precision")}
        assert got == pytest.approx(
            {"sensitivity": recall[c], "specificity": tn / (tn + fp), "precision": precision[c]},
            abs=1e-9,
        )
        assert per_class[name]["npv"]["value"] == pytest.approx(tn / (tn + fn), abs=1e-9)
        assert per_class[name]["f1"]["value"] == pytest.approx(f1[c], abs=1e-9)
        assert per_class[name]["support"] == int((y == c).sum())


@pytest.mark.parametrize("k, classes", [(2, BINARY), (4, FOUR)])
def test_every_ci_contains_its_point_estimate(k, classes):
    y, p = _data(k, n=250, seed=3)
    result = compute_metrics(y, p, classes, n_bootstrap=300, seed=5)
    entries = [result[name] for name in HEADLINE]
    entries += [
        e for per in result["per_class"].values() for e in per.values() if isinstance(e, dict)
    ]
    for entry in entries:
        lo, hi = entry["ci"]
        assert lo <= entry["value"] <= hi


def test_ci_of_well_calibrated_ece_still_contains_point():
    # Resampling only adds binning noise, so ECE's bootstrap values sit above a small point value.
    # With seed 7 the plain percentile interval starts above the point value (0.0556 > 0.0515).
    rng = np.random.default_rng(7)
    p = softmax(rng.normal(size=(300, 4)) * 1.5, axis=1)
    y = np.array([rng.choice(4, p=row) for row in p])
    ece = compute_metrics(y, p, FOUR, n_bootstrap=300, seed=1)["ece"]
    assert ece["ci"][0] <= ece["value"] <= ece["ci"][1]


@pytest.mark.parametrize("k, classes", [(2, BINARY), (4, FOUR)])
def test_ci_is_percentile_of_sklearn_on_the_stratified_resamples(k, classes):
    y, p = _data(k, n=120, seed=4)
    b = 40
    result = compute_metrics(y, p, classes, n_bootstrap=b, seed=7, confidence=0.9)
    idx = stratified_bootstrap_indices(y, b, seed=7)
    pos = k - 1
    scorers = {
        "accuracy": lambda yy, pp: accuracy_score(yy, pp.argmax(1)),
        "balanced_accuracy": lambda yy, pp: balanced_accuracy_score(yy, pp.argmax(1)),
        "f1_macro": lambda yy, pp: f1_score(
            yy, pp.argmax(1), labels=range(k), average="macro", zero_division=0
        ),
        "log_loss": lambda yy, pp: log_loss(yy, pp, labels=range(k)),
    }
    if k == 2:
        scorers["auroc"] = lambda yy, pp: roc_auc_score(yy == pos, pp[:, pos])
        scorers["average_precision"] = lambda yy, pp: average_precision_score(yy == pos, pp[:, pos])
        scorers["brier"] = lambda yy, pp: brier_score_loss(yy == pos, pp[:, pos])
    else:
        scorers["auroc"] = lambda yy, pp: roc_auc_score(yy, pp, multi_class="ovr")
    for name, scorer in scorers.items():
        values = [scorer(y[i], p[i]) for i in idx]
        assert result[name]["ci"] == pytest.approx(list(np.percentile(values, [5, 95])), abs=1e-9)


def test_cis_are_deterministic_for_a_seed_and_change_with_another():
    y, p = _data(2, n=200, seed=5)
    first = compute_metrics(y, p, BINARY, n_bootstrap=100, seed=1)
    assert compute_metrics(y, p, BINARY, n_bootstrap=100, seed=1) == first
    other = compute_metrics(y, p, BINARY, n_bootstrap=100, seed=2)
    assert other["auroc"]["value"] == first["auroc"]["value"]
    assert other["auroc"]["ci"] != first["auroc"]["ci"]
    assert other["accuracy"]["ci"] != first["accuracy"]["ci"]


def test_no_bootstrap_gives_no_ci():
    y, p = _data(2, n=50)
    result = compute_metrics(y, p, BINARY, n_bootstrap=0)
    assert all(result[name]["ci"] is None for name in HEADLINE)
    assert all(
        e["ci"] is None
        for per in result["per_class"].values()
        for e in per.values()
        if isinstance(e, dict)
    )


def test_stratified_indices_keep_class_counts():
    y = np.array([0] * 7 + [1] * 3 + [2] * 5)
    idx = stratified_bootstrap_indices(y, 200, seed=0)
    assert idx.shape == (200, 15)
    assert (y[idx] == y).all()  # each position draws from its own class
    assert all((np.bincount(y[row], minlength=3) == [7, 3, 5]).all() for row in idx)
    assert len({tuple(row) for row in idx}) > 150  # and resamples differ
    assert (stratified_bootstrap_indices(y, 200, seed=0) == idx).all()


def test_operating_points_on_a_hand_made_example():
    positives = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.3, 0.2]
    negatives = [0.5, 0.4, 0.35, 0.1, 0.05]
    s = np.array(positives + negatives)
    y = np.array([1] * 10 + [0] * 5)
    ops = compute_metrics(y, np.c_[1 - s, s], BINARY, n_bootstrap=0)["thresholds"]["pneumonia"]
    # Sensitivity ≥ 0.90 needs 9 of 10 positives: threshold 0.3 (3 negatives at or above it).
    assert ops["sensitivity_0.90"] == pytest.approx(
        {"threshold": 0.3, "sensitivity": 0.9, "specificity": 0.4, "ppv": 9 / 12, "npv": 2 / 3}
    )
    assert ops["sensitivity_0.95"] == pytest.approx(
        {"threshold": 0.2, "sensitivity": 1.0, "specificity": 0.4, "ppv": 10 / 13, "npv": 1.0}
    )
    # Youden: at 0.6, 8/10 positives and 0/5 negatives → J = 0.8, the largest.
    assert ops["youden"] == pytest.approx(
        {"threshold": 0.6, "sensitivity": 0.8, "specificity": 1.0, "ppv": 1.0, "npv": 5 / 7}
    )


def test_operating_point_takes_the_highest_threshold_on_a_vertical_roc_segment():
    # No negative lies between 0.55 and 0.3, so thresholds 0.5 and 0.45 share one specificity;
    # the 0.90 target is first met at 0.5 (9 of 10 positives), which must not be skipped.
    s = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5, 0.45] + [0.55, 0.3, 0.2]
    y = [1] * 10 + [0] * 3
    out = operating_points(y, s)
    assert out["sensitivity_0.90"]["threshold"] == 0.5
    assert out["sensitivity_0.90"]["specificity"] == pytest.approx(2 / 3)
    assert out["sensitivity_0.95"]["threshold"] == 0.45
    assert out["youden"]["threshold"] == 0.6
    assert operating_points([1, 1, 1], [0.2, 0.5, 0.9])["youden"] is None


def test_single_class_split_reports_auroc_undefined():
    rng = np.random.default_rng(0)
    s = rng.random(40)
    result = compute_metrics(np.zeros(40, int), np.c_[1 - s, s], BINARY, n_bootstrap=50)
    for name in ("auroc", "average_precision"):
        assert result[name] == {"value": None, "ci": None}
    assert all(op is None for op in result["thresholds"]["pneumonia"].values())
    assert any("AUROC is undefined" in w and "'normal'" in w for w in result["warnings"])
    assert result["accuracy"]["value"] == pytest.approx(float((s < 0.5).mean()))
    assert result["accuracy"]["ci"] is not None
    assert result["per_class"]["pneumonia"]["sensitivity"] == {"value": None, "ci": None}
    assert result["per_class"]["normal"]["specificity"]["value"] is None  # no negatives
    assert any("specificity is undefined" in w for w in result["warnings"])
    json.dumps(result, allow_nan=False)


def test_absent_class_makes_macro_auroc_undefined_with_warning():
    y, p = _data(4, n=200, seed=6)
    keep = y != 2
    result = compute_metrics(y[keep], p[keep], FOUR, n_bootstrap=20)
    assert result["auroc"]["value"] is None
    assert any("AUROC" in w and "'c'" in w for w in result["warnings"])
    assert result["thresholds"]["c"]["youden"] is None
    assert result["thresholds"]["a"]["youden"] is not None
    assert result["accuracy"]["value"] is not None


def test_undefined_per_class_ratio_is_none_and_json_is_strict():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([[0.7, 0.1, 0.2]] * 3 + [[0.1, 0.8, 0.1]] * 3)  # class 2 never predicted
    result = compute_metrics(y, p, ["a", "b", "c"], n_bootstrap=30)
    assert result["per_class"]["c"]["precision"] == {"value": None, "ci": None}
    assert result["per_class"]["c"]["sensitivity"]["value"] == 0.0
    assert any("never predicted" in w for w in result["warnings"])
    text = json.dumps(result, allow_nan=False)
    assert "NaN" not in text
    assert type(result["n"]) is int and type(result["accuracy"]["value"]) is float


@pytest.mark.parametrize(
    "y, p, classes, kwargs, error, match",
    [
        ([0, 1, 1], [[0.5, 0.5]] * 2, BINARY, {}, DataError, "3 labels but probs has 2"),
        ([0, 1], [[0.5, 0.6]] * 2, BINARY, {}, DataError, "sum to 1"),
        ([0, 2], [[0.5, 0.5]] * 2, BINARY, {}, DataError, "class index 2"),
        ([0, 1], [[0.5, 0.5]] * 2, FOUR, {}, ConfigError, "2 columns but 4 class names"),
        ([0, 1], [[0.5, 0.5]] * 2, BINARY, {"positive": "flu"}, ConfigError, "'flu'"),
        ([], np.zeros((0, 2)), BINARY, {}, DataError, "empty"),
        ([0.5, 1], [[0.5, 0.5]] * 2, BINARY, {}, DataError, "integer"),
        ([0, 1], [[0.5, 0.5]] * 2, BINARY, {"n_bootstrap": -1}, ConfigError, "n_bootstrap"),
    ],
)
def test_bad_input_gets_a_clear_error(y, p, classes, kwargs, error, match):
    with pytest.raises(error, match=match):
        compute_metrics(np.array(y), np.array(p), classes, **kwargs)


def test_rows_off_by_less_than_tolerance_are_accepted():
    p = np.array([[0.3, 0.7005], [0.6, 0.4]])
    assert compute_metrics([1, 0], p, BINARY, n_bootstrap=0)["accuracy"]["value"] == 1.0


def test_paired_bootstrap_identical_models_differ_by_zero():
    y, p = _data(2, n=200, seed=8)
    out = paired_bootstrap_auroc(y, p, p.copy(), BINARY, n_bootstrap=200)
    assert out["difference"] == 0.0
    assert out["ci"] == [0.0, 0.0]
    assert out["p_value"] == pytest.approx(1.0)
    assert out["auroc_a"] == pytest.approx(roc_auc_score(y, p[:, 1]), abs=1e-12)


def test_paired_bootstrap_finds_a_clearly_better_model():
    y, good = _data(2, n=200, seed=9, signal=6.0)
    rng = np.random.default_rng(0)
    poor = softmax(rng.normal(size=(200, 2)) + 0.3 * np.eye(2)[y], axis=1)
    out = paired_bootstrap_auroc(y, good, poor, BINARY, n_bootstrap=300, seed=1)
    assert out["difference"] == pytest.approx(out["auroc_a"] - out["auroc_b"])
    assert out["difference"] > 0.2
    assert out["ci"][0] > 0
    assert out["p_value"] < 0.05
    reverse = paired_bootstrap_auroc(y, poor, good, BINARY, n_bootstrap=300, seed=1)
    assert reverse["difference"] < 0 and reverse["p_value"] < 0.05


def test_paired_bootstrap_on_one_class_split_is_undefined():
    p = np.full((10, 2), 0.5)
    out = paired_bootstrap_auroc(np.ones(10, int), p, p, BINARY, n_bootstrap=10)
    assert out["difference"] is None and out["p_value"] is None and out["warnings"]
