"""medsight cv: folds disjoint by patient, out-of-fold predictions, summary files, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from medsight.cli import app
from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from medsight.data.sources import load_samples
from medsight.data.splits import assign_splits, fold_splits
from medsight.errors import ConfigError
from medsight.runs import Run
from medsight.workflows.cv import cross_validate
from tests.conftest import make_two_class_manifest


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_two_class_manifest(
        tmp_path_factory.mktemp("cv") / "data", n_patients=20, per_patient=3
    )


def config(data: Path, out: Path) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(path=str(data), ratios=(0.6, 0.2, 0.2)),
        model=ModelConfig(name="medcnn_s"),
        optim=OptimConfig(epochs=2, batch_size=8, patience=10),
        out=str(out),
    )


def test_folds_are_disjoint_by_patient_and_leave_test_alone(data):
    table = assign_splits(load_samples(data), ratios=(0.6, 0.2, 0.2), seed=0)
    development = table["split"].isin(["train", "val"])
    seen_val: set[str] = set()
    for k in range(4):
        folded = fold_splits(table, folds=4, fold=k, seed=0)
        assert folded.loc[~development, "split"].eq("test").all()
        val = folded[folded["split"] == "val"]
        train = folded[folded["split"] == "train"]
        # no patient on both sides of a fold, no image validated twice across folds
        assert not set(val["patient_id"]) & set(train["patient_id"])
        assert not set(val["sample_id"]) & seen_val
        seen_val |= set(val["sample_id"])
        assert set(val["label"]) == {"lesion", "normal"}  # stratified: every class in every fold
    assert seen_val == set(table.loc[development, "sample_id"])  # every image validated once


def test_cross_validation_writes_folds_oof_and_an_ensemble(data, tmp_path):
    out = tmp_path / "cv"
    summary = cross_validate(config(data, out), folds=3, n_bootstrap=100, show_progress=False)
    assert [f["fold"] for f in summary["per_fold"]] == [0, 1, 2]
    for f in summary["per_fold"]:
        run = Run.load(f["run"])
        assert (run.config.data.folds, run.config.data.fold) == (3, f["fold"])
    oof = pd.read_csv(out / "oof_predictions.csv")
    splits = Run.load(out / "fold_0").splits()
    development = splits[splits["split"] != "test"]
    assert sorted(oof["sample_id"]) == sorted(development["sample_id"])  # each exactly once
    assert summary["oof"]["n"] == len(development)
    auroc = summary["mean_sd"]["val"]["auroc"]
    values = [f["val"]["auroc"] for f in summary["per_fold"]]
    assert auroc["mean"] == pytest.approx(sum(values) / 3)
    assert summary["oof"]["auroc"]["ci"] is not None
    ensemble = summary["ensemble"]
    assert Path(ensemble["run"]).name == "ensemble"
    assert ensemble["n_test"] == int((splits["split"] == "test").sum())
    assert json.loads((out / "cv.json").read_text())["folds"] == 3
    page = (out / "cv.html").read_text()
    assert "Pooled out-of-fold" in page and "mean ± sd" in page


def test_resume_keeps_finished_folds(data, tmp_path):
    out = tmp_path / "cv"
    cross_validate(config(data, out), folds=2, ensemble=False, n_bootstrap=0, show_progress=False)
    weights = out / "fold_0" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    (out / "fold_1" / "metrics.json").unlink()  # as if stopped during fold 1
    summary = cross_validate(
        config(data, out), folds=2, ensemble=False, n_bootstrap=0, resume=True, show_progress=False
    )
    assert weights.stat().st_mtime_ns == before
    assert len(summary["per_fold"]) == 2 and summary["ensemble"] is None


def test_too_many_folds_names_the_maximum(data, tmp_path):
    # 20 patients, 2 classes, 80 % of patients in train+val: 8 per class at most
    with pytest.raises(ConfigError, match="maximum possible here is 8"):
        cross_validate(config(data, tmp_path / "cv"), folds=9, show_progress=False)
    assert not (tmp_path / "cv").exists()


def test_fold_settings_are_validated():
    with pytest.raises(ConfigError, match="folds and fold go together"):
        TrainConfig.parse({"data": {"path": ".", "fold": 1}})
    with pytest.raises(ConfigError, match="fold must be below folds"):
        TrainConfig.parse({"data": {"path": ".", "folds": 3, "fold": 3}})


def test_cv_cli(data, tmp_path):
    out = tmp_path / "cv"
    args = ["cv", "--data", str(data), "--folds", "2", "--epochs", "1", "--batch-size", "8"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    assert "2-fold cross-validation" in result.output and (out / "cv.html").exists()
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output
    result = CliRunner().invoke(app, [*args[:3], "--folds", "40", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "maximum possible" in result.output
