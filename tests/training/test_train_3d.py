"""3-D runs end to end on tiny generated volumes: train from a MedMNIST3D-like npz, a NIfTI
folder and a DICOM series tree; evaluate with the report's orthogonal thumbnails; predict a
NIfTI file; reload and predict the same; export to ONNX with parity; bad pairings refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.conftest import make_class_folders
from tests.serving.conftest import local_client
from tests.volumes import blob_volume, make_nifti_folders, make_npz3d, write_nifti, write_series
from typer.testing import CliRunner

from medsight.cli import app
from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from medsight.data.imaging import nifti_slice_source, npz_images
from medsight.data.volumes import VolumePreprocess, find_dicom_series
from medsight.errors import ConfigError, DataError, ImageDecodeError
from medsight.evaluation.compare import compare_runs
from medsight.evaluation.evaluate import evaluate_run
from medsight.evaluation.report import write_report
from medsight.export import export_run
from medsight.inference import Predictor, predict_paths
from medsight.runs import Run
from medsight.serving.api import ServeSettings, create_app
from medsight.training.trainer import train
from medsight.workflows.batch import read_scored, score_archive


def _config(data, out, model="auto", **options):
    optim = {"epochs": 3, "batch_size": 8, "lr": 3e-3, "patience": 10}
    optim.update({k: v for k, v in options.items() if k in OptimConfig.model_fields})
    data_options = {k: v for k, v in options.items() if k in DataConfig.model_fields}
    return TrainConfig(
        data=DataConfig(path=str(data), ratios=(0.5, 0.25, 0.25), **data_options),
        model=ModelConfig(name=model),
        optim=OptimConfig(**optim),
        out=str(out),
    )


@pytest.fixture(scope="module")
def npz_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vol")
    npz = make_npz3d(root / "tiny3d.npz", {"train": 32, "val": 8, "test": 12}, size=16)
    return train(_config(npz, root / "run", epochs=4), show_progress=False), npz


def test_npz_volumes_train_a_3d_run_that_records_its_dims(npz_run):
    run, _ = npz_run
    model = json.loads((run.path / "model.json").read_text())
    assert model["dims"] == 3 and model["name"] == "medcnn3d_s"
    assert model["image_size"] == [16, 16, 16]
    assert isinstance(run.preprocess, VolumePreprocess) and run.dims == 3
    saved = json.loads((run.path / "preprocess.json").read_text())
    assert saved["dims"] == 3 and saved["intensity"] == "uint8"
    assert [t["_target_"] for t in saved["transforms"]][0] == "Orientationd"
    history = run.history()
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert run.load_model()(np_batch(run)).shape == (2, 2)


def np_batch(run):
    import torch

    return torch.zeros(2, 1, *run.preprocess.size)


def test_3d_run_evaluates_and_reports_orthogonal_thumbnails(npz_run):
    run, _ = npz_run
    metrics = evaluate_run(run.path, n_bootstrap=50)
    assert metrics["n"] == 12
    assert 0.0 <= metrics["auroc"]["value"] <= 1.0
    assert len(metrics["auroc"]["ci"]) == 2
    html = write_report(run.path).read_text()
    assert "three orthogonal slices" in html and "gallery volumes" in html
    assert "16 × 16 × 16 voxels" in html


def test_nifti_prediction_round_trips_and_exports_to_onnx(npz_run, tmp_path):
    run, npz = npz_run
    volumes = npz_images(npz, "test")[:3].astype(np.float32)
    files = [write_nifti(tmp_path / f"v{i}.nii.gz", v) for i, v in enumerate(volumes)]
    first = predict_paths(run.path, files)
    assert (first["error"] == "").all()
    again = Predictor.from_run(Run.load(run.path).path).predict_files(files)
    np.testing.assert_allclose(again[:, 1], first["p_1"].to_numpy(), atol=1e-6)
    # the npz entries themselves predict the same as the NIfTI files written from them
    table = Run.load(run.path).load_data()
    from_npz = Predictor.from_run(run.path).predict_table(table[table["split"] == "test"].head(3))
    np.testing.assert_allclose(from_npz, again, atol=1e-5)
    result = export_run(run.path, format="onnx")
    assert result["max_abs_diff_prob"] < 1e-4
    onnx = Predictor.from_run(run.path, backend="onnx").predict_files(files)
    np.testing.assert_allclose(onnx, again, atol=1e-4)


def test_3d_run_refuses_a_2d_image_in_one_line(npz_run, tmp_path):
    run, _ = npz_run
    png = make_class_folders(tmp_path / "png", {"a": 1}) / "a" / "a_0.png"
    with pytest.raises(ImageDecodeError, match="is a 2-D image, but this run takes 3-D volumes"):
        Predictor.from_run(run.path).predict_files([png])
    with pytest.raises(ImageDecodeError, match="is a 2-D image"):
        Predictor.from_run(run.path).predict_bytes(png.read_bytes())


def test_nifti_upload_bytes_predict_like_the_file(npz_run, tmp_path):
    run, npz = npz_run
    path = write_nifti(tmp_path / "u.nii.gz", npz_images(npz, "test")[0].astype(np.float32))
    predictor = Predictor.from_run(run.path)
    np.testing.assert_allclose(
        predictor.predict_bytes(path.read_bytes()), predictor.predict_files([path])[0], atol=1e-6
    )


def test_2d_network_on_volumes_and_3d_network_on_images_are_refused(tmp_path):
    npz = make_npz3d(tmp_path / "v3d.npz", {"train": 8, "val": 4, "test": 4}, size=12)
    with pytest.raises(ConfigError, match="medcnn_s is a 2-D network but the data are volumes"):
        train(_config(npz, tmp_path / "a", model="medcnn_s"), show_progress=False)
    images = make_class_folders(tmp_path / "img", {"a": 12, "b": 12})
    with pytest.raises(ConfigError, match="medcnn3d_s is a 3-D network but the data are 2-D"):
        train(_config(images, tmp_path / "b", model="medcnn3d_s"), show_progress=False)


def test_nifti_folder_trains_with_a_ct_window(tmp_path):
    data = make_nifti_folders(tmp_path / "nii", per_class=6, size=12)
    run = train(_config(data, tmp_path / "run", epochs=1, batch_size=4, intensity="ct-soft-tissue"))
    assert run.preprocess.intensity == "ct-soft-tissue" and run.preprocess.size == (12, 12, 12)
    assert set(run.classes) == {"lesion", "normal"}


def test_dicom_series_tree_trains_one_sample_per_series(tmp_path):
    for label in ("lesion", "normal"):
        for i in range(4):
            volume = blob_volume(i + (50 if label == "lesion" else 0), 10, label == "lesion")
            write_series(
                tmp_path / "tree" / label / f"case{i}",
                (volume + 1024).astype(np.int16),
                patient=f"{label}{i}",
                tilt=0.5 if i < 3 else 0.0,  # most series of each class scanned with a tilt
            )
    with pytest.raises(ImageDecodeError, match="gantry tilt"):
        train(_config(tmp_path / "tree", tmp_path / "no", epochs=1, batch_size=4))
    run = train(
        _config(tmp_path / "tree", tmp_path / "run", epochs=1, batch_size=4, tilt="correct")
    )
    assert run.preprocess.intensity == "ct-soft-tissue"  # CT series: a soft-tissue window
    assert run.preprocess.tilt == "correct" and run.dims == 3  # a CT tree: volumes by default
    assert len(run.splits()) == 8
    tilted = find_dicom_series(tmp_path / "tree" / "lesion" / "case0")  # predicted: corrected
    table = predict_paths(run.path, tilted)
    assert table.at[0, "error"] == "" and np.isfinite(table.at[0, "p_lesion"])


def test_slices_feed_a_2d_network_and_predict_from_volumes(npz_run, tmp_path):
    _, npz = npz_run
    run = train(_config(npz, tmp_path / "run", model="medcnn_lite", epochs=1, slices=3))
    assert run.dims == 2 and run.preprocess.slices == 3 and run.preprocess.size == (16, 16)
    assert run.load_model().in_chans == 3
    path = write_nifti(tmp_path / "v.nii.gz", npz_images(npz, "test")[0].astype(np.float32))
    assert Predictor.from_run(run.path).predict_files([path]).shape == (1, 2)
    assert export_run(run.path, format="onnx")["max_abs_diff_prob"] < 1e-4
    with pytest.raises(ConfigError, match="--slices 3 feeds slices to a 2-D network"):
        train(_config(npz, tmp_path / "b", model="medcnn3d_s", slices=3), show_progress=False)


def test_a_2d_run_refuses_a_volume_unless_it_learnt_from_slices(tmp_path):
    volume = write_nifti(tmp_path / "v.nii.gz", blob_volume(1, 16, True))
    images = make_class_folders(tmp_path / "img", {"a": 12, "b": 12})
    run = train(_config(images, tmp_path / "png", model="medcnn_lite", epochs=1))
    assert run.preprocess.volume_slice is None
    error = predict_paths(run.path, [volume]).at[0, "error"]
    assert "is a 3-D volume (16×16×16 voxels), but this run was trained on 2-D images" in error
    client = local_client(create_app(ServeSettings(run=run.path, data_dir=tmp_path / "serve")))
    response = client.post("/v1/predict", files={"file": ("v", volume.read_bytes(), "x")})
    assert response.status_code == 400 and "is a 3-D volume" in response.json()["detail"]

    # a run that learnt from slice 5 of each volume takes slice 5 of a volume it is given
    nii = make_nifti_folders(tmp_path / "nii", per_class=6, size=16)
    sliced = train(
        _config(nii, tmp_path / "sl", model="medcnn_lite", epochs=1, batch_size=4, nifti_slice=5)
    )
    assert sliced.preprocess.volume_slice == (2, 5)
    predictor = Predictor.from_run(sliced.path)
    whole = predictor.predict_files([volume])
    np.testing.assert_allclose(
        whole, predictor.predict_files([nifti_slice_source(volume, 2, 5)]), atol=1e-6
    )
    assert not np.allclose(whole, predictor.predict_files([nifti_slice_source(volume, 2, 8)]))


def test_a_folder_of_volumes_and_a_dicom_tree_are_scored_one_row_per_volume(npz_run, tmp_path):
    run, _ = npz_run
    scans = tmp_path / "scans"
    write_nifti(scans / "a.nii.gz", blob_volume(1, 16, True))
    write_nifti(scans / "sub" / "b.nii", blob_volume(2, 16))
    write_series(scans / "ct" / "case1", (blob_volume(3, 10, True) + 1024).astype(np.int16))
    (scans / "notes.txt").write_text("not a volume")
    out = tmp_path / "preds.parquet"
    summary = score_archive(run.path, scans, out, backend="torch")
    assert summary["scored"] == 3 and summary["errors"] == 0
    table = read_scored(out).sort_values("file").reset_index(drop=True)
    assert table["file"].str.startswith("dicomseries://").sum() == 1
    columns = [c for c in table.columns if c.startswith("p_")]
    expected = predict_paths(run.path, list(table["file"]))
    np.testing.assert_allclose(table[columns], expected[columns], atol=1e-5)
    # a series folder given to predict is predicted like a file, without --out
    result = CliRunner().invoke(app, ["predict", str(run.path), str(scans / "ct")])
    assert result.exit_code == 0, result.output
    assert "1 file(s)" in result.output and "dicomseries://" not in result.output  # short name
    with pytest.raises(DataError, match="unzip it first"):
        score_archive(run.path, _zip(scans, tmp_path / "scans.zip"), tmp_path / "z.parquet")


def _zip(folder, path):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for file in folder.rglob("*.nii*"):
            archive.write(file, file.name)
    return path


def test_two_3d_runs_with_digit_class_names_compare_on_their_test_volumes(npz_run, tmp_path):
    run, npz = npz_run
    other = train(_config(npz, tmp_path / "other", epochs=1), show_progress=False)
    for each in (run, other):
        evaluate_run(each.path, n_bootstrap=50)
    assert run.classes == ["0", "1"]  # read back from predictions.csv as text, not numbers
    result = compare_runs([run.path, other.path], n_bootstrap=50)
    assert result["n_shared"] == 12 and "p_value" in result["runs"][1]["paired"]
