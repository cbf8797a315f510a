"""Hostile pixel data reach the API as a 400 with the decoder's reason, never as a 500."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from medsight.serving.api import ServeSettings, create_app
from tests.data import bombs
from tests.serving.conftest import local_client, png_bytes


@pytest.fixture
def client(served_run, tmp_path):
    return local_client(create_app(ServeSettings(run=served_run, data_dir=tmp_path / "serve")))


def _float_tiff(bad: float) -> bytes:
    values = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    values[5, 5] = bad
    buffer = io.BytesIO()
    Image.fromarray(values, mode="F").save(buffer, format="TIFF")
    return buffer.getvalue()


@pytest.mark.parametrize("route", ["/v1/predict", "/v1/studies"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_float_tiff_with_nan_or_infinity_is_a_400_with_the_reason(client, route, bad):
    response = client.post(route, files={"file": ("scan.tif", _float_tiff(bad), "image/tiff")})
    assert response.status_code == 400
    assert response.json()["detail"] == (
        "the image cannot be decoded: pixel values include NaN or infinity; medsight needs "
        "finite numbers (fix the image, or leave it out)"
    )


def test_deflated_dicom_bomb_upload_is_a_400_naming_the_sizes(client):
    bomb = bombs.deflated_dicom(64 * bombs.MiB, rows=64, cols=64, samples=3)
    response = client.post("/v1/predict", files={"file": ("x.dcm", bomb, "application/dicom")})
    assert response.status_code == 400
    assert response.json()["detail"] == (
        "the image cannot be decoded: DICOM pixel data hold 67,108,864 bytes but the header's "
        "64x64 pixels x 3 sample(s) x 1 frame(s) x 8 bits need 12,288 (corrupt, or a "
        "decompression bomb)"
    )
    assert client.post("/v1/predict", files={"file": ("a.png", png_bytes())}).status_code == 200


def test_gzip_bomb_upload_is_a_400(client):
    bomb = bombs.nifti_gz((512, 512, 256))
    response = client.post("/v1/predict", files={"file": ("v.nii.gz", bomb, "application/gzip")})
    assert response.status_code == 400
    assert "a ratio above the limit of 100:1" in response.json()["detail"]


def test_the_server_refuses_images_above_4096_squared_by_default(tmp_path):
    from medsight.data.imaging import DEFAULT_MAX_PIXELS
    from medsight.serving.service import BYTES_PER_PIXEL, SERVE_MAX_PIXELS

    # One upload's memory budget stays within 512 MiB; offline commands keep the larger limit.
    assert ServeSettings(run=tmp_path).max_pixels == SERVE_MAX_PIXELS == 4096 * 4096
    assert BYTES_PER_PIXEL * SERVE_MAX_PIXELS <= 512 * 1024**2
    assert SERVE_MAX_PIXELS < DEFAULT_MAX_PIXELS


def test_an_image_one_row_above_the_server_limit_is_a_400(served_run, tmp_path):
    app = create_app(ServeSettings(run=served_run, data_dir=tmp_path / "serve"))
    buffer = io.BytesIO()
    Image.new("L", (4096, 4097)).save(buffer, format="PNG")
    with local_client(app) as client:
        response = client.post(
            "/v1/predict", files={"file": ("big.png", buffer.getvalue(), "image/png")}
        )
    assert response.status_code == 400
    assert response.json()["detail"] == (
        "the image cannot be decoded: 4096x4097 = 16,781,312 pixels is above the limit of "
        "16,777,216 (a possible decompression bomb); raise max_pixels (--max-pixels) if it is "
        "genuine"
    )
