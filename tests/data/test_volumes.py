"""Volumes: NIfTI, DICOM series and MedMNIST3D read with their geometry; the faults of a DICOM
series named; the MONAI preprocessing recorded and replayed; the readers' 3-D tables."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from medsight.data import imaging
from medsight.data.checks import check_samples
from medsight.data.sources import load_samples
from medsight.data.transforms import Preprocess, load_preprocess, volume_augmentation
from medsight.data.volumes import (
    VolumePreprocess,
    find_dicom_series,
    intensity_for,
    read_volume,
    untilt,
    volume_thumbnail,
)
from medsight.errors import ConfigError, DataError, ImageDecodeError
from tests.conftest import write_dicom, write_png
from tests.volumes import blob_volume, make_nifti_folders, make_npz3d, write_nifti, write_series


def _ct(seed: int = 1, size: int = 10) -> np.ndarray:
    return (blob_volume(seed, size, True) + 1024).astype(np.int16)


def test_dicom_series_is_sorted_by_position_with_spacing_from_positions(tmp_path):
    volume = _ct()
    write_series(tmp_path / "s", volume, spacing=(0.8, 0.7, 2.5))
    (source,) = find_dicom_series(tmp_path)
    read = read_volume(source)
    assert read.shape == volume.shape
    assert read.spacing == pytest.approx((0.8, 0.7, 2.5))
    assert read.orientation == "LPS"  # DICOM's axial grid: X to the left, Y to posterior
    assert read.meta["modality"] == "CT"
    # written in shuffled file order, read back in position order, HU kept
    np.testing.assert_allclose(read.array[0], volume.astype(np.float32) - 1024)


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ({"skip": (4,)}, "missing slices"),
        ({"duplicate": 3}, "duplicated slices"),
        ({"other_orientation": 5}, "mixed orientations"),
    ],
)
def test_faulty_series_is_refused_by_name(tmp_path, fault, words):
    write_series(tmp_path / "s", _ct(), **fault)
    (source,) = find_dicom_series(tmp_path)
    with pytest.raises(ImageDecodeError, match=words):
        read_volume(source)


def _tilted_sphere(folder, centre=(8.0, 12.0, 15.0), radius=4.0, shift=0.9):
    """A sphere at ``centre`` mm (DICOM LPS), scanned with a gantry tilt: slice k's plane is
    shifted ``shift`` mm along Y, so its pixels are sampled from the shifted plane."""
    nx, ny, nz, dz = 20, 24, 12, 2.5
    i, j = np.meshgrid(np.arange(nx, dtype=float), np.arange(ny, dtype=float), indexing="ij")
    planes = []
    for k in range(nz):
        x, y, z = i * 0.8, k * shift + j * 0.8, k * dz
        inside = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 < radius**2
        planes.append(np.where(inside, 60.0, -1000.0))
    volume = (np.stack(planes, axis=-1) + 1024).astype(np.int16)
    write_series(folder, volume, spacing=(0.8, 0.8, dz), tilt=shift)
    (source,) = find_dicom_series(folder)
    return source


def test_a_gantry_tilt_is_refused_by_name_unless_the_run_corrects_it(tmp_path):
    source = _tilted_sphere(tmp_path / "s")
    volume = read_volume(source)
    assert volume.meta["gantry_tilt"] == pytest.approx(np.degrees(np.arctan(0.9 / 2.5)), abs=0.1)
    refuse = VolumePreprocess.build(16, intensity="ct-soft-tissue")
    with pytest.raises(ImageDecodeError, match="gantry tilt: the slices are stacked 19.8° off"):
        refuse.prepare(volume)
    # corrected: an orthogonal grid, and the sphere where it is in the patient
    straight = untilt(volume)
    axes = straight.affine[:3, :3]
    assert abs(axes[:, 0] @ axes[:, 2]) < 1e-6 and abs(axes[:, 1] @ axes[:, 2]) < 1e-6
    assert straight.spacing == pytest.approx((0.8, 0.8, 2.5))
    assert "gantry_tilt" not in straight.meta and straight.meta["tilt_corrected"] > 19
    bright = np.argwhere(straight.array[0] > -500).mean(axis=0)
    centre_ras = straight.affine @ np.append(bright, 1.0)
    np.testing.assert_allclose(centre_ras[:3], [-8.0, -12.0, 15.0], atol=0.8)  # LPS → RAS
    # read as if orthogonal (the shear dropped), the sphere would sit 5 mm off in Y
    naive = volume.affine.copy()
    naive[:3, 2] = [0, 0, 2.5]
    raw_bright = np.argwhere(volume.array[0] > -500).mean(axis=0)
    assert abs((naive @ np.append(raw_bright, 1.0))[1] - -12.0) > 4.0
    corrected = VolumePreprocess.build(16, intensity="ct-soft-tissue", tilt="correct")
    assert corrected.prepare(volume).shape == (1, 16, 16, 16)
    report = check_samples(load_samples(tmp_path / "s", dims=3))
    assert "gantry tilt" in report.unreadable[0]["reason"]
    assert "--tilt correct" in report.unreadable[0]["reason"]


def test_four_d_nifti_takes_the_first_volume_and_says_so(tmp_path):
    array = np.stack([np.full((6, 7, 8), float(v)) for v in range(3)], axis=-1)
    path = write_nifti(tmp_path / "t.nii.gz", array.astype(np.float32), spacing=(2, 2, 3))
    with pytest.warns(UserWarning, match="4-D NIfTI of 3 volumes; using the first"):
        first = read_volume(str(path))
    assert first.shape == (6, 7, 8) and first.spacing == (2.0, 2.0, 3.0)
    assert first.array.max() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_volume(str(path), volume=2).array.max() == 2


def test_a_2d_image_is_refused_in_one_line(tmp_path):
    png = write_png(tmp_path / "x.png", np.zeros((16, 16)))
    with pytest.raises(ImageDecodeError, match="is a 2-D image, but this run takes 3-D"):
        read_volume(str(png))


def test_medmnist3d_npz_is_a_3d_table_and_2d_decoding_refuses_it(tmp_path):
    npz = make_npz3d(tmp_path / "tiny3d.npz", {"train": 4, "val": 2, "test": 2}, size=12)
    table = load_samples(npz)
    assert table.attrs["dims"] == 3
    volume = read_volume(table["source"].iloc[0])
    assert volume.shape == (12, 12, 12) and volume.meta["dtype"] == "uint8"
    with pytest.raises(ImageDecodeError, match="3-D volume .* this run takes 2-D images"):
        imaging.decode(table["source"].iloc[0])


def test_nifti_folder_is_read_as_volumes_unless_a_slice_is_chosen(tmp_path):
    make_nifti_folders(tmp_path / "v", per_class=2, size=8)
    assert load_samples(tmp_path / "v").attrs["dims"] == 3
    assert "dims" not in load_samples(tmp_path / "v", nifti_slice=3).attrs
    assert "dims" not in load_samples(tmp_path / "v", dims=2).attrs


def test_dicom_tree_with_dims_3_is_one_row_per_series(tmp_path):
    write_series(tmp_path / "tree" / "lesion" / "case1", _ct(1), patient="P1")
    write_series(tmp_path / "tree" / "lesion" / "case2", _ct(2), patient="P2")
    write_series(tmp_path / "tree" / "normal" / "case3", _ct(3), patient="P3")
    table = load_samples(tmp_path / "tree", dims=3)
    assert table.attrs["dims"] == 3
    assert sorted(table["label"]) == ["lesion", "lesion", "normal"]
    assert table["source"].str.startswith("dicomseries://").all()
    assert table["patient_id"].notna().all() and "P1" not in set(table["patient_id"])


def test_a_tree_of_ct_series_is_read_as_volumes_without_dims_and_radiographs_as_images(
    tmp_path,
):
    write_series(tmp_path / "tree" / "lesion" / "case1", _ct(1), patient="P1")
    write_series(tmp_path / "tree" / "normal" / "case2", _ct(2), patient="P2")
    table = load_samples(tmp_path / "tree")
    assert table.attrs["dims"] == 3 and len(table) == 2
    # radiographs: one image per series, no position in space; also many files of one
    # series that all sit at one position (copies of a slice) are images
    for label in ("lesion", "normal"):
        for i in range(4):
            write_dicom(tmp_path / "xr" / label / f"{i}.dcm", np.full((8, 8), i, np.int16))
            write_dicom(
                tmp_path / "same" / label / f"{i}.dcm",
                np.full((8, 8), i, np.int16),
                SeriesInstanceUID="1.2.3",
                ImagePositionPatient=[0.0, 0.0, 0.0],
            )
    for folder in ("xr", "same"):
        table = load_samples(tmp_path / folder)
        assert table.attrs.get("dims", 2) == 2 and len(table) == 8
    assert load_samples(tmp_path / "tree", dims=2).attrs.get("dims", 2) == 2


def test_check_reports_geometry_per_split_and_names_a_broken_series(tmp_path):
    write_series(tmp_path / "tree" / "a" / "ok", _ct(1), spacing=(1, 1, 2))
    write_series(tmp_path / "tree" / "a" / "ok2", _ct(2), spacing=(0.5, 0.5, 2))
    write_series(tmp_path / "tree" / "b" / "gap", _ct(3), skip=(5,))
    report = check_samples(load_samples(tmp_path / "tree", dims=3))
    assert report.n_readable == 2
    assert "missing slices" in report.unreadable[0]["reason"]
    shapes = report.volumes["per_split"]["unassigned"]
    assert shapes["shape"] == {"10x10x10": 2}
    assert report.volumes["mixed"] == ["spacing"]


def test_volume_preprocess_round_trips_through_preprocess_json(tmp_path):
    prep = VolumePreprocess.build((8, 8, 8), intensity="ct-lung", spacing=(2.0, 2.0, 2.0))
    assert [t["_target_"] for t in prep.transforms] == [
        "Orientationd",
        "Spacingd",
        "ScaleIntensityRanged",
        "ResizeWithPadOrCropd",
    ]
    prep.save(tmp_path / "preprocess.json")
    again = load_preprocess(tmp_path / "preprocess.json")
    assert again == prep and again.to_dict()["dims"] == 3
    assert isinstance(load_preprocess(Preprocess().to_dict()), Preprocess)
    volume = read_volume(str(write_nifti(tmp_path / "v.nii", blob_volume(0, 10), (1, 1, 1))))
    out = again(volume)
    assert out.shape == (1, 8, 8, 8) and out.dtype == np.float32
    np.testing.assert_array_equal(out, prep(volume))


def test_ct_window_clips_hounsfield_units(tmp_path):
    array = np.full((6, 6, 6), -1000.0, np.float32)
    array[3:] = 40.0
    volume = read_volume(str(write_nifti(tmp_path / "w.nii", array)))
    prepared = VolumePreprocess.build(6, intensity="ct-soft-tissue").prepare(volume)
    assert prepared.min() == 0.0 and prepared.max() == pytest.approx(0.5)


def test_volume_too_large_at_the_target_spacing_suggests_a_spacing(tmp_path):
    volume = read_volume(str(write_nifti(tmp_path / "big.nii", np.zeros((40, 40, 40)), (4, 4, 4))))
    prep = VolumePreprocess.build(16, spacing=(0.05, 0.05, 0.05))
    with pytest.raises(DataError, match=r"big.nii: 40x40x40 voxels .* coarser spacing such as"):
        prep.prepare(volume)


def test_unknown_intensity_and_transform_are_named():
    with pytest.raises(ConfigError, match="intensity='ct-liver' is not known"):
        VolumePreprocess.build(8, intensity="ct-liver")
    with pytest.raises(ConfigError, match="not one medsight applies"):
        VolumePreprocess(size=(8, 8, 8), transforms=({"_target_": "LoadImaged"},))


def test_volume_augmentation_keeps_shape_and_range():
    import torch

    augment = volume_augmentation("ct")
    torch.manual_seed(0)
    x = torch.rand(1, 12, 12, 12)
    y = augment(x.clone())
    assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert not torch.equal(x, y)
    assert volume_augmentation("none") is None


def test_thumbnail_shows_three_orthogonal_planes():
    tile = volume_thumbnail(np.random.default_rng(0).random((8, 10, 12)))
    assert tile.shape[0] == 12 and tile.shape[1] > 3 * 12


def test_real_nifti_and_dicom_files_read_with_their_geometry(shared_data):
    nifti = shared_data / "dicom-nifti" / "nifti"
    anatomical = read_volume(str(nifti / "anatomical.nii"))
    assert anatomical.shape == (33, 41, 25) and anatomical.spacing == (2.0, 2.0, 2.0)
    with pytest.warns(UserWarning, match="of 2 volumes; using the first"):
        assert read_volume(str(nifti / "example4d.nii.gz")).shape == (128, 96, 24)
    standard = read_volume(str(nifti / "standard.nii.gz"))
    assert standard.spacing == (1.0, 3.0, 2.0) and standard.orientation == "RAS"
    # pydicom's MR700 set: angiography projections, each slice its own orientation
    (series,) = find_dicom_series(shared_data / "dicom-nifti" / "dicom" / "series_MR700")
    with pytest.raises(ImageDecodeError, match="mixed orientations"):
        read_volume(series)


def test_nifti_in_hounsfield_units_gets_a_ct_window_and_mr_the_percentiles(tmp_path):
    body = blob_volume(1, 10, True)
    with_air = np.pad(body, 2, constant_values=-1024.0)  # air around the body
    ct = read_volume(str(write_nifti(tmp_path / "ct.nii.gz", with_air)))
    mr = read_volume(str(write_nifti(tmp_path / "mr.nii.gz", (body - body.min()) * 9)))
    assert intensity_for(ct) == "ct-soft-tissue"  # air at -1024: only CT has it
    assert intensity_for(mr) == "percentile"
