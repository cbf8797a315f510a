"""medsight ensemble: the mean of calibrated member probabilities, as a run like any other."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from medsight.calibration import apply_calibration
from medsight.cli import app
from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from medsight.errors import ConfigError, DataError
from medsight.evaluation.evaluate import evaluate_run
from medsight.inference import Predictor
from medsight.models.ensemble import EnsembleClassifier
from medsight.runs import Run
from medsight.training.trainer import train
from medsight.workflows.ensemble import build_ensemble
from tests.conftest import make_two_class_manifest


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    data = make_two_class_manifest(root / "data", n_patients=16, per_patient=3)
    paths = []
    for k, (name, attention) in enumerate([("medcnn_s", "none"), ("medcnn_s", "se")]):
        config = TrainConfig(
            data=DataConfig(path=str(data), ratios=(0.5, 0.25, 0.25)),
            model=ModelConfig(name=name, attention=attention),
            optim=OptimConfig(epochs=2, batch_size=8, patience=10, lr=3e-3 * (k + 1)),
            out=str(root / f"m{k}"),
        )
        paths.append(train(config, show_progress=False).path)
    return root, data, paths


def test_ensemble_predicts_the_weighted_mean_of_calibrated_member_probabilities(members):
    root, _, paths = members
    run = build_ensemble(paths, root / "ens-weighted", weighted=True)
    info = json.loads((run.path / "ensemble.json").read_text())
    temperatures = [m["temperature"] for m in info["members"]]
    weights = np.array([m["weight"] for m in info["members"]])
    skills = np.array([m["val_auroc"] for m in info["members"]])
    assert weights.sum() == pytest.approx(1.0)
    assert weights == pytest.approx(
        np.maximum(skills - 0.5, 1e-3) / np.maximum(skills - 0.5, 1e-3).sum()
    )
    x = np.random.default_rng(0).normal(size=(5, 1, 16, 16)).astype(np.float32)
    expected = sum(
        w
        * apply_calibration(
            Predictor.from_run(p).logits_array(x), {"method": "temperature", "temperature": t}
        )
        for w, t, p in zip(weights, temperatures, paths)
    )
    got = Predictor.from_run(run.path).predict_array(x)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_an_ensemble_run_is_evaluated_exported_and_explained_like_any_run(members):
    root, _, paths = members
    run = build_ensemble(paths, root / "ens")
    assert isinstance(run.load_model(), EnsembleClassifier)
    metrics = evaluate_run(run.path, n_bootstrap=0)
    assert metrics["n"] == int((Run.load(paths[0]).splits()["split"] == "test").sum())
    from medsight.evaluation.report import write_report

    page = write_report(run.path, examples=0).read_text()
    assert "ensemble of 2: medcnn_s (none), medcnn_s (se)" in page
    onnx = Predictor.from_run(run.path, backend="onnx")
    torch_backend = Predictor.from_run(run.path)
    x = np.random.default_rng(1).normal(size=(3, 1, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(onnx.predict_array(x), torch_backend.predict_array(x), atol=1e-4)

    from medsight.explain.cam import Explainer

    explainer = Explainer.from_run(run.path, method="gradcam")
    assert explainer.layer.split(",") == [
        "members.0.backbone.stage3",
        "members.1.backbone.stage3",
    ]
    heatmap = explainer.explain(x[:1])
    assert heatmap.shape == (16, 16) and heatmap.min() >= 0 and heatmap.max() <= 1


def test_runs_of_different_tasks_are_refused(members, tmp_path):
    root, data, paths = members
    other = tmp_path / "other"
    make_two_class_manifest(other, n_patients=12)
    manifest = other / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(",lesion,", ",tumour,"))
    config = TrainConfig(
        data=DataConfig(path=str(other), ratios=(0.5, 0.25, 0.25)),
        optim=OptimConfig(epochs=1, batch_size=8),
        out=str(tmp_path / "run-other"),
    )
    other_run = train(config, show_progress=False).path
    with pytest.raises(DataError, match="classes.*same classes"):
        build_ensemble([paths[0], other_run], tmp_path / "bad")
    with pytest.raises(ConfigError, match="at least 2 runs"):
        build_ensemble([paths[0]], tmp_path / "bad")
    with pytest.raises(ConfigError, match="listed twice"):
        build_ensemble([paths[0], paths[0]], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_ensemble_test_split_leaves_out_images_a_member_trained_on(members, tmp_path):
    root, data, paths = members
    config = Run.load(paths[0]).config.with_overrides({"seed": 7, "out": str(tmp_path / "s7")})
    reshuffled = train(config, show_progress=False).path  # another split: test images differ
    run = build_ensemble([paths[0], reshuffled], tmp_path / "ens")
    splits = run.splits()
    test = set(splits.loc[splits["split"] == "test", "sample_id"])
    for member in (paths[0], reshuffled):
        member_splits = Run.load(member).splits().set_index("sample_id")["split"]
        assert (member_splits.loc[sorted(test)] == "test").all()


def test_ensemble_cli(members, tmp_path):
    _, _, paths = members
    out = tmp_path / "ens"
    result = CliRunner().invoke(app, ["ensemble", *map(str, paths), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "ensemble.json").exists()
    result = CliRunner().invoke(app, ["evaluate", str(out), "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["ensemble", str(paths[0]), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "at least 2 runs" in result.output


def test_an_ensemble_is_served_with_a_heat_map(members, tmp_path):
    from medsight.serving.api import ServeSettings, create_app
    from tests.serving.conftest import local_client, png_bytes

    root, _, paths = members
    run = build_ensemble(paths, tmp_path / "ens")
    client = local_client(create_app(ServeSettings(run=run.path, data_dir=tmp_path / "serve")))
    assert client.get("/v1/model").json()["model"]["name"] == "ensemble"
    files = {"file": ("scan.png", png_bytes(170), "application/octet-stream")}
    predicted = client.post("/v1/predict", files=files)
    assert predicted.status_code == 200, predicted.text
    assert sum(predicted.json()["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    explained = client.post("/v1/explain", files=files)
    assert explained.status_code == 200, explained.text
