"""Prediction with a multi-label run: a sigmoid per finding, each finding decided by its own
threshold (metrics.json's operating points, else 0.5), the CSV of ``medsight predict``, the
triage rule, and ONNX export with the same probabilities."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit
from typer.testing import CliRunner

from medsight.cli import app
from medsight.errors import ConfigError
from medsight.inference import Predictor, predict_paths
from medsight.tasks import get_task
from medsight.tasks.multilabel import threshold_scaled
from tests.serving.multilabel import (
    copy_run,
    train_multilabel_run,
    write_finding_images,
    write_thresholds,
)


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory):
    return train_multilabel_run(tmp_path_factory.mktemp("multilabel"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_finding_images(tmp_path_factory.mktemp("finding-images"))


def _expected_label(row: np.ndarray, thresholds) -> str:
    names = [name for name, p, t in zip("ab", row, thresholds) if p >= t]
    return "|".join(names) or "no finding"


def test_the_predictor_gives_a_sigmoid_per_finding(ml_run, images):
    predictor = Predictor.from_run(ml_run)
    assert predictor.task.name == "multilabel" and predictor.classes_ == ["a", "b"]
    x = np.stack([predictor.preprocess(_decode(p)) for p in images.values()])
    probs = predictor.predict_array(x)
    np.testing.assert_allclose(probs, expit(predictor.logits_array(x)), atol=1e-6)
    # The trained model sees the squares: each finding's probability is higher with it.
    by_name = dict(zip(images, probs))
    assert by_name["a"][0] > by_name["none"][0] and by_name["b"][1] > by_name["none"][1]


def _decode(path):
    from medsight.data.imaging import decode

    return decode(str(path))


def test_predict_writes_finding_columns_and_the_findings_above_half_when_not_evaluated(
    ml_run, images
):
    table = predict_paths(ml_run, list(images.values()))
    assert list(table.columns) == ["file", "label", "confidence", "p_a", "p_b", "error"]
    assert table.attrs["thresholds"] == {"a": 0.5, "b": 0.5}
    assert "not been evaluated" in table.attrs["thresholds_from"]
    probs = table[["p_a", "p_b"]].to_numpy()
    np.testing.assert_allclose(probs, Predictor.from_run(ml_run).predict_files(images.values()))
    assert table["label"].tolist() == [_expected_label(r, (0.5, 0.5)) for r in probs]
    np.testing.assert_allclose(table["confidence"], probs.max(axis=1))
    assert (table["error"] == "").all()


def test_thresholds_come_from_the_evaluated_youden_point_by_default(ml_run, images, tmp_path):
    run = copy_run(ml_run, tmp_path / "run")
    write_thresholds(run, {"a": 0.9, "b": 0.1})
    predictor = Predictor.from_run(run)
    assert predictor.thresholds_ == [0.9, 0.1]
    probs = predictor.predict_files(list(images.values()))
    decoded = predictor.decode(probs)
    for row, prediction in zip(probs, decoded):
        assert prediction["label"] == _expected_label(row, (0.9, 0.1))
        assert [f["threshold"] for f in prediction["findings"]] == [0.9, 0.1]
        assert [f["above_threshold"] for f in prediction["findings"]] == [
            bool(row[0] >= 0.9),
            bool(row[1] >= 0.1),
        ]
    # Another evaluated point: write_thresholds puts sensitivity_0.90 at half of Youden's.
    assert Predictor.from_run(run, point="sensitivity_0.90").thresholds_ == [0.45, 0.05]
    table = predict_paths(run, list(images.values()), point="sensitivity_0.90")
    assert table.attrs["thresholds"] == {"a": 0.45, "b": 0.05}
    assert table["label"].tolist() == [
        _expected_label(r, (0.45, 0.05)) for r in table[["p_a", "p_b"]].to_numpy()
    ]


def test_a_point_the_evaluation_lacks_is_refused_and_an_undefined_finding_gets_half(
    ml_run, tmp_path
):
    run = copy_run(ml_run, tmp_path / "run")
    doc = {"thresholds": {"a": {"youden": {"threshold": 0.3}}, "b": {"youden": None}}}
    (run / "metrics.json").write_text(json.dumps(doc))
    assert Predictor.from_run(run).thresholds_ == [0.3, 0.5]
    with pytest.raises(ConfigError, match="'sensitivity_0.99' is not in .* points: youden"):
        Predictor.from_run(run, point="sensitivity_0.99")


def test_the_predict_command_writes_the_csv_and_says_which_thresholds(ml_run, images, tmp_path):
    run = copy_run(ml_run, tmp_path / "run")
    write_thresholds(run, {"a": 0.7, "b": 0.2})
    out = tmp_path / "predictions.csv"
    result = CliRunner().invoke(
        app, ["predict", str(run), *map(str, images.values()), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "thresholds a 0.700, b 0.200 (metrics.json, operating point youden)" in result.output
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["file", "label", "confidence", "p_a", "p_b", "error"]
    assert table["label"].tolist() == [
        _expected_label(r, (0.7, 0.2)) for r in table[["p_a", "p_b"]].to_numpy()
    ]


def test_onnx_export_of_a_multilabel_run_round_trips_the_probabilities(ml_run, images, tmp_path):
    pytest.importorskip("onnxruntime")
    run = copy_run(ml_run, tmp_path / "run")
    result = CliRunner().invoke(app, ["export", str(run), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    assert (run / "model.onnx").exists() and "max |Δprobability|" in result.output
    onnx = Predictor.from_run(run, backend="onnx")
    assert onnx.backend.name == "onnx"
    torch_probs = Predictor.from_run(run).predict_files(list(images.values()))
    onnx_probs = onnx.predict_files(list(images.values()))
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-5)
    # Sigmoid outputs, not a softmax over the findings: rows need not sum to one.
    assert not np.allclose(onnx_probs.sum(axis=1), 1.0, atol=1e-3)
    table = predict_paths(run, list(images.values()), backend="onnx")
    np.testing.assert_allclose(table[["p_a", "p_b"]].to_numpy(), torch_probs, atol=1e-5)


# --------------------------------------------------------------------------- the task's rules


def test_triage_takes_the_urgent_finding_furthest_past_its_own_threshold():
    task = get_task("multilabel")
    probs = np.array([0.40, 0.60, 0.95])
    classes = ["a", "b", "c"]
    thresholds = [0.2, 0.8, 0.99]
    # a: 0.5 + 0.5 * 0.2 / 0.8 = 0.625 (above its threshold); b: 0.5 * 0.6 / 0.8 = 0.375;
    # c: 0.5 * 0.95 / 0.99 = 0.4798 (below): a drives, though b and c are more probable.
    urgency, driver = task.triage(probs, classes, None, thresholds=thresholds)
    assert (round(urgency, 4), driver) == (0.625, "a")
    urgency, driver = task.triage(probs, classes, None, thresholds=thresholds, urgent=["b", "c"])
    assert (round(urgency, 4), driver) == (round(0.5 * 0.95 / 0.99, 4), "c")
    # Thresholds of 0.5 (not evaluated): the urgency is the highest urgent probability.
    assert task.triage(probs, classes, None) == (pytest.approx(0.95), "c")
    assert task.urgency(probs, classes, None, urgent=["a", "b"]) == pytest.approx(0.60)
    assert task.urgency(probs, classes, "b") == pytest.approx(0.60)  # positive: that one only
    with pytest.raises(ConfigError, match=r"\['x'\] are not findings of this run"):
        task.triage(probs, classes, None, urgent=["x"])


def test_threshold_scaling_keeps_the_order_within_a_finding_and_puts_its_threshold_at_half():
    for t in (0.05, 0.3, 0.5, 0.9):
        ps = np.linspace(0, 1, 41)
        scaled = [threshold_scaled(p, t) for p in ps]
        assert np.all(np.diff(scaled) > 0)
        assert threshold_scaled(t, t) == pytest.approx(0.5)
        assert scaled[0] == 0 and scaled[-1] == pytest.approx(1)
    assert threshold_scaled(0.37, 0.5) == pytest.approx(0.37)


def test_decode_takes_thresholds_in_order_or_by_name_and_explains_the_findings_above_them():
    task = get_task("multilabel")
    probs = np.array([[0.3, 0.7, 0.1]])
    by_order = task.decode(probs, ["a", "b", "c"], thresholds=[0.2, 0.8, 0.5])[0]
    by_name = task.decode(probs, ["a", "b", "c"], thresholds={"a": 0.2, "b": 0.8})[0]
    assert by_order == by_name and by_order["label"] == "a"
    assert [f["threshold"] for f in by_name["findings"]] == [0.2, 0.8, 0.5]
    with pytest.raises(ConfigError, match="got 2 thresholds for 3 findings"):
        task.decode(probs, ["a", "b", "c"], thresholds=[0.2, 0.8])
    assert task.explain_targets(probs[0], ["a", "b", "c"], [0.2, 0.5, 0.5]) == ["b", "a"]
    assert task.explain_targets(probs[0], ["a", "b", "c"], [0.9, 0.9, 0.9]) == ["b"]
    # Classification still explains its predicted class and decides without thresholds.
    classify = get_task("classify")
    assert classify.explain_targets(np.array([0.2, 0.8]), ["normal", "lesion"]) == ["lesion"]
    assert classify.decision_thresholds(["normal", "lesion"], {}, "youden") is None
    assert classify.triage(np.array([0.2, 0.8]), ["normal", "lesion"], "normal") == (
        pytest.approx(0.2),
        "normal",
    )
