"""The REST API: every route, auth, size limits, bad uploads, and the predict/serve commands."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from medsight.cli import app as cli
from medsight.errors import ConfigError
from medsight.serving.api import ServeSettings, create_app
from tests.conftest import write_dicom
from tests.serving.conftest import encoded, local_client, png_bytes


def make_client(run, tmp_path, **settings) -> TestClient:
    app = create_app(ServeSettings(run=run, data_dir=tmp_path / "serve", **settings))
    return local_client(app)


def upload(data: bytes, name: str = "image.png") -> dict:
    return {"file": (name, data, "application/octet-stream")}


@pytest.fixture
def client(served_run, tmp_path):
    return make_client(served_run, tmp_path)


def test_health_ready_docs_and_page(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/explain", "/v1/model", "/v1/worklist", "/v1/studies"} <= set(
        spec["paths"]
    )
    assert {"Prediction", "ModelInfo", "StudyItem", "StudyUpdate"} <= set(
        spec["components"]["schemas"]
    )
    page = client.get("/")
    assert page.status_code == 200 and "medsight" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_predict_reads_png_jpeg_tiff_and_dicom_by_content_not_name(client, tmp_path):
    dicom = write_dicom(tmp_path / "scan.dcm", np.full((16, 16), 900), WindowCenter=500)
    uploads = {
        "png": upload(png_bytes(170), "scan.dcm"),  # a misleading name changes nothing
        "jpeg": upload(encoded(170, "JPEG"), "photo"),
        "tiff": upload(encoded(170, "TIFF"), "x.png"),
        "dicom": upload(dicom.read_bytes(), "no-extension"),
    }
    for kind, files in uploads.items():
        response = client.post("/v1/predict", files=files)
        assert response.status_code == 200, (kind, response.text)
        body = response.json()
        assert set(body["probabilities"]) == {"lesion", "normal"}
        assert sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        assert body["label"] in body["probabilities"]
        assert body["confidence"] == pytest.approx(max(body["probabilities"].values()))
        assert body["model"]["name"] == "medcnn_s" and len(body["model"]["version"]) == 12
        assert body["latency_ms"] > 0
        flags = body["threshold_flags"]
        assert flags and {f["operating_point"] for f in flags} >= {"sensitivity_0.90"}
        for flag in flags:
            p = body["probabilities"][flag["class_name"]]
            assert flag["flagged"] == (p >= flag["threshold"])


def test_predict_matches_the_in_process_predictor(client, served_run):
    from medsight.inference import Predictor

    data = png_bytes(90, seed=3)
    expected = Predictor.from_run(served_run).predict_bytes(data)
    body = client.post("/v1/predict", files=upload(data)).json()
    assert list(body["probabilities"].values()) == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"name,label\nx,1\n", 415, "not a PNG, JPEG"),
        (png_bytes()[:60], 400, "cannot be decoded"),
        (b"", 400, "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, 400, "cannot be decoded"),
        (b"\x00" * 128 + b"DICM" + b"\x00" * 64, 400, "cannot be decoded"),
    ],
)
def test_bad_uploads_get_a_4xx_json_error_naming_the_problem(client, data, status, words):
    for route in ("/v1/predict", "/v1/studies", "/v1/explain"):
        response = client.post(route, files=upload(data))
        if route == "/v1/explain" and response.status_code == 501:
            continue  # explanations missing here: answered before the image is read
        assert response.status_code == status, (route, response.text)
        assert words in response.json()["detail"]
    assert client.get("/v1/worklist").json()["items"] == []


def test_missing_file_field_is_explained(client):
    response = client.post("/v1/predict", data={"image": "x"})
    assert response.status_code == 422
    assert "form field 'file'" in response.json()["detail"]


def test_decompression_bomb_guard(served_run, tmp_path):
    client = make_client(served_run, tmp_path, max_pixels=100)
    response = client.post("/v1/predict", files=upload(png_bytes(size=16)))
    assert response.status_code == 400
    assert "decompression bomb" in response.json()["detail"]


def test_uploads_above_the_size_limit_get_413(served_run, tmp_path):
    client = make_client(served_run, tmp_path, max_upload_bytes=2000)
    big = png_bytes(size=64)
    assert len(big) > 2000
    response = client.post("/v1/predict", files=upload(big))
    assert response.status_code == 413 and "limit" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(10):
            yield b"x" * 500

    response = client.post(
        "/v1/predict",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=abc"},
    )
    assert response.status_code == 413
    assert client.post("/v1/predict", files=upload(png_bytes())).status_code == 200


def test_token_is_required_on_every_v1_route_when_configured(served_run, tmp_path):
    client = make_client(served_run, tmp_path, token="s3cret")
    requests = [
        ("post", "/v1/predict", {"files": upload(png_bytes())}),
        ("post", "/v1/explain", {"files": upload(png_bytes())}),
        ("post", "/v1/studies", {"files": upload(png_bytes())}),
        ("get", "/v1/model", {}),
        ("get", "/v1/worklist", {}),
        ("patch", "/v1/studies/1", {"json": {"status": "reviewed"}}),
    ]
    for method, path, kwargs in requests:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = getattr(client, method)(path, headers=headers, **kwargs)
            assert response.status_code == 401, (path, headers)
            assert "bearer token" in response.json()["detail"]
    good = {"Authorization": "Bearer s3cret"}
    assert client.get("/v1/model", headers=good).status_code == 200
    assert client.post("/v1/predict", files=upload(png_bytes()), headers=good).status_code == 200
    assert client.get("/health").status_code == 200  # probes stay open
    assert client.get("/").status_code == 200


def test_refuses_to_listen_beyond_loopback_without_a_token(served_run, tmp_path, monkeypatch):
    monkeypatch.delenv("MEDSIGHT_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="--token"):
        create_app(ServeSettings(run=served_run, host="0.0.0.0", data_dir=tmp_path))
    for host in ("127.0.0.1", "localhost", "::1"):
        create_app(ServeSettings(run=served_run, host=host, data_dir=tmp_path))
    monkeypatch.setenv("MEDSIGHT_TOKEN", " from-env-0123456789\n")
    app = create_app(ServeSettings(run=served_run, host="0.0.0.0", data_dir=tmp_path))
    client = TestClient(app)
    assert client.get("/v1/model").status_code == 401
    good = {"Authorization": "Bearer from-env-0123456789"}
    assert client.get("/v1/model", headers=good).status_code == 200


def test_model_info_has_classes_input_metrics_with_ci_and_intended_use(client):
    body = client.get("/v1/model").json()
    assert body["classes"] == ["lesion", "normal"] and body["positive_class"] == "lesion"
    assert body["input"] == {
        "channels": 1,
        "height": 16,
        "width": 16,
        "mean": [0.5],
        "std": [0.5],
        "window": None,
        "formats": ["PNG", "JPEG", "TIFF", "BMP", "DICOM"],
        "dims": 2,
        "depth": None,
    }
    assert body["evaluated"] is True and body["evaluated_split"] == "test"
    assert set(body["metrics"]) >= {"auroc", "accuracy"}
    assert len(body["metrics"]["auroc"]["ci"]) == 2
    assert "sensitivity_0.90" in body["operating_points"]
    assert "Not for diagnosis" in body["intended_use"]
    assert body["backend"] == "torch"


def test_model_info_without_metrics_json(served_run, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(served_run, bare, ignore=shutil.ignore_patterns("metrics.json", "worklist"))
    body = make_client(bare, tmp_path).get("/v1/model").json()
    assert body["evaluated"] is False and body["metrics"] == {} and body["operating_points"] == {}
    assert (
        make_client(bare, tmp_path)
        .post("/v1/predict", files=upload(png_bytes()))
        .json()["threshold_flags"]
        == []
    )


def test_explain_answers_501_with_a_message_when_explanations_are_missing(client, monkeypatch):
    monkeypatch.setitem(sys.modules, "medsight.explain", None)  # import now raises ImportError
    response = client.post("/v1/explain", files=upload(png_bytes()))
    assert response.status_code == 501
    assert "explanations are not available" in response.json()["detail"]


def test_explain_returns_the_prediction_and_an_overlay_png(client):
    explain = pytest.importorskip("medsight.explain")
    if not hasattr(explain, "Explainer"):
        pytest.skip("medsight.explain has no Explainer yet")
    import base64
    import io

    from PIL import Image

    response = client.post("/v1/explain", files=upload(png_bytes(170)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] in ("lesion", "normal") and body["method"]
    picture = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert picture.format == "PNG" and picture.mode == "RGB" and min(picture.size) >= 64


def test_onnx_backend_serves_the_same_probabilities(served_run, tmp_path, client):
    pytest.importorskip("onnxruntime")
    onnx = make_client(served_run, tmp_path, backend="onnx")
    data = png_bytes(120, seed=5)
    a = client.post("/v1/predict", files=upload(data)).json()["probabilities"]
    b = onnx.post("/v1/predict", files=upload(data)).json()["probabilities"]
    assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-4)
    assert onnx.get("/v1/model").json()["backend"] == "onnx"


# --------------------------------------------------------------------------- commands


def test_predict_command_writes_a_csv_and_reports_bad_files(served_run, tmp_path):
    good = tmp_path / "a.png"
    good.write_bytes(png_bytes(170))
    dicom = write_dicom(tmp_path / "b.dcm", np.full((16, 16), 100))
    bad = tmp_path / "c.png"
    bad.write_text("not an image")
    out = tmp_path / "preds.csv"
    result = CliRunner().invoke(
        cli, ["predict", str(served_run), str(good), str(dicom), str(bad), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["file", "label", "confidence", "p_lesion", "p_normal", "error"]
    assert table["label"].tolist()[:2] != ["", ""] and table["label"][2] == ""
    assert "c.png" in table["error"][2]
    from medsight.inference import Predictor

    expected = Predictor.from_run(served_run).predict_files([good])[0]
    got = [float(table["p_lesion"][0]), float(table["p_normal"][0])]
    assert got == pytest.approx(expected.tolist(), abs=1e-5)

    result = CliRunner().invoke(cli, ["predict", str(served_run), str(bad)])
    assert result.exit_code == 2 and "none of the files" in result.output


def test_serve_command_refuses_a_public_address_without_a_token(served_run, monkeypatch):
    monkeypatch.delenv("MEDSIGHT_TOKEN", raising=False)
    result = CliRunner().invoke(cli, ["serve", str(served_run), "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "token" in result.output and "0.0.0.0" in result.output


def test_error_bodies_are_json(client):
    response = client.post("/v1/predict", files=upload(b"GIF89a......"))
    assert response.headers["content-type"].startswith("application/json")
    assert json.loads(response.text)["detail"]


def test_explain_says_whether_its_method_passed_the_sanity_check(served_run, tmp_path):
    pytest.importorskip("medsight.explain")
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(served_run, run)
    unchecked = make_client(run, tmp_path / "a").post("/v1/explain", files=upload(png_bytes(170)))
    assert unchecked.json()["passes_sanity"] is None and unchecked.json()["sanity_rho"] is None

    scores = {
        "methods": {"gradcam": {"pointing_game": {"value": 0.9}}, "ig": {}},
        "sanity": {
            "gradcam": {"spearman": {"value": 0.12, "ci": None}},
            "ig": {"spearman": {"value": 0.9, "ci": None}},
        },
    }
    (run / "localisation.json").write_text(json.dumps(scores))
    body = make_client(run, tmp_path / "b").post("/v1/explain", files=upload(png_bytes(170)))
    assert body.json()["method"] == "gradcam"
    assert (body.json()["sanity_rho"], body.json()["passes_sanity"]) == (0.12, True)
