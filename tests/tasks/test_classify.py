"""The classification task against hand-computed answers, the registry, and one run of a second
task through train → evaluate → predict → serve that shows nothing branches on the task's kind."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medsight import tasks
from medsight.cli import app
from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from medsight.errors import ConfigError, DataError
from medsight.evaluation.evaluate import evaluate_run
from medsight.evaluation.report import write_report
from medsight.inference import Predictor, predict_paths
from medsight.runs import Run
from medsight.serving.api import ServeSettings, create_app
from medsight.tasks import get_task
from medsight.tasks.classify import ClassifyTask
from medsight.training.trainer import train
from tests.conftest import make_two_class_manifest
from tests.serving.conftest import local_client, png_bytes

CLASSES = ["normal", "lesion"]


@pytest.fixture
def task() -> ClassifyTask:
    return get_task("classify")


def test_decode_gives_the_most_probable_class_and_its_probability(task):
    probs = np.array([[0.2, 0.8], [0.7, 0.3]])
    assert task.decode(probs, CLASSES) == [
        {"label": "lesion", "confidence": 0.8},
        {"label": "normal", "confidence": 0.7},
    ]
    for row in task.decode(probs, CLASSES):
        task.prediction_schema.model_validate(row)


def test_urgency_is_the_probability_of_the_urgent_class(task):
    assert task.urgency(np.array([0.1, 0.6, 0.3]), ["a", "b", "c"], "c") == pytest.approx(0.3)
    assert task.urgency(np.array([0.9, 0.1]), CLASSES, "lesion") == pytest.approx(0.1)


def test_targets_are_class_indices_and_bad_labels_are_named(task):
    assert task.targets(["lesion", "normal", "lesion"], CLASSES).tolist() == [1, 0, 1]
    assert task.targets(["lesion"], CLASSES).dtype == np.int64
    with pytest.raises(DataError, match=r"\['cyst', 'tumour'\].*classes: \['normal', 'lesion'\]"):
        task.targets(["lesion", "tumour", "cyst"], CLASSES)


def test_loss_is_cross_entropy_with_inverse_frequency_weights(task):
    logits, target = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    plain = task.build_loss(None, 0.0)
    assert plain(logits, target).item() == pytest.approx(math.log(1 + math.exp(-2)))
    weighted = task.build_loss(np.array([3, 1]), 0.0)  # N / (K · n_k) = 4/6 and 4/2
    assert weighted.weight.tolist() == pytest.approx([2 / 3, 2.0])
    with pytest.raises(ConfigError, match="every class"):
        task.build_loss(np.array([3, 0]), 0.0)


def test_monitor_score_is_higher_for_better(task):
    scores = {"loss": 0.4, "auroc": 0.9, "accuracy": 0.8, "balanced_accuracy": 0.75}
    assert task.monitor_score("loss", scores) == pytest.approx(-0.4)
    assert task.monitor_score("auroc", scores) == pytest.approx(0.9)
    # AUROC undefined on a one-class validation split: balanced accuracy stands in.
    assert task.monitor_score("auroc", {**scores, "auroc": None}) == pytest.approx(0.75)


def test_probabilities_are_the_softmax_through_the_saved_temperature(task):
    logits = np.array([[0.0, 2 * math.log(3)]])
    assert task.probabilities(logits).tolist() == [pytest.approx([0.1, 0.9])]
    calibrated = task.probabilities(logits, {"method": "temperature", "temperature": 2.0})
    assert calibrated.tolist() == [pytest.approx([0.25, 0.75])]


def test_calibration_is_a_temperature_that_probabilities_replays(task):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    logits = 6.0 * (np.eye(2)[y] - 0.5) + rng.normal(0, 3, (200, 2))  # overconfident
    calibration = task.calibrate(logits, y)
    assert calibration["method"] == "temperature" and calibration["temperature"] > 1
    assert task.probabilities(logits, calibration).sum(axis=1) == pytest.approx(np.ones(200))


def test_prediction_columns_name_each_class(task):
    assert task.prediction_columns(CLASSES) == ["p_normal", "p_lesion"]
    assert task.num_outputs(CLASSES) == 2


def test_a_misspelt_task_gets_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'classify'"):
        get_task("clasify")
    with pytest.raises(ConfigError, match=r"Known tasks: \['classify', 'detect', 'multilabel'\]"):
        get_task("segment")
    assert get_task(None).name == "classify"


def test_a_run_without_a_recorded_task_is_a_classification_run(tmp_path):
    from medsight.data.transforms import Preprocess

    (tmp_path / "config.yaml").write_text("data:\n  path: data\n")
    (tmp_path / "model.json").write_text(json.dumps({"name": "medcnn_s", "num_classes": 2}))
    Preprocess(size=(16, 16)).save(tmp_path / "preprocess.json")
    (tmp_path / "classes.json").write_text(json.dumps({"classes": CLASSES, "positive": "lesion"}))
    assert Run.load(tmp_path).task == "classify"
    model = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**model, "task": "other"}))
    assert Run.load(tmp_path).task == "other"


# --------------------------------------------------------------------------- a second task


class CalmFirst(ClassifyTask):
    """Classification with other rules: urgency is the opposite of classification's (the least
    likely urgent image first), labels are shouted, and the metrics report the mean urgency.
    A consumer that still used classification's rules would be caught out by each of them."""

    name = "calm_first"
    headline_metrics = ("accuracy", "auroc")
    report_sections = ("summary", "model_card")

    def urgency(self, probs, classes, positive):
        return 1.0 - float(np.asarray(probs)[list(classes).index(positive)])

    def decode(self, probs, classes, sizes=None):
        return [{**row, "label": row["label"].upper()} for row in super().decode(probs, classes)]

    def metrics(self, y, probs, classes, positive, *, n_bootstrap=1000, seed=0):
        result = super().metrics(y, probs, classes, positive, n_bootstrap=n_bootstrap, seed=seed)
        positive_index = list(classes).index(positive)
        return {**result, "mean_urgency": float(np.mean(1 - probs[:, positive_index]))}


def test_a_second_task_runs_train_evaluate_predict_serve_by_its_own_rules(tmp_path, monkeypatch):
    monkeypatch.setitem(tasks.TASKS, CalmFirst.name, CalmFirst)
    data = make_two_class_manifest(tmp_path / "data", 8, 2, 16)
    config = TrainConfig(
        task=CalmFirst.name,
        data=DataConfig(path=str(data), ratios=(0.5, 0.25, 0.25)),
        model=ModelConfig(name="medcnn_s"),
        optim=OptimConfig(epochs=1, batch_size=8, lr=3e-3),
        out=str(tmp_path / "run"),
    )
    path = train(config, show_progress=False).path
    assert Run.load(path).task == CalmFirst.name

    metrics = evaluate_run(path, n_bootstrap=10)
    assert "mean_urgency" in metrics
    predictions = (path / "predictions.csv").read_text().splitlines()
    assert {line.split(",")[2] for line in predictions[1:]} <= {"LESION", "NORMAL"}

    result = CliRunner().invoke(app, ["evaluate", str(path), "--bootstrap", "10"])
    assert result.exit_code == 0, result.output
    assert "auroc" in result.output and "f1_weighted" not in result.output  # its headline

    html = write_report(path, examples=0).read_text()
    assert 'id="summary"' in html and 'id="model-card"' in html
    assert 'id="confusion"' not in html and 'href="#curves"' not in html

    predictor = Predictor.from_run(path)
    assert isinstance(predictor.task, CalmFirst)
    images = [tmp_path / "dark.png", tmp_path / "bright.png"]
    for image, value in zip(images, (40, 220)):
        image.write_bytes(png_bytes(value))
    table = predict_paths(path, images)
    assert list(table.columns) == ["file", "label", "confidence", "p_lesion", "p_normal", "error"]
    assert set(table["label"]) <= {"LESION", "NORMAL"}

    # A policy of model risk alone: the worklist follows the task's own urgency (the default
    # policy first puts studies above the urgent class's evaluated thresholds).
    policy = tmp_path / "risk-only.yaml"
    policy.write_text("order:\n  - risk: highest\n")
    settings = ServeSettings(run=path, data_dir=tmp_path / "serve", policy=policy)
    client = local_client(create_app(settings))
    answer = client.post("/v1/predict", files={"file": ("a.png", png_bytes(220), "image/png")})
    assert answer.json()["label"] in {"LESION", "NORMAL"}
    studies = []
    for i, value in enumerate((40, 220, 130, 90, 180)):
        upload = {"file": ("s.png", png_bytes(value, seed=i), "image/png")}
        study = client.post("/v1/studies", files=upload).json()
        assert study["urgency"] == pytest.approx(1 - study["probabilities"]["lesion"], abs=1e-5)
        studies.append(study)
    listed = client.get("/v1/worklist").json()["items"]
    calm_first = sorted(studies, key=lambda s: (s["probabilities"]["lesion"], s["id"]))
    assert [s["id"] for s in listed] == [s["id"] for s in calm_first]
