"""Decompression bombs and hostile sizes: refused with one line before memory is spent.

Each bomb inflates to 64 MiB here (the real-scale ones, 1 GiB, are built by
``python -m tests.data.bombs FOLDER`` for measurements); ``tracemalloc`` shows what decoding
allocated, which the old decoder made the full inflated size.
"""

from __future__ import annotations

import io
import tracemalloc
import zipfile

import numpy as np
import pytest
from PIL import Image

from medsight.data import imaging
from medsight.data.imaging import decode, decode_bytes, zip_source
from medsight.errors import ImageDecodeError
from tests.data import bombs
from tests.data.bombs import MiB


def _peak(function, *args, **kwargs) -> tuple[int, BaseException | None]:
    """Bytes allocated at the peak while ``function`` runs, and what it raised."""
    tracemalloc.start()
    error = None
    try:
        function(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        error = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, error


# --------------------------------------------------------------------------- Deflated DICOM


def test_deflated_dicom_whose_data_outgrow_the_header_is_refused_before_inflating():
    data = bombs.deflated_dicom(64 * MiB, rows=64, cols=64, samples=3)
    peak, error = _peak(decode_bytes, data, name="bomb.dcm")
    assert isinstance(error, ImageDecodeError)
    assert error.reason == (
        "DICOM pixel data hold 67,108,864 bytes but the header's 64x64 pixels x 3 sample(s) "
        "x 1 frame(s) x 8 bits need 12,288 (corrupt, or a decompression bomb)"
    )
    assert peak < 4 * MiB


def test_deflated_dicom_with_a_stream_of_zeros_after_its_pixels_is_refused():
    data = bombs.deflated_dicom(64 * MiB, rows=64, cols=64, declared_length=4096)
    peak, error = _peak(decode_bytes, data, name="bomb.dcm")
    assert isinstance(error, ImageDecodeError)
    assert "Deflated DICOM data inflate past the" in error.reason
    assert "bytes its header declares" in error.reason
    assert peak < 8 * MiB


def test_honest_deflated_dicom_of_zeros_is_stopped_by_the_compression_ratio():
    # Header, element and data agree (8192x8192 bytes): only the ratio gives the bomb away.
    data = bombs.deflated_dicom(8192 * 8192, rows=8192, cols=8192)
    peak, error = _peak(decode_bytes, data, name="bomb.dcm", max_pixels=100_000_000)
    assert isinstance(error, ImageDecodeError)
    assert "a ratio above the limit of 100:1 for data over 8,388,608 bytes" in error.reason
    assert peak < 32 * MiB  # the old decoder inflated all 64 MiB first


def test_deflated_dicom_within_limits_decodes_to_its_pixels(tmp_path, helpers):
    from pydicom import dcmread
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    pixels = (np.arange(24 * 20).reshape(24, 20) * 7 % 1000).astype(np.int16)
    plain = helpers.write_dicom(tmp_path / "plain.dcm", pixels)
    ds = dcmread(plain)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = tmp_path / "deflated.dcm"
    ds.save_as(deflated, enforce_file_format=True)
    image = decode(str(deflated))
    np.testing.assert_array_equal(image.pixels, decode(str(plain)).pixels)
    assert image.meta["transfer_syntax"] == DeflatedExplicitVRLittleEndian
    assert imaging.dicom_header(deflated).Rows == 24


def test_dicom_header_of_a_deflated_bomb_reads_only_the_header(tmp_path):
    path = tmp_path / "bomb.dcm"
    path.write_bytes(bombs.deflated_dicom(64 * MiB, rows=64, cols=64))
    peak, error = _peak(imaging.dicom_header, path)
    assert error is None
    assert peak < 4 * MiB


# --------------------------------------------------------------------------- native DICOM


def test_native_dicom_pixel_data_must_match_the_header_before_being_read(tmp_path, helpers):
    path = helpers.write_dicom(tmp_path / "lie.dcm", np.zeros((8, 8)), Rows=4)
    with pytest.raises(ImageDecodeError) as err:
        decode(str(path))
    assert err.value.reason == (
        "DICOM pixel data hold 128 bytes but the header's 8x4 pixels x 1 sample(s) "
        "x 1 frame(s) x 16 bits need 64 (corrupt, or a decompression bomb)"
    )
    # 32 MiB of pixel data behind a 16x16 header stay on disk.
    big = helpers.write_dicom(tmp_path / "big.dcm", np.zeros((4096, 4096)), Rows=16, Columns=16)
    peak, error = _peak(decode, str(big))
    assert isinstance(error, ImageDecodeError) and "33,554,432 bytes" in error.reason
    assert peak < 4 * MiB


def test_all_frames_of_a_multiframe_dicom_count_against_the_pixel_limit(tmp_path, helpers):
    frames = np.zeros((100, 8, 8))
    path = helpers.write_dicom(tmp_path / "cine.dcm", frames.reshape(800, 8), Rows=8)
    from pydicom import dcmread

    ds = dcmread(path)
    ds.NumberOfFrames = 100
    ds.save_as(path)
    with pytest.raises(ImageDecodeError, match=r"8x8 x 100 frames = 6,400 pixels is above"):
        decode(str(path), max_pixels=5_000)
    assert decode(str(path), max_pixels=6_400).meta["frames"] == 100


def test_compressed_dicom_pixel_count_is_checked_before_decoding(tmp_path, helpers):
    from pydicom import dcmread
    from pydicom.uid import RLELossless

    pixels = (np.arange(16 * 16).reshape(16, 16) % 50).astype(np.int16)
    ds = dcmread(helpers.write_dicom(tmp_path / "plain.dcm", pixels))
    ds.compress(RLELossless, pixels)
    path = tmp_path / "rle.dcm"
    ds.save_as(path)
    with pytest.raises(ImageDecodeError, match=r"16x16 = 256 pixels is above the limit of 200"):
        decode(str(path), max_pixels=200)
    assert decode(str(path)).size == (16, 16)


# --------------------------------------------------------------------------- zip and gzip


def test_zip_member_with_a_bomb_ratio_is_refused_before_reading(tmp_path):
    archive = tmp_path / "data.zip"
    archive.write_bytes(bombs.zip_with_member(64 * MiB))
    peak, error = _peak(decode, zip_source(archive, "normal/bomb.dcm"))
    assert isinstance(error, ImageDecodeError)
    assert "inflate to 67,108,864 or more, a ratio above the limit of 100:1" in error.reason
    assert peak < 4 * MiB


def test_zip_member_larger_than_the_pixel_limit_allows_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(imaging, "METADATA_ALLOWANCE", 0)
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a/noise.png", np.random.default_rng(0).bytes(10_000))
    with pytest.raises(ImageDecodeError) as err:
        decode(zip_source(archive, "a/noise.png"), max_pixels=1_000)
    assert err.value.reason.startswith("inflates to more than 8,000 bytes, the limit for")


def test_gzip_nifti_of_zeros_is_stopped_by_the_compression_ratio():
    data = bombs.nifti_gz((512, 512, 256))
    peak, error = _peak(decode_bytes, data, name="vol.nii.gz")
    assert isinstance(error, ImageDecodeError)
    assert "a ratio above the limit of 100:1" in error.reason
    assert peak < 32 * MiB


def test_nifti_declaring_more_voxels_than_allowed_is_refused(tmp_path):
    path = tmp_path / "vol.nii.gz"
    path.write_bytes(bombs.nifti_gz((64, 64, 64)))
    with pytest.raises(ImageDecodeError) as err:
        decode(str(path), max_pixels=10_000)
    assert err.value.reason.startswith(
        "NIfTI volume of 64x64x64 = 262,144 voxels is above the limit of 40,000 (4 x max_pixels"
    )
    assert decode(str(path)).size == (64, 64)


def test_gzip_holding_something_else_than_nifti_is_refused(tmp_path, helpers):
    import gzip

    png = helpers.write_png(tmp_path / "a.png", helpers.random_image(0)).read_bytes()
    with pytest.raises(ImageDecodeError, match="gzip data hold no NIfTI image"):
        decode_bytes(gzip.compress(png), name="a.png.gz")


# --------------------------------------------------------------------------- NaN and infinity


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_tiff_holding_nan_or_infinity_is_refused(bad):
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    values[3, 4] = bad
    buffer = io.BytesIO()
    Image.fromarray(values, mode="F").save(buffer, format="TIFF")
    with pytest.raises(ImageDecodeError) as err:
        decode_bytes(buffer.getvalue(), name="float.tif")
    assert err.value.reason == (
        "pixel values include NaN or infinity; medsight needs finite numbers "
        "(fix the image, or leave it out)"
    )
    values[3, 4] = 0.5
    buffer = io.BytesIO()
    Image.fromarray(values, mode="F").save(buffer, format="TIFF")
    assert decode_bytes(buffer.getvalue()).pixels.max() == 1.0


def test_float_nifti_and_npz_holding_nan_are_refused(tmp_path):
    import nibabel as nib

    volume = np.ones((6, 6, 3), dtype=np.float32)
    volume[2, 2, 1] = np.nan
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    with pytest.raises(ImageDecodeError, match="NaN or infinity"):
        decode(str(tmp_path / "v.nii.gz"))
    images = np.ones((2, 8, 8), dtype=np.float32)
    images[1, 0, 0] = np.inf
    np.savez(tmp_path / "m.npz", train_images=images, train_labels=np.zeros((2, 1)))
    assert decode(imaging.npz_source(tmp_path / "m.npz", "train", 0)).size == (8, 8)
    with pytest.raises(ImageDecodeError, match="NaN or infinity"):
        decode(imaging.npz_source(tmp_path / "m.npz", "train", 1))


def test_dicom_with_a_nan_rescale_slope_is_refused(tmp_path, helpers):
    path = helpers.write_dicom(
        tmp_path / "s.dcm", np.ones((8, 8)), RescaleSlope="NaN", RescaleIntercept=0
    )
    with pytest.raises(ImageDecodeError, match="NaN or infinity"):
        decode(str(path))
