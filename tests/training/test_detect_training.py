"""Detection end to end on tiny generated data: train → evaluate → predict → export, resume,
and the messages for data and options a detector cannot use."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from tests.detect_fixtures import make_box_csv, set_box_thresholds, train_detect_run
from typer.testing import CliRunner

from medsight import runs
from medsight.cli import app
from medsight.config import DataConfig, OptimConfig, TrainConfig
from medsight.errors import ConfigError, DataError
from medsight.evaluation.compare import compare_runs
from medsight.evaluation.evaluate import evaluate_run
from medsight.export import export_run
from medsight.inference import Predictor, predict_paths
from medsight.training import trainer
from medsight.training.trainer import train


@pytest.fixture(scope="module")
def detect_run(tmp_path_factory):
    return train_detect_run(tmp_path_factory.mktemp("detect"))


def test_a_detection_run_records_its_task_and_the_detection_recipe(detect_run):
    run = runs.Run.load(detect_run)
    assert run.task == "detect"
    assert json.loads((detect_run / runs.MODEL).read_text())["name"] == "fcos_mobilenet_v2"
    assert run.config.model.name == "fcos_mobilenet_v2"  # --model auto, written down
    assert run.config.optim.lr == pytest.approx(3e-4)  # lr auto: the detector's rate
    assert run.config.optim.monitor == "map50"
    assert run.preprocess.size == (128, 128)  # 64 px images, detected at 128 at least
    history = run.history()
    assert {"val_map", "val_map50"} <= set(history.columns)
    assert history["val_loss"].isna().all()  # defined in training mode only


def test_evaluate_writes_boxes_and_detection_metrics(detect_run):
    metrics = evaluate_run(detect_run, n_bootstrap=20)
    for key in ("map50", "map", "sensitivity_at_1fp", "median_iou", "froc", "thresholds"):
        assert key in metrics
    assert metrics["froc"]["fps_per_image"] == [0.125, 0.25, 0.5, 1, 2, 4, 8]
    predictions = pd.read_csv(detect_run / runs.PREDICTIONS)
    assert {"boxes", "true_boxes", "width", "height", "p_hole", "p_spot"} <= set(predictions)
    for text, width in zip(predictions["boxes"], predictions["width"]):
        for x1, _, x2, _, label, score in json.loads(text):
            assert 0 <= x1 <= x2 <= width and label in ("hole", "spot") and score >= 0.05
    # p_<class> is the top box score of the class in the image
    top = [max([b[5] for b in json.loads(t) if b[4] == "spot"], default=0.0)
           for t in predictions["boxes"]]  # fmt: skip
    kept = predictions["p_spot"] >= 0.05
    assert np.allclose(np.array(top)[kept], predictions["p_spot"][kept], atol=1e-3)


def test_predict_places_boxes_in_each_files_pixels_and_writes_json(detect_run, tmp_path):
    from tests.conftest import write_png
    from tests.detect_fixtures import box_image

    set_box_thresholds(detect_run, 0.0)  # every kept box is shown
    big = write_png(tmp_path / "big.png", np.kron(box_image([(10, 10, 22, 22, "spot")]),
                                                  np.ones((3, 2), np.uint8)))  # fmt: skip
    table = predict_paths(detect_run, [big, tmp_path / "missing.png"])
    assert table.loc[1, "error"] and table.loc[1, "boxes"] == ""
    boxes = json.loads(table.loc[0, "boxes"])
    assert boxes and all(b["x2"] <= 128 and b["y2"] <= 192 for b in boxes)  # 128 wide, 192 high
    predictor = Predictor.from_run(detect_run)
    raw = predictor.predict_files([big])[0]
    best = raw[0]
    assert boxes[0]["x1"] == pytest.approx(best[0] * 128, abs=0.01)
    assert boxes[0]["y2"] == pytest.approx(best[3] * 192, abs=0.01)

    out = tmp_path / "pred.json"
    result = CliRunner().invoke(app, ["predict", str(detect_run), str(big), "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())
    assert records[0]["boxes"][0]["label"] in ("hole", "spot")
    (detect_run / runs.METRICS).unlink()


def test_onnx_export_predicts_like_torch(detect_run):
    result = export_run(detect_run)
    assert result["max_abs_diff_prob"] < 1e-4
    x = np.random.default_rng(0).normal(size=(3, 3, 128, 128)).astype(np.float32)
    torch_out = Predictor.from_run(detect_run).predict_array(x)
    onnx_out = Predictor.from_run(detect_run, backend="onnx").predict_array(x)  # 1 per call
    assert onnx_out.shape == torch_out.shape == (3, 100, 6)
    assert np.allclose(onnx_out, torch_out, atol=1e-4)


def test_tta_calibration_and_compare_say_what_a_detector_offers(detect_run, tmp_path):
    with pytest.raises(ConfigError, match="--tta.*boxes"):
        Predictor.from_run(detect_run, tta="flip")
    with pytest.raises(ConfigError, match="operating thresholds"):
        evaluate_run(detect_run, calibrate=True, n_bootstrap=10)
    evaluate_run(detect_run, n_bootstrap=10)
    with pytest.raises(DataError, match="mAP and FROC"):
        compare_runs([detect_run, detect_run], n_bootstrap=10)
    # against a classifier: the task differs, and the message says what is comparable
    from tests.conftest import write_run

    classifier = write_run(tmp_path / "classifier", tmp_path)
    (classifier / runs.PREDICTIONS).write_text("sample_id,label,predicted,p_normal,p_lesion\n")
    with pytest.raises(DataError, match="only runs of the same task.*image-level AUROC"):
        compare_runs([classifier, detect_run], n_bootstrap=10)


def _config(data, out, **optim):
    base = {"epochs": 2, "batch_size": 8, "warmup_epochs": 0}
    return TrainConfig(
        task="detect",
        data=DataConfig(path=str(data), ratios=(0.5, 0.25, 0.25)),
        optim=OptimConfig(**{**base, **optim}),
        out=str(out),
    )


def test_a_resumed_detection_run_ends_with_the_same_weights(tmp_path, monkeypatch):
    data = make_box_csv(tmp_path / "data", n=16)
    straight = train(_config(data, tmp_path / "a"), show_progress=False)
    real_validate, calls = trainer._validate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(trainer, "_validate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_config(data, tmp_path / "b"), show_progress=False)
    monkeypatch.setattr(trainer, "_validate", real_validate)
    resumed = train(_config(data, tmp_path / "b"), resume=True, show_progress=False)
    a = torch.load(straight.path / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(resumed.path / "checkpoints" / "last.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_masks_become_boxes_and_sets_without_either_are_told_how(tmp_path, helpers):
    from medsight.data.synth import write_phantom_dataset

    phantom = write_phantom_dataset(tmp_path / "phantom", n=30, size=32, seed=0)
    setup = trainer._Setup.build(_config(phantom, tmp_path / "p"), tmp_path / "p")
    assert setup.task.name == "detect" and setup.classes == ["benign", "malignant"]
    assert any("boxes derived from masks" in note for note in setup.notes)

    folders = helpers.make_class_folders(tmp_path / "folders", {"a": 4, "b": 4})
    with pytest.raises(DataError, match="(?i)box"):
        trainer._Setup.build(_config(folders, tmp_path / "f"), tmp_path / "f")


def test_options_a_detector_cannot_use_are_refused(tmp_path):
    data = make_box_csv(tmp_path / "data", n=16)
    with pytest.raises(ConfigError, match="--task detect trains a box detector"):
        cfg = _config(data, tmp_path / "x").with_overrides({"model.name": "resnet18"})
        trainer._Setup.build(cfg, tmp_path / "x")
    with pytest.raises(ConfigError, match="--mode features"):
        trainer._Setup.build(_config(data, tmp_path / "y", mode="features"), tmp_path / "y")
    with pytest.raises(ConfigError, match="not a detection loss"):
        train(_config(data, tmp_path / "z", loss="focal"), show_progress=False)


def test_the_cli_trains_a_detector_and_shows_map_each_epoch(tmp_path):
    data = make_box_csv(tmp_path / "data", n=16)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["train", "--data", str(data), "--task", "detect", "--epochs", "1", "--batch-size", "8",
         "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "map50" in result.output or "mAP" in result.output
    assert "val loss" not in result.output  # undefined for a detector, not "nan"
    assert runs.Run.load(out).task == "detect"


def test_heat_maps_and_cross_validation_say_a_detector_has_neither(detect_run, tmp_path):
    from medsight.explain.cam import Explainer
    from medsight.workflows.cv import check_folds

    with pytest.raises(ConfigError, match="its boxes show where"):
        Explainer.from_run(detect_run)
    result = CliRunner().invoke(app, ["explain", str(detect_run), "--masks"])
    assert result.exit_code != 0 and "boxes show where" in result.output
    data = make_box_csv(tmp_path / "data", n=16)
    with pytest.raises(ConfigError, match="these data have boxes"):
        check_folds(_config(data, tmp_path / "cv"), 3)


def test_tuning_says_it_searches_classifier_recipes(tmp_path):
    from medsight.workflows.tune import tune

    data = make_box_csv(tmp_path / "data", n=16)
    with pytest.raises(ConfigError, match="searches classifier recipes.*--task detect"):
        tune(_config(data, tmp_path / "t"), trials=1, out=tmp_path / "best")


def test_an_image_size_given_is_the_one_used(tmp_path):
    data = make_box_csv(tmp_path / "data", n=16)
    config = _config(data, tmp_path / "s").with_overrides({"data.image_size": 96})
    assert trainer._Setup.build(config, tmp_path / "s").preprocess.size == (96, 96)
