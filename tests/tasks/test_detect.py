"""The detection task: decoding boxes into image pixels, thresholds, triage and refusals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from medsight.errors import ConfigError, DataError
from medsight.models import get_spec
from medsight.tasks import get_task, task_for
from medsight.tasks.detect import DEFAULT_THRESHOLD, point_name

CLASSES = ["nodule", "cyst"]


def _outputs(*rows) -> np.ndarray:
    """One image's ``(D, 6)`` outputs, padded to 5 rows."""
    out = np.zeros((5, 6), np.float32)
    out[:, 5] = -1
    for i, row in enumerate(rows):
        out[i] = row
    return out


@pytest.fixture
def task():
    return get_task("detect")


def test_decode_places_boxes_in_the_original_pixels_and_keeps_those_at_threshold(task):
    probs = np.stack([
        _outputs((0.1, 0.2, 0.3, 0.4, 0.9, 0), (0.5, 0.5, 0.75, 1.0, 0.4, 1)),
        _outputs(),
    ])  # fmt: skip
    decoded = task.decode(probs, CLASSES, thresholds=[0.5, 0.3], sizes=[(200, 100), (64, 64)])
    first, empty = decoded
    assert first["label"] == "nodule|cyst"
    assert first["confidence"] == pytest.approx(0.9)
    assert first["boxes"][0] == {"x1": 10.0, "y1": 40.0, "x2": 30.0, "y2": 80.0,
                                 "label": "nodule", "score": 0.9}  # fmt: skip
    assert first["boxes"][1]["x2"] == 75.0 and first["boxes"][1]["y2"] == 200.0
    assert empty == {"label": "no finding", "confidence": 0.0, "boxes": []}
    # the default threshold (0.5) drops the cyst
    assert [b["label"] for b in task.decode(probs[:1], CLASSES)[0]["boxes"]] == ["nodule"]
    assert DEFAULT_THRESHOLD == 0.5


def test_image_scores_urgency_and_triage_are_the_top_box_of_a_class(task):
    one = _outputs((0, 0, 0.1, 0.1, 0.3, 1), (0, 0, 0.2, 0.2, 0.7, 0), (0, 0, 0.3, 0.3, 0.6, 1))
    scores = task.image_scores(one[None], CLASSES)
    assert scores[0].tolist() == pytest.approx([0.7, 0.6])
    assert task.urgency(one, CLASSES, "cyst") == pytest.approx(0.6)
    assert task.triage(one, CLASSES, "cyst") == (pytest.approx(0.6), "cyst")
    assert task.triage(one, CLASSES, "cyst", urgent=CLASSES) == (pytest.approx(0.7), "nodule")
    assert task.column_values(one[None], CLASSES).tolist() == scores.tolist()
    assert task.urgency(_outputs(), CLASSES, "nodule") == 0.0


def test_decision_thresholds_come_from_the_evaluated_false_positive_rate(task):
    points = {c: {"fp_1": {"threshold": 0.42}, "fp_0.5": {"threshold": 0.61}} for c in CLASSES}
    assert task.decision_thresholds(CLASSES, points, "fp_0.5") == [0.61, 0.61]
    # a classifier's point name (the serving default) means the detector's default point
    assert task.decision_thresholds(CLASSES, points, "youden") == [0.42, 0.42]
    assert task.decision_thresholds(CLASSES, {}, "fp_1") == [0.5, 0.5]
    with pytest.raises(ConfigError, match="evaluated points: fp_0.5, fp_1"):
        task.decision_thresholds(CLASSES, points, "fp_8")
    assert point_name(0.125) == "fp_0.125" and point_name(1.0) == "fp_1"


def test_metrics_record_thresholds_per_class_at_each_rate(task):
    gt = np.array([[[0.1, 0.1, 0.3, 0.3, 0]], [[0.5, 0.5, 0.7, 0.7, 1]]], np.float32)
    pred = np.stack(
        [_outputs((0.1, 0.1, 0.3, 0.3, 0.9, 0)), _outputs((0.5, 0.5, 0.7, 0.7, 0.8, 1))]
    )
    metrics = task.metrics(gt, pred, CLASSES, "nodule", n_bootstrap=20)
    assert metrics["map50"]["value"] == pytest.approx(1.0)
    assert set(metrics["thresholds"]) == set(CLASSES)
    assert metrics["thresholds"]["cyst"]["fp_1"]["sensitivity"] == pytest.approx(1.0)


def test_the_loss_is_the_detectors_own_and_other_losses_are_refused(task):
    loss = task.build_loss(None, 0.0)
    assert float(loss({"a": torch.tensor(1.5), "b": torch.tensor(0.5)})) == 2.0
    with pytest.raises(ConfigError, match="not a detection loss"):
        task.build_loss(None, 0.0, loss="focal")
    with pytest.raises(ConfigError, match="not calibrated|--calibrate"):
        task.calibrate(np.zeros((1, 5, 6)), np.zeros((1, 1, 5)))


def test_models_and_tasks_must_match(task):
    with pytest.raises(ConfigError, match="--task detect trains a box detector.*fcos_mobilenet_v2"):
        task.check_model(get_spec("resnet18"))
    task.check_model(get_spec("fcos_mobilenet_v2"))
    with pytest.raises(ConfigError, match="box detector: train it with --task detect"):
        get_task("classify").check_model(get_spec("fcos_mobilenet_v2"))


def test_task_for_reads_boxes_and_refuses_classifying_them():
    from medsight.data.boxes import mark_detection

    table = mark_detection(
        pd.DataFrame({"sample_id": ["a"], "source": ["a.png"], "label": ["nodule"],
                      "boxes": ['[[1, 1, 5, 5, "nodule"]]'], "width": [8], "height": [8]}),
        ["nodule"],
    )  # fmt: skip
    assert task_for("auto", table) == "detect"
    with pytest.raises(ConfigError, match="these data are boxes"):
        task_for("classify", table)
    plain = pd.DataFrame({"sample_id": ["a"], "source": ["a.png"], "label": ["x"]})
    assert task_for("detect", plain) == "detect"  # the task then says how to provide boxes
    with pytest.raises(DataError, match="box"):
        get_task("detect").check_training_table(plain.assign(split="train"))


def test_compare_and_subgroups_say_what_a_detection_run_offers(task):
    with pytest.raises(ConfigError, match="mAP and FROC"):
        task.paired_difference(None, None, None, CLASSES, None)


def test_subgroups_score_lesions_within_each_group(task):
    gt = np.array([[[0.1, 0.1, 0.3, 0.3, 0]], [[0.5, 0.5, 0.7, 0.7, 1]], [[0, 0, 0, 0, -1]]])
    pred = np.stack([
        _outputs((0.1, 0.1, 0.3, 0.3, 0.9, 0)),  # found
        _outputs((0.0, 0.0, 0.1, 0.1, 0.8, 1)),  # missed: the box is elsewhere
        _outputs(),
    ]).astype(np.float32)  # fmt: skip
    masks = [np.array([1, 0, 1], bool), np.array([0, 1, 0], bool), np.zeros(3, bool)]
    (first, _), (second, _), (empty, notes) = task.subgroup_scores(
        gt.astype(np.float32), pred, CLASSES, None, masks, n_bootstrap=20
    )
    assert first["sensitivity_at_1fp"]["value"] == pytest.approx(1.0)
    assert second["sensitivity_at_1fp"]["value"] == pytest.approx(0.0)
    assert empty["map50"]["value"] is None and "empty" in notes[0]


def test_images_are_detected_at_their_own_size_within_128_to_320_px(task):
    assert task.input_side(64, 320) == 128  # small lesions need cells of the finest level
    assert task.input_side(200, 320) == 200
    assert task.input_side(640, 320) == 320  # CPU time
    assert get_task("classify").input_side(200, 224) == 224  # classifiers: the network's size
