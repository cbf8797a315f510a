"""Readers: every layout becomes the same SampleTable; bad input gets one clear message."""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pandas as pd
import pytest

from medsight.data.imaging import decode
from medsight.data.sources import class_names, detect_format, load_samples
from medsight.errors import DataError


def _zip_folder(folder, archive, prefix=""):
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


# --------------------------------------------------------------------------- class folders


def test_class_folders_give_labels_from_folder_names(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "xr", {"normal": 3, "pneumonia": 2})
    table = load_samples(root)
    assert list(table.columns[:5]) == ["sample_id", "source", "label", "patient_id", "split"]
    assert table["label"].value_counts().to_dict() == {"normal": 3, "pneumonia": 2}
    assert table["split"].isna().all() and table["patient_id"].isna().all()
    assert "normal/normal_0.png" in set(table["sample_id"])
    assert class_names(table) == ["normal", "pneumonia"]
    assert table.attrs["format"] == "folder"


def test_split_folders_with_common_aliases_and_a_wrapper_folder(tmp_path, helpers):
    top = tmp_path / "download" / "chest_xray"
    helpers.make_class_folders(top / "TRAIN", {"a": 2, "b": 2}, seed=1)
    helpers.make_class_folders(top / "valid", {"a": 1, "b": 1}, seed=2)
    helpers.make_class_folders(top / "Testing", {"a": 1, "b": 2}, seed=3)
    table = load_samples(tmp_path / "download")
    assert table.groupby("split").size().to_dict() == {"test": 3, "train": 4, "val": 2}
    assert set(table["label"]) == {"a", "b"}
    assert table["sample_id"].str.startswith(("TRAIN/", "valid/", "Testing/")).all()


def test_zip_is_read_in_place_and_matches_the_folder(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "data", {"cat": 2, "dog": 3})
    (root / "README.txt").write_text("not an image")
    archive = _zip_folder(root, tmp_path / "data.zip", prefix="data-v1/")
    folder_table = load_samples(root)
    zip_table = load_samples(archive)
    assert zip_table.attrs["format"] == "zip"
    assert zip_table["sample_id"].tolist() == folder_table["sample_id"].tolist()
    assert zip_table["label"].tolist() == folder_table["label"].tolist()
    assert zip_table.attrs["ignored"] == {".txt": 1}
    first_zip, first_folder = zip_table.iloc[0], folder_table.iloc[0]
    assert first_zip["source"].startswith("zip://")
    np.testing.assert_array_equal(
        decode(first_zip["source"]).pixels, decode(first_folder["source"]).pixels
    )


def test_missing_path_empty_folder_and_no_images_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_samples(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no recognised images"):
        load_samples(tmp_path / "empty")
    (tmp_path / "docs" / "a").mkdir(parents=True)
    (tmp_path / "docs" / "a" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"no recognised images \(1 files\)"):
        load_samples(tmp_path / "docs")


def test_unknown_file_type_and_unknown_format_are_refused(tmp_path):
    odd = tmp_path / "scan.xyz"
    odd.write_text("?")
    with pytest.raises(DataError, match="cannot tell what kind of dataset"):
        load_samples(odd)
    with pytest.raises(DataError, match="unknown format 'parquet'"):
        load_samples(tmp_path, format="parquet")


# --------------------------------------------------------------------------- CSV manifest


def _manifest(tmp_path, text, helpers, images=("img/a.png", "img/b.png", "img/c.png")):
    for i, rel in enumerate(images):
        helpers.write_png(tmp_path / rel, helpers.random_image(i))
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_manifest_paths_are_relative_to_the_csv_and_extra_columns_kept(tmp_path, helpers):
    csv = _manifest(
        tmp_path,
        "path,label,patient_id,split,sex,age\n"
        "img/a.png,normal,P1,train,F,34\n"
        "img/b.png,pneumonia,P2,Validation,M,61\n"
        "img/c.png,normal,P3,,F,47\n",
        helpers,
    )
    table = load_samples(csv)
    assert table["source"].tolist()[0] == str((tmp_path / "img" / "a.png").resolve())
    assert table["split"].tolist() == ["train", "val", None]
    assert table["patient_id"].tolist() == ["P1", "P2", "P3"]
    assert table["age"].tolist() == [34, 61, 47]
    assert table["sex"].tolist() == ["F", "M", "F"]


def test_folder_with_manifest_csv_uses_the_manifest(tmp_path, helpers):
    _manifest(tmp_path, "", helpers)
    (tmp_path / "manifest.csv").write_text("path,label\nimg/a.png,x\nimg/b.png,y\n")
    assert detect_format(tmp_path) == "csv"
    assert len(load_samples(tmp_path)) == 2


def test_manifest_without_path_or_label_column_names_the_columns(tmp_path, helpers):
    csv = _manifest(tmp_path, "file,diagnosis\nimg/a.png,normal\n", helpers)
    with pytest.raises(DataError, match=r"no path column 'path' \(columns are: file, diagnosis\)"):
        load_samples(csv)
    table = load_samples(csv, path_column="file", label_column="diagnosis")
    assert table["label"].tolist() == ["normal"]
    with pytest.raises(DataError, match="--patient-column 'pid' is not a column"):
        load_samples(csv, path_column="file", label_column="diagnosis", patient_column="pid")


def test_manifest_path_escaping_its_folder_is_refused_unless_allowed(tmp_path, helpers):
    outside = helpers.write_png(tmp_path / "elsewhere.png", helpers.random_image(9))
    inner = tmp_path / "project"
    inner.mkdir()
    csv = inner / "m.csv"
    csv.write_text(f"path,label\n../elsewhere.png,x\n{outside},y\n")
    with pytest.raises(DataError) as err:
        load_samples(csv)
    assert "line 2" in str(err.value) and "outside" in str(err.value)
    assert "2 such row(s)" in str(err.value) and "--allow-outside" in str(err.value)
    assert len(load_samples(csv, allow_outside=True)) == 2


def test_manifest_mask_escaping_its_folder_is_refused_unless_allowed(tmp_path, helpers):
    inner = tmp_path / "project"
    helpers.write_png(inner / "a.png", helpers.random_image(1))
    helpers.write_png(inner / "b.png", helpers.random_image(2))
    csv = inner / "m.csv"
    csv.write_text("path,label,mask\na.png,x,masks/a.png\nb.png,y,../../etc/passwd\n")
    with pytest.raises(DataError) as err:
        load_samples(csv)
    assert str(err.value) == (
        f"{csv}: line 3: mask '../../etc/passwd' points outside the manifest's folder "
        f"{inner.resolve()} (1 such row(s)); move the files under it or pass --allow-outside"
    )
    table = load_samples(csv, allow_outside=True)
    assert table["mask"].tolist()[0] == str(inner.resolve() / "masks" / "a.png")


@pytest.mark.parametrize("spellings", [("1", "1.0"), ("01", "1"), ("1", "1.0", "01")])
def test_manifest_label_written_as_one_number_several_ways_is_refused(tmp_path, helpers, spellings):
    rows = "".join(f"img/{i}.png,{label}\n" for i, label in enumerate(spellings + ("0",)))
    for i in range(len(spellings) + 1):
        helpers.write_png(tmp_path / "img" / f"{i}.png", helpers.random_image(i))
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\n" + rows)
    with pytest.raises(DataError) as err:
        load_samples(csv)
    shown = ", ".join(repr(s) for s in sorted(spellings))
    assert str(err.value) == (
        f"{csv}: label column 'label' writes the same class in several ways ({shown}), "
        "which would make separate classes; write each class one way"
    )


def test_numeric_labels_written_one_way_each_are_kept(tmp_path, helpers):
    for i in range(3):
        helpers.write_png(tmp_path / "img" / f"{i}.png", helpers.random_image(i))
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\nimg/0.png,1.0\nimg/1.png,0.0\nimg/2.png,1.0\n")
    assert class_names(load_samples(csv)) == ["0.0", "1.0"]


def test_class_folders_named_as_one_number_two_ways_are_refused(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "d", {"1": 1, "01": 1, "2": 1})
    with pytest.raises(DataError, match=r"column 'label' writes the same class in several ways"):
        load_samples(root)


def test_manifest_with_unknown_split_value_is_refused(tmp_path, helpers):
    csv = _manifest(tmp_path, "path,label,split\nimg/a.png,x,holdout\n", helpers)
    with pytest.raises(DataError, match=r"unknown split value\(s\) \['holdout'\]"):
        load_samples(csv)


def test_manifest_repeated_sample_is_refused(tmp_path, helpers):
    csv = _manifest(tmp_path, "path,label\nimg/a.png,x\nimg/a.png,y\n", helpers)
    with pytest.raises(DataError, match="sample_id must be unique; repeated: img/a.png"):
        load_samples(csv)


# --------------------------------------------------------------------------- MedMNIST


def _npz(path, labels_shape=(1,), splits=("train", "val", "test"), n=6):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in splits:
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, *labels_shape), dtype=np.uint8)
    np.savez(path, **arrays)
    return path


def test_medmnist_npz_keeps_the_official_splits(tmp_path):
    path = _npz(tmp_path / "pneumoniamnist.npz")
    table = load_samples(path)
    assert table.groupby("split").size().to_dict() == {"test": 6, "train": 6, "val": 6}
    assert set(table["label"]) <= {"normal", "pneumonia"}
    image = decode(table["source"].iloc[0])
    assert image.pixels.shape == (1, 28, 28)
    with np.load(path) as raw:
        np.testing.assert_allclose(image.pixels[0], raw["train_images"][0] / 255.0, atol=1e-7)


def test_foreign_npz_is_refused(tmp_path):
    # (multi-hot npz are read as findings: tests/data/test_multilabel_data.py)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="not a MedMNIST file: expected arrays train_images"):
        load_samples(tmp_path / "other.npz")


def test_unknown_medmnist_set_gets_numeric_class_names(tmp_path):
    table = load_samples(_npz(tmp_path / "mystery.npz"))
    assert set(table["label"]) <= {"0", "1"}


def test_real_pneumoniamnist_split_counts(shared_data):
    table = load_samples(shared_data / "pneumoniamnist" / "pneumoniamnist.npz")
    counts = table.groupby(["split", "label"]).size().to_dict()
    assert counts == {
        ("train", "normal"): 388,
        ("train", "pneumonia"): 3494,
        ("val", "normal"): 135,
        ("val", "pneumonia"): 389,
        ("test", "normal"): 234,
        ("test", "pneumonia"): 390,
    }


def test_real_medical_mnist_zip_is_read_in_place(shared_data):
    table = load_samples(shared_data / "medical-mnist" / "medical_mnist.zip")
    assert len(table) == 58_954
    counts = table["label"].value_counts().to_dict()
    assert counts["BreastMRI"] == 8_954 and counts["Hand"] == 10_000 and len(counts) == 6
    assert decode(table["source"].iloc[0]).pixels.shape == (1, 64, 64)


# --------------------------------------------------------------------------- DICOM and NIfTI


def test_dicom_class_folders_store_only_pseudonymised_patient_ids(tmp_path, helpers):
    pixels = np.arange(16).reshape(4, 4)
    helpers.write_dicom(tmp_path / "d" / "normal" / "1.dcm", pixels, PatientID="MRN-777")
    helpers.write_dicom(tmp_path / "d" / "normal" / "2.dcm", pixels + 1, PatientID="MRN-777")
    helpers.write_dicom(
        tmp_path / "d" / "nodule" / "3.dcm",
        pixels + 2,
        PatientID="MRN-888",
        PatientSex="F",
        PatientAge="095Y",
    )
    table = load_samples(tmp_path / "d")
    dump = table.to_csv()
    assert "MRN-777" not in dump and "MRN-888" not in dump and "Doe" not in dump
    ids = table.set_index("sample_id")["patient_id"]
    assert ids["normal/1.dcm"] == ids["normal/2.dcm"] != ids["nodule/3.dcm"]
    assert ids["normal/1.dcm"].startswith("p-")
    nodule = table.set_index("sample_id").loc["nodule/3.dcm"]
    assert nodule["sex"] == "F" and nodule["age"] == 90.0  # ages over 89 are capped
    assert nodule["modality"] == "CT"


def test_pseudonyms_depend_on_the_salt(tmp_path, helpers, monkeypatch):
    helpers.write_dicom(tmp_path / "one.dcm", np.zeros((2, 2)), PatientID="MRN-1")
    first = load_samples(tmp_path / "one.dcm")["patient_id"].iloc[0]
    monkeypatch.setenv("MEDSIGHT_SALT", "another-site")
    second = load_samples(tmp_path / "one.dcm")["patient_id"].iloc[0]
    assert first != second


def test_single_dicom_file_is_an_unlabelled_sample(tmp_path, helpers):
    path = helpers.write_dicom(tmp_path / "scan.dcm", np.zeros((2, 2)))
    table = load_samples(path)
    assert table.attrs["format"] == "dicom"
    assert len(table) == 1 and table["label"].isna().all()


def test_nifti_folder_with_a_chosen_slice(tmp_path):
    nib = pytest.importorskip("nibabel")
    for label in ("healthy", "tumour"):
        volume = np.random.default_rng(0).random((6, 6, 5)).astype(np.float32)
        (tmp_path / "v" / label).mkdir(parents=True)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v" / label / "case.nii.gz")
    table = load_samples(tmp_path / "v", nifti_slice=4)
    assert table["source"].str.startswith("nifti://").all()
    assert table["source"].str.endswith("!2:4").all()
    assert decode(table["source"].iloc[0]).meta["slice"] == [2, 4]


def test_real_dicom_folder(shared_data, tmp_path):
    folder = tmp_path / "dicom"
    shutil.copytree(shared_data / "dicom-nifti" / "dicom", folder)
    table = load_samples(folder)
    assert len(table) == 18 and table["label"].isna().all()
    series = table[table["sample_id"].str.startswith("series_MR700/")]
    assert series["patient_id"].nunique() == 1 and len(series) == 7
    assert isinstance(table, pd.DataFrame)
