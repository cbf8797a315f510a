"""medsight evaluate / compare end to end on a tiny trained run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score
from typer.testing import CliRunner

from medsight.cli import app
from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from medsight.errors import DataError
from medsight.evaluation.compare import compare_runs
from medsight.evaluation.evaluate import evaluate_run
from medsight.tasks.classify_metrics import HEADLINE
from medsight.training.trainer import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.conftest import make_two_class_manifest

    root = tmp_path_factory.mktemp("eval")
    data = make_two_class_manifest(root / "data", n_patients=16, per_patient=3)
    runs = []
    for seed in (0, 1):
        config = TrainConfig(
            data=DataConfig(path=str(data), ratios=(0.5, 0.2, 0.3)),
            model=ModelConfig(name="medcnn_s"),
            optim=OptimConfig(epochs=2, batch_size=8, patience=10),
            out=str(root / f"run{seed}"),
            seed=0,
        )
        config = config.with_overrides({"optim.lr": 3e-3 * (1 + seed)})
        runs.append(train(config, show_progress=False).path)
    return data, runs


def test_evaluate_writes_metrics_that_agree_with_sklearn(trained):
    data, (run, _) = trained
    metrics = evaluate_run(run, n_bootstrap=200, by=["sex"])
    for key in (
        "n",
        "classes",
        "per_class",
        "confusion_matrix",
        "thresholds",
        "subgroups",
        *HEADLINE,
    ):
        assert key in metrics, key
    predictions = pd.read_csv(run / "predictions.csv")
    assert list(predictions.columns[:5]) == [
        "sample_id",
        "label",
        "predicted",
        "p_lesion",
        "p_normal",
    ]
    assert len(predictions) == metrics["n"]
    y = (predictions["label"] == "lesion").to_numpy()
    assert metrics["auroc"]["value"] == pytest.approx(
        roc_auc_score(y, predictions["p_lesion"]), abs=1e-9
    )
    assert metrics["accuracy"]["value"] == pytest.approx(
        accuracy_score(predictions["label"], predictions["predicted"]), abs=1e-9
    )
    for name in HEADLINE:
        entry = metrics[name]
        if entry["value"] is not None and entry["ci"] is not None:
            assert entry["ci"][0] - 1e-12 <= entry["value"] <= entry["ci"][1] + 1e-12, name
    assert set(metrics["subgroups"]["sex"]["groups"]) == {"F", "M"}
    assert json.loads((run / "metrics.json").read_text())["n"] == metrics["n"]


def test_calibrate_stores_a_temperature_used_by_prediction(trained):
    from medsight.inference import Predictor

    _, (run, _) = trained
    metrics = evaluate_run(run, n_bootstrap=0, calibrate=True)
    calibration = json.loads((run / "calibration.json").read_text())
    assert calibration["temperature"] > 0
    assert metrics["calibration"] == calibration
    predictor = Predictor.from_run(run)
    x = np.zeros(predictor.input_shape, dtype=np.float32)
    logits = predictor.logits_array(x)
    expected = np.exp(logits / calibration["temperature"])
    np.testing.assert_allclose(predictor.predict_array(x), expected / expected.sum(1), rtol=1e-5)
    (run / "calibration.json").unlink()


def test_bad_by_column_and_unknown_classes_are_named(trained, tmp_path, helpers):
    data, (run, _) = trained
    with pytest.raises(
        DataError,
        match=r"--by column\(s\) \['ethnicity'\] not in the data; "
        r"available: .*'sex'",
    ):
        evaluate_run(run, by=["ethnicity"])
    other = tmp_path / "other"
    helpers.make_class_folders(other, {"lesion": 2, "cyst": 2})
    with pytest.raises(DataError, match=r"class\(es\) \['cyst'\] that the run does not know"):
        evaluate_run(run, data=other)


def test_compare_gives_a_paired_p_value(trained):
    _, runs = trained
    for run in runs:
        evaluate_run(run, n_bootstrap=100)
    result = compare_runs(runs, n_bootstrap=200)
    assert result["n_shared"] > 0
    assert "paired" not in result["runs"][0]
    paired = result["runs"][1]["paired"]
    assert 0.0 <= paired["p_value"] <= 1.0
    output = CliRunner().invoke(app, ["compare", *map(str, runs), "--bootstrap", "100"])
    assert output.exit_code == 0, output.output
    assert "ΔAUROC" in output.output


def test_evaluate_cli_prints_the_table(trained):
    _, (run, _) = trained
    result = CliRunner().invoke(app, ["evaluate", str(run), "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    assert "auroc" in result.output and "sensitivity" in result.output
