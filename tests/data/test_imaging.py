"""Decoding: channel conventions, value scaling, DICOM windowing and inversion, bad files."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pytest
from PIL import Image

from medsight.data import imaging
from medsight.data.imaging import decode, decode_bytes, window_linear
from medsight.errors import ImageDecodeError


def test_grayscale_png_decodes_to_one_channel_in_unit_range(tmp_path, helpers):
    pixels = np.array([[0, 128], [255, 64]], dtype=np.uint8)
    image = decode(str(helpers.write_png(tmp_path / "a.png", pixels)))
    assert image.pixels.dtype == np.float32
    assert image.pixels.shape == (1, 2, 2)
    assert image.channels == "L"
    np.testing.assert_allclose(image.pixels[0], pixels / 255.0, atol=1e-7)


def test_rgb_jpeg_decodes_channel_first(tmp_path):
    rgb = np.zeros((8, 12, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    path = tmp_path / "red.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    image = decode(str(path))
    assert image.pixels.shape == (3, 8, 12)
    assert image.channels == "RGB"
    assert image.pixels[0].mean() > 0.95 and image.pixels[1].mean() < 0.05


def test_sixteen_bit_png_is_min_max_scaled(tmp_path):
    values = np.array([[1000, 2000], [3000, 4095]], dtype=np.uint16)
    path = tmp_path / "xray16.png"
    Image.fromarray(values).save(path)
    image = decode(str(path))
    np.testing.assert_allclose(image.pixels[0], (values - 1000) / 3095.0, atol=1e-6)
    assert image.meta["scaling"] == "minmax"


def test_truncated_png_is_reported_by_name(tmp_path, helpers):
    good = helpers.write_png(tmp_path / "good.png", helpers.random_image(1, 64))
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageDecodeError) as err:
        decode(str(broken))
    assert err.value.source == str(broken)
    assert "truncated" in err.value.reason or "corrupt" in err.value.reason


def test_image_above_pixel_limit_is_refused_as_decompression_bomb(tmp_path, helpers):
    path = helpers.write_png(tmp_path / "big.png", np.zeros((100, 100), dtype=np.uint8))
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode(str(path), max_pixels=5_000)
    assert decode(str(path), max_pixels=10_000).size == (100, 100)


def test_unknown_content_and_missing_file_give_clear_reasons(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(ImageDecodeError, match="unrecognised image format"):
        decode(str(notes))
    with pytest.raises(ImageDecodeError, match="file not found"):
        decode(str(tmp_path / "missing.png"))
    with pytest.raises(ImageDecodeError, match="not a PNG, JPEG"):
        decode_bytes(b"hello world", name="upload.bin")


def test_decode_bytes_detects_format_from_content_not_name(tmp_path, helpers):
    data = helpers.write_png(tmp_path / "x.png", helpers.random_image(3)).read_bytes()
    image = decode_bytes(data, name="upload.dcm")
    assert image.meta["format"] == "png"


# --------------------------------------------------------------------------- windowing


def test_linear_window_matches_dicom_standard_formula():
    # PS3.3 C.11.2.1.2.1 with c=40, w=400: below c-0.5-(w-1)/2 → 0, above c-0.5+(w-1)/2 → 1.
    values = np.array([-160.0, -159.0, 39.5, 239.0, 240.0, 1000.0])
    out = window_linear(values, centre=40, width=400)
    expected = np.clip((values - 39.5) / 399 + 0.5, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out[0] == 0.0 and out[-1] == 1.0 and out[2] == pytest.approx(0.5)


def test_linear_exact_and_sigmoid_windows():
    exact = window_linear(
        np.array([0.0, 50.0, 100.0]), centre=50, width=100, function="LINEAR_EXACT"
    )
    np.testing.assert_allclose(exact, [0.0, 0.5, 1.0])
    sigmoid = window_linear(np.array([50.0]), centre=50, width=100, function="SIGMOID")
    assert sigmoid[0] == pytest.approx(0.5)


def test_dicom_rescale_and_window_known_answer(tmp_path, helpers):
    # Stored values 0..3 with slope 10 and intercept -20 → -20, -10, 0, 10 HU; window [0 ± 10].
    stored = np.array([[0, 1], [2, 3]])
    path = helpers.write_dicom(
        tmp_path / "ct.dcm",
        stored,
        RescaleSlope=10,
        RescaleIntercept=-20,
        WindowCenter=0,
        WindowWidth=21,
    )
    image = decode(str(path))
    hu = stored * 10 - 20
    np.testing.assert_allclose(image.pixels[0], np.clip((hu + 0.5) / 20 + 0.5, 0, 1), atol=1e-6)
    assert image.meta["window"] == [0.0, 21.0]


def test_dicom_monochrome1_is_inverted(tmp_path, helpers):
    stored = np.array([[0, 100], [200, 300]])
    mono2 = decode(str(helpers.write_dicom(tmp_path / "m2.dcm", stored)))
    mono1 = decode(
        str(
            helpers.write_dicom(
                tmp_path / "m1.dcm", stored, PhotometricInterpretation="MONOCHROME1"
            )
        )
    )
    np.testing.assert_allclose(mono2.pixels[0], [[0, 1 / 3], [2 / 3, 1]], atol=1e-6)
    np.testing.assert_allclose(mono1.pixels, 1.0 - mono2.pixels, atol=1e-6)
    assert mono1.meta["inverted"] is True


def test_window_override_replaces_file_window(tmp_path, helpers):
    stored = np.array([[-1000, 0], [40, 1000]])
    path = helpers.write_dicom(tmp_path / "ct.dcm", stored, WindowCenter=500, WindowWidth=100)
    image = decode(str(path), window=(40, 400))
    np.testing.assert_allclose(image.pixels[0], window_linear(stored.astype(float), 40, 400))


# --------------------------------------------------------------------------- NIfTI


def test_nifti_volume_slice_is_selected_and_oriented(tmp_path):
    nib = pytest.importorskip("nibabel")
    volume = np.zeros((4, 5, 3), dtype=np.float32)
    volume[:, :, 1] = np.arange(20, dtype=np.float32).reshape(4, 5)
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    image = decode(imaging.nifti_slice_source(path, axis=2, index=1))
    assert image.pixels.shape == (1, 5, 4)  # rows = y (flipped), columns = x
    # Top-left pixel shows the largest y at x = 0: voxel (0, 4) = 4, the brightest of column x=0.
    plane = np.flipud(volume[:, :, 1].T)
    lo, hi = np.percentile(plane, [0.5, 99.5])
    np.testing.assert_allclose(image.pixels[0], np.clip((plane - lo) / (hi - lo), 0, 1), atol=1e-6)
    default = decode(str(path))
    assert default.meta["slice"] == [2, 1]  # the middle slice by default


def test_nifti_from_bytes_gzip(tmp_path):
    nib = pytest.importorskip("nibabel")
    image2d = nib.Nifti1Image(np.arange(12, dtype=np.float32).reshape(3, 4), np.eye(4))
    buffer = io.BytesIO(gzip.compress(image2d.to_bytes()))
    decoded = decode_bytes(buffer.getvalue(), name="upload.nii.gz")
    assert decoded.pixels.shape == (1, 4, 3)


# --------------------------------------------------------------------------- real files


def _dicom(shared_data, name):
    return str(shared_data / "dicom-nifti" / "dicom" / name)


def test_real_ct_decodes_to_expected_shape_and_range(shared_data):
    image = decode(_dicom(shared_data, "CT_small.dcm"))
    assert image.pixels.shape == (1, 128, 128)
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0
    assert image.meta["modality"] == "CT"


def test_real_compressed_mr_decodes_identically_to_uncompressed(shared_data):
    reference = decode(_dicom(shared_data, "MR_small.dcm")).pixels
    assert reference.shape == (1, 64, 64)
    for name in ("MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        np.testing.assert_array_equal(decode(_dicom(shared_data, name)).pixels, reference)


def test_real_colour_and_palette_dicom_become_rgb(shared_data):
    rgb = decode(_dicom(shared_data, "examples_rgb_color.dcm"))
    palette = decode(_dicom(shared_data, "examples_palette.dcm"))
    assert rgb.pixels.shape == (3, 240, 320)
    assert palette.pixels.shape == (3, 350, 800)
    assert palette.pixels.min() >= 0.0 and palette.pixels.max() <= 1.0


def test_real_truncated_dicom_gives_a_clear_error(shared_data):
    path = _dicom(shared_data, "MR_truncated.dcm")
    with pytest.raises(ImageDecodeError) as err:
        decode(path)
    assert err.value.source == path
    assert "pixel data" in err.value.reason and "less than expected" in err.value.reason


def test_real_nifti_volumes_decode(shared_data):
    anatomical = decode(str(shared_data / "dicom-nifti" / "nifti" / "anatomical.nii"))
    assert anatomical.pixels.shape == (1, 41, 33)
    four_d = decode(str(shared_data / "dicom-nifti" / "nifti" / "example4d.nii.gz"))
    assert four_d.meta["volumes"] == 2 and four_d.pixels.shape == (1, 96, 128)
