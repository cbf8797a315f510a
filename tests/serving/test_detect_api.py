"""The API of a detection run: boxes in the uploaded image's own pixels from /v1/predict (PNG
of any size, DICOM), the per-class top box scores as probabilities, the model facts of a
detector, the worklist ordered by the urgent class's top box and a 501 from /v1/explain.

The boxes are checked against the torch model's own normalised outputs on the same image.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from medsight.serving.api import ServeSettings, create_app
from tests.detect_fixtures import box_image, set_box_thresholds, train_detect_run
from tests.serving.conftest import local_client


@pytest.fixture(scope="module")
def detect_run(tmp_path_factory):
    """A tiny detector trained once for this module (classes hole, spot; urgent: spot)."""
    return train_detect_run(tmp_path_factory.mktemp("detect-serving"))


@pytest.fixture(scope="module")
def raw_outputs(detect_run):
    """``(data, (height, width)) → (D, 6)`` normalised boxes of the torch model itself."""
    from medsight.data.imaging import decode_bytes
    from medsight.inference import Predictor

    predictor = Predictor.from_run(detect_run)

    def outputs(data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
        image = decode_bytes(data, name="test")
        return predictor.predict_array(predictor.preprocess(image)[None])[0], image.size

    return outputs


def _png(width: int, height: int, seed: int = 0) -> bytes:
    """A box image (a spot, and a hole for odd seeds) stretched to ``width`` × ``height``."""
    boxes = [(12, 14, 26, 28, "spot")] + ([(38, 36, 52, 50, "hole")] if seed % 2 else [])
    pixels = Image.fromarray(box_image(boxes, 64, seed=seed)).resize((width, height))
    buffer = io.BytesIO()
    pixels.save(buffer, format="PNG")
    return buffer.getvalue()


def _client(run, tmp_path, **settings):
    return local_client(create_app(ServeSettings(run=run, data_dir=tmp_path / "d", **settings)))


def _file(data: bytes, name: str = "upload.png") -> dict:
    return {"file": (name, data, "application/octet-stream")}


def _expected_boxes(out: np.ndarray, size: tuple[int, int], threshold: float) -> list[tuple]:
    """The model's boxes at or above ``threshold``, corners × (width, height), best first."""
    height, width = size
    keep = (out[:, 5] >= 0) & (out[:, 4] >= threshold)
    return [
        (x1 * width, y1 * height, x2 * width, y2 * height, int(k), score)
        for x1, y1, x2, y2, score, k in out[keep]
    ]


def _assert_boxes_match(boxes: list[dict], expected: list[tuple], classes: list[str]) -> None:
    assert len(boxes) == len(expected)
    for box, (x1, y1, x2, y2, k, score) in zip(boxes, expected):
        assert [box["x1"], box["y1"], box["x2"], box["y2"]] == pytest.approx(
            [x1, y1, x2, y2], abs=0.011
        )
        assert box["label"] == classes[k]
        assert box["score"] == pytest.approx(score, abs=1e-4)


@pytest.mark.parametrize("width, height", [(96, 64), (200, 200)])
def test_predict_places_boxes_in_the_uploaded_images_pixels(
    detect_run, raw_outputs, tmp_path, width, height
):
    set_box_thresholds(detect_run, 0.0)
    client = _client(detect_run, tmp_path)
    classes = client.get("/v1/model").json()["classes"]
    data = _png(width, height, seed=1)
    response = client.post("/v1/predict", files=_file(data))
    assert response.status_code == 200, response.text
    body = response.json()
    out, size = raw_outputs(data)
    assert size == (height, width)
    assert body["boxes"], "at threshold 0 every box of the model is shown"
    _assert_boxes_match(body["boxes"], _expected_boxes(out, size, 0.0), classes)
    for box in body["boxes"]:
        assert 0 <= box["x1"] <= box["x2"] <= width and 0 <= box["y1"] <= box["y2"] <= height
    # Each class's probability is its top box score; the confidence the top score of all.
    real = out[out[:, 5] >= 0]
    for k, name in enumerate(classes):
        of_class = real[real[:, 5] == k, 4]
        top = float(of_class.max()) if len(of_class) else 0.0
        assert body["probabilities"][name] == pytest.approx(top, abs=1e-5)
    assert body["confidence"] == pytest.approx(float(real[:, 4].max()), abs=1e-5)
    found = {box["label"] for box in body["boxes"]}
    assert body["label"] == "|".join(c for c in classes if c in found)


def test_boxes_below_the_threshold_are_left_out(detect_run, raw_outputs, tmp_path):
    data = _png(96, 64, seed=3)
    out, size = raw_outputs(data)
    classes = json.loads((detect_run / "classes.json").read_text())["classes"]
    middle = float(np.median(out[out[:, 5] >= 0, 4]))
    set_box_thresholds(detect_run, middle)
    body = _client(detect_run, tmp_path).post("/v1/predict", files=_file(data)).json()
    assert all(box["score"] >= middle - 1e-4 for box in body["boxes"])
    _assert_boxes_match(body["boxes"], _expected_boxes(out, size, middle), classes)

    set_box_thresholds(detect_run, 1.01)
    body = _client(detect_run, tmp_path).post("/v1/predict", files=_file(data)).json()
    assert body["boxes"] == [] and body["label"] == "no finding"
    # The scores are still given: only the decision changed.
    assert max(body["probabilities"].values()) > 0
    assert not any(flag["flagged"] for flag in body["threshold_flags"])


def test_a_dicom_upload_gets_boxes_in_its_pixel_grid(detect_run, raw_outputs, tmp_path):
    from tests.conftest import write_dicom

    set_box_thresholds(detect_run, 0.0)
    pixels = Image.fromarray(box_image([(20, 10, 34, 24, "spot")], 64, seed=5)).resize((120, 80))
    path = write_dicom(tmp_path / "scan.dcm", np.asarray(pixels, dtype=np.int16) * 8)
    data = path.read_bytes()
    client = _client(detect_run, tmp_path)
    body = client.post("/v1/predict", files=_file(data, "scan.dcm")).json()
    out, size = raw_outputs(data)
    assert size == (80, 120)
    assert body["boxes"]
    _assert_boxes_match(body["boxes"], _expected_boxes(out, size, 0.0), ["hole", "spot"])
    assert max(box["x2"] for box in body["boxes"]) <= 120
    assert max(box["y2"] for box in body["boxes"]) <= 80


def test_the_openapi_schema_documents_the_boxes(detect_run, tmp_path):
    set_box_thresholds(detect_run, 0.5)
    schemas = _client(detect_run, tmp_path).get("/openapi.json").json()["components"]["schemas"]
    boxes = schemas["Prediction"]["properties"]["boxes"]
    assert boxes["type"] == "array" and boxes["items"]["$ref"].endswith("/Box")
    assert "threshold" in boxes["description"]
    box = schemas["Box"]
    assert set(box["required"]) == {"x1", "y1", "x2", "y2", "label", "score"}
    assert "pixel" in box["description"]
    assert "box" in schemas["Prediction"]["properties"]["probabilities"]["description"]


def test_model_info_describes_a_detector(detect_run, tmp_path):
    set_box_thresholds(detect_run, 0.3)
    info = _client(detect_run, tmp_path).get("/v1/model").json()
    assert info["task"] == "detect"
    assert info["classes"] == ["hole", "spot"]
    assert info["positive_class"] == "spot" and info["urgent"] == ["spot"]
    assert info["decision_point"] == "fp_1"  # what the thresholds are, whatever --point says
    assert info["decision_thresholds"] == {"hole": 0.3, "spot": 0.3}
    assert info["explanations"] is False
    assert info["metrics"] == {}  # the fixture's metrics.json holds thresholds only

    metrics = json.loads((detect_run / "metrics.json").read_text())
    metrics["map50"] = {"value": 0.61, "ci": [0.4, 0.8]}
    metrics["sensitivity_at_1fp"] = {"value": 0.7, "ci": [0.5, 0.9]}
    metrics["median_iou"] = {"value": 0.66, "ci": None}
    (detect_run / "metrics.json").write_text(json.dumps(metrics))
    info = _client(detect_run, tmp_path).get("/v1/model").json()
    assert info["metrics"] == {
        "map50": {"value": 0.61, "ci": [0.4, 0.8]},
        "sensitivity_at_1fp": {"value": 0.7, "ci": [0.5, 0.9]},
        "median_iou": {"value": 0.66, "ci": None},
    }
    assert info["evaluated"] is True and info["evaluated_split"] == "test"


def test_an_unevaluated_detector_decides_boxes_at_one_half(detect_run, tmp_path):
    (detect_run / "metrics.json").unlink(missing_ok=True)
    info = _client(detect_run, tmp_path).get("/v1/model").json()
    assert info["evaluated"] is False
    assert info["decision_thresholds"] == {"hole": 0.5, "spot": 0.5}


def test_the_worklist_is_ordered_by_the_urgent_classs_top_box(detect_run, raw_outputs, tmp_path):
    set_box_thresholds(detect_run, 0.0)
    client = _client(detect_run, tmp_path)
    spot = client.get("/v1/model").json()["classes"].index("spot")
    expected = {}
    for seed, (width, height) in enumerate([(64, 64), (96, 64), (80, 120), (128, 128)]):
        data = _png(width, height, seed=seed)
        response = client.post("/v1/studies", files=_file(data))
        assert response.status_code == 201, response.text
        study = response.json()
        out, _ = raw_outputs(data)
        of_spot = out[(out[:, 5] == spot), 4]
        top = float(of_spot.max()) if len(of_spot) else 0.0
        assert study["urgency"] == pytest.approx(top, abs=1e-5)
        assert study["urgency_finding"] == "spot"
        assert study["probabilities"]["spot"] == pytest.approx(top, abs=1e-5)
        assert study["flag"] == "fp_1"  # every score reaches a threshold of 0
        # the study keeps the boxes it was scored with, in its own pixels, as /v1/predict gives
        predicted = client.post("/v1/predict", files=_file(data)).json()["boxes"]
        assert study["boxes"] == predicted and study["boxes"]
        assert all(b["x2"] <= width and b["y2"] <= height for b in study["boxes"])
        expected[study["id"]] = study["urgency"]
    items = client.get("/v1/worklist").json()["items"]
    assert [i["id"] for i in items] == sorted(expected, key=lambda k: (-expected[k], k))
    assert len(set(expected.values())) > 1, "the images should not all score alike"


def test_explain_answers_501_saying_the_boxes_show_where(detect_run, tmp_path):
    set_box_thresholds(detect_run, 0.0)
    client = _client(detect_run, tmp_path)
    for path in ("/v1/explain", "/v1/explain?class=spot"):
        response = client.post(path, files=_file(_png(96, 64)))
        assert response.status_code == 501, response.text
        detail = response.json()["detail"]
        assert "boxes" in detail and "/v1/predict" in detail
    assert client.post("/v1/explain?class=lesion", files=_file(_png(96, 64))).status_code == 422
