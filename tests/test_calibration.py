"""Calibration: ECE and reliability curves on hand-made data, temperature scaling recovers a known
overconfidence, and a saved calibration replays exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import log_loss

from medsight.errors import ConfigError, DataError
from medsight.evaluation import (
    TemperatureScaler,
    apply_calibration,
    expected_calibration_error,
    reliability_curve,
)


def test_ece_is_gap_between_confidence_and_accuracy():
    # All confidences 0.8, 60 % correct → ECE 0.2.
    y = np.array([0] * 6 + [1] * 4)
    probs = np.array([[0.8, 0.2]] * 10)
    assert expected_calibration_error(y, probs) == pytest.approx(0.2, abs=1e-12)


def test_ece_weights_bins_by_their_size():
    # Bin at 0.9: 4 of 4 correct (gap 0.1); bin at 0.6: 3 of 5 correct (gap 0); bin at 0.5 (1
    # sample, wrong): gap 0.5.  ECE = 4/10·0.1 + 5/10·0 + 1/10·0.5 = 0.09.
    probs = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 5 + [[0.5, 0.5]])
    y = np.array([0] * 4 + [0, 0, 0, 1, 1] + [1])
    assert expected_calibration_error(y, probs) == pytest.approx(0.09, abs=1e-12)
    assert expected_calibration_error(y, probs, n_bins=1) == pytest.approx(abs(0.7 - 0.71))


def test_perfectly_confident_and_right_has_zero_ece():
    probs = np.eye(3)[[0, 1, 2, 1]]
    assert expected_calibration_error([0, 1, 2, 1], probs) == 0.0


def test_reliability_curve_lists_non_empty_bins():
    probs = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 5 + [[0.5, 0.5]])
    y = np.array([0] * 4 + [0, 0, 0, 1, 1] + [1])
    curve = reliability_curve(y, probs, n_bins=10)
    assert len(curve["bin_edges"]) == 11 and curve["bin_edges"][-1] == 1.0
    assert sum(curve["count"]) == len(y)
    assert curve["count"] == [1, 5, 4]
    assert curve["confidence"] == pytest.approx([0.5, 0.6, 0.9])
    assert curve["accuracy"] == pytest.approx([0.0, 0.6, 1.0])
    json.dumps(curve)


def test_reliability_counts_sum_to_n_on_random_data():
    rng = np.random.default_rng(0)
    probs = softmax(rng.normal(size=(500, 4)) * 2, axis=1)
    curve = reliability_curve(rng.integers(0, 4, 500), probs)
    assert sum(curve["count"]) == 500 and len(curve["bin_edges"]) == 16


def test_ece_rejects_logits():
    with pytest.raises(DataError, match="not logits"):
        expected_calibration_error([0, 1], [[2.0, -1.0], [0.5, 0.1]])
    with pytest.raises(DataError, match="row 1 sums to 0.6"):
        expected_calibration_error([0, 1], [[0.5, 0.5], [0.5, 0.1]])


def _overconfident(n=3000, k=3, factor=3.0, seed=0):
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(size=(n, k)) * 1.5
    probs = softmax(true_logits, axis=1)
    y = (rng.random(n)[:, None] > np.cumsum(probs, axis=1)).sum(axis=1)  # y ~ softmax(logits)
    return factor * true_logits, y


def test_temperature_recovers_overconfidence_factor():
    logits, y = _overconfident()
    scaler = TemperatureScaler().fit(logits, y)
    assert scaler.temperature_ == pytest.approx(3.0, abs=0.3)
    before = log_loss(y, softmax(logits, axis=1))
    after = log_loss(y, scaler.transform(logits))
    assert after < before - 0.05
    assert scaler.nll_after_ == pytest.approx(after, abs=1e-9)
    assert (scaler.transform(logits).argmax(1) == logits.argmax(1)).all()


def test_temperature_near_one_for_a_calibrated_model():
    logits, y = _overconfident(factor=1.0, seed=1)
    assert TemperatureScaler().fit(logits, y).temperature_ == pytest.approx(1.0, abs=0.15)


def test_temperature_round_trips_through_dict():
    logits, y = _overconfident(n=500)
    scaler = TemperatureScaler().fit(logits, y)
    saved = json.loads(json.dumps(scaler.to_dict()))
    assert saved == {"method": "temperature", "temperature": scaler.temperature_}
    again = TemperatureScaler.from_dict(saved)
    assert again.temperature_ == scaler.temperature_
    np.testing.assert_allclose(again.transform(logits), scaler.transform(logits))
    np.testing.assert_allclose(apply_calibration(logits, saved), scaler.transform(logits))


def test_apply_calibration_none_is_plain_softmax():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(apply_calibration(logits, None), softmax(logits, axis=1))
    halved = apply_calibration(logits, {"method": "temperature", "temperature": 2.0})
    np.testing.assert_allclose(halved, softmax(logits / 2, axis=1))


@pytest.mark.parametrize(
    "calibration, match",
    [
        ({"method": "isotonic"}, "unknown calibration method 'isotonic'"),
        ({"method": "temperature", "temperature": 0}, "positive number"),
        ({"method": "temperature", "temperature": "2"}, "positive number"),
    ],
)
def test_bad_calibration_is_a_config_error(calibration, match):
    with pytest.raises(ConfigError, match=match):
        apply_calibration([[1.0, 0.0]], calibration)


def test_unfitted_scaler_says_so():
    with pytest.raises(ConfigError, match="not fitted"):
        TemperatureScaler().transform([[1.0, 0.0]])
