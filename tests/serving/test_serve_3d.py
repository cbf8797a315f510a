"""Serving a 3-D run: a NIfTI volume or a .zip of one DICOM series is predicted as for 2-D; a
2-D image is refused in one line; the worklist (which stores uploads) refuses volumes."""

from __future__ import annotations

import base64
import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from medsight.inference import Predictor
from medsight.serving.api import ServeSettings, create_app
from tests.serving.conftest import local_client, png_bytes
from tests.volumes import blob_volume, write_nifti, write_series


@pytest.fixture(scope="module")
def run3d(served_volume_run):
    return served_volume_run


@pytest.fixture
def client(run3d, tmp_path):
    return local_client(create_app(ServeSettings(run=run3d, data_dir=tmp_path / "serve")))


def upload(data: bytes, name: str = "upload.bin") -> dict:
    return {"file": (name, data, "application/octet-stream")}


def test_nifti_upload_is_predicted_like_the_file(client, run3d, tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", blob_volume(3, 12, True))
    response = client.post("/v1/predict", files=upload(path.read_bytes()))
    assert response.status_code == 200, response.text
    body = response.json()
    expected = Predictor.from_run(run3d).predict_files([path])[0]
    assert body["label"] in ("0", "1")
    assert body["probabilities"]["1"] == pytest.approx(float(expected[1]), abs=1e-5)


def test_zip_of_a_dicom_series_is_predicted(client, tmp_path):
    write_series(tmp_path / "s", (blob_volume(1, 10, True) + 1024).astype(np.int16))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for file in sorted((tmp_path / "s").iterdir()):
            archive.write(file, f"series/{file.name}")
    response = client.post("/v1/predict", files=upload(buffer.getvalue()))
    assert response.status_code == 200, response.text
    assert set(response.json()["probabilities"]) == {"0", "1"}


def test_2d_image_and_broken_series_are_refused_in_one_line(client, tmp_path):
    response = client.post("/v1/predict", files=upload(png_bytes()))
    assert response.status_code in (400, 415)
    assert "2-D image" in response.json()["detail"]
    write_series(tmp_path / "g", (blob_volume(2, 10) + 1024).astype(np.int16), skip=(4,))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for file in sorted((tmp_path / "g").iterdir()):
            archive.write(file, file.name)
    response = client.post("/v1/predict", files=upload(buffer.getvalue()))
    assert response.status_code == 400 and "missing slices" in response.json()["detail"]
    response = client.post("/v1/predict", files=upload(b"plain text, no volume"))
    assert response.status_code in (400, 415)


def test_worklist_refuses_volumes_and_stores_nothing(client, tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", blob_volume(4, 12))
    response = client.post("/v1/studies", files=upload(path.read_bytes()))
    assert response.status_code == 400 and "POST /v1/predict" in response.json()["detail"]
    assert client.get("/v1/worklist").json()["items"] == []


def test_a_volumes_heat_map_is_shown_on_three_planes(client, tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", blob_volume(5, 12, True))
    response = client.post("/v1/explain", files=upload(path.read_bytes()))
    assert response.status_code == 200, response.text
    body = response.json()
    picture = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    # axial, coronal and sagittal side by side: three tiles of one height
    assert picture.width >= 3 * picture.height - 8 and picture.height >= 200
    assert body["method"] and body["label"] in ("0", "1")


def test_model_info_says_the_model_takes_volumes(client):
    body = client.get("/v1/model").json()["input"]
    assert body["dims"] == 3 and (body["height"], body["width"], body["depth"]) == (12, 12, 12)
    assert body["formats"] == ["NIfTI (.nii, .nii.gz)", "DICOM series (.zip)"]
