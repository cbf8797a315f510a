"""A 3-D run exported as a MONAI Bundle runs in MONAI's own bundle machinery
(``monai.bundle.ConfigWorkflow`` reading ``configs/inference.json``, and the shell runner
``python -m monai.bundle run``) and gives medsight's probabilities; its metadata passes MONAI's
``verify_metadata``; 2-D, 2.5-D and untraceable runs are refused in one line."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from medsight.data.imaging import npz_images
from medsight.export import ExportError, export_bundle
from medsight.inference import Predictor
from medsight.training.trainer import train
from tests.volumes import make_npz3d, write_nifti


def _config(data, out, model="auto", **data_options):
    return TrainConfig(
        data=DataConfig(path=str(data), ratios=(0.5, 0.25, 0.25), **data_options),
        model=ModelConfig(name=model),
        optim=OptimConfig(epochs=1, batch_size=8, lr=3e-3, patience=10),
        out=str(out),
    )


@pytest.fixture(scope="module")
def npz3d(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    return make_npz3d(root / "tiny3d.npz", {"train": 12, "val": 4, "test": 4}, size=16)


@pytest.fixture(scope="module")
def run3d(npz3d, tmp_path_factory):
    torch.set_num_threads(1)
    return train(_config(npz3d, tmp_path_factory.mktemp("run") / "run"), show_progress=False)


def _run_bundle(bundle, files, out):
    """The bundle run as a MONAI user runs it: ConfigWorkflow over configs/inference.json."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        workflow_type="infer",
        logging_file=False,
        bundle_root=str(bundle),
        datalist=[str(f) for f in files],
        output_dir=str(out),
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    with (out / "predictions.csv").open() as f:
        rows = {row[0]: [float(v) for v in row[1:]] for row in csv.reader(f)}
    return np.array([rows[str(f)] for f in files])


def test_bundle_runs_in_monai_and_predicts_like_medsight(run3d, npz3d, tmp_path):
    volumes = npz_images(npz3d, "test")[:3].astype(np.float32)
    files = [write_nifti(tmp_path / "in" / f"v{i}.nii.gz", v) for i, v in enumerate(volumes)]
    result = export_bundle(run3d.path, tmp_path / "bundle")
    bundle = tmp_path / "bundle"
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.ts"):
        assert (bundle / name).is_file()
    assert result["max_abs_diff_prob"] < 1e-4
    got = _run_bundle(bundle, files, tmp_path / "eval")
    expected = Predictor.from_run(run3d.path).predict_files(files)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)  # softmax over the classes

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == 1 and image["spatial_shape"] == [16, 16, 16]
    assert pred["channel_def"] == {"0": run3d.classes[0], "1": run3d.classes[1]}
    for key in ("version", "monai_version", "pytorch_version", "task", "description", "authors"):
        assert meta[key]
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    steps = [t["_target_"] for t in config["preprocessing"]["transforms"]]
    assert steps[:2] == ["LoadImaged", "EnsureChannelFirstd"]
    assert steps[2 : 2 + len(run3d.preprocess.transforms)] == [
        t["_target_"] for t in run3d.preprocess.transforms
    ]
    readme = (bundle / "docs" / "README.md").read_text()
    assert "## Intended use" in readme and "not for diagnos" in readme.lower()
    assert "## Limitations" in readme


def test_monai_checks_the_networks_input_and_output_shapes(run3d, tmp_path):
    from monai.bundle import verify_net_in_out

    export_bundle(run3d.path, tmp_path / "bundle")
    bundle = tmp_path / "bundle"
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        bundle_root=str(bundle),
        device="cpu",
        n=1,
    )


def test_resampled_ct_run_bundle_reads_nifti_geometry_as_medsight_does(tmp_path):
    from tests.volumes import blob_volume

    torch.set_num_threads(1)
    for label in ("normal", "lesion"):
        for i in range(4):
            volume = blob_volume(i + (50 if label == "lesion" else 0), 12, label == "lesion")
            spacing = (0.9, 1.1, 2.0) if i % 2 else (1.2, 1.2, 1.5)  # resampled differently
            write_nifti(tmp_path / "nii" / label / f"c{i}.nii.gz", volume, spacing=spacing)
    config = _config(tmp_path / "nii", tmp_path / "run", spacing=(1.5, 1.5, 1.5))
    config.data.intensity = "ct-soft-tissue"
    config.optim.batch_size = 4
    run = train(config, show_progress=False)
    steps = [t["_target_"] for t in run.preprocess.transforms]
    assert steps == ["Orientationd", "Spacingd", "ScaleIntensityRanged", "ResizeWithPadOrCropd"]
    export_bundle(run.path, tmp_path / "bundle")
    files = [tmp_path / "nii" / "lesion" / "c1.nii.gz", tmp_path / "nii" / "normal" / "c2.nii.gz"]
    got = _run_bundle(tmp_path / "bundle", files, tmp_path / "eval")
    np.testing.assert_allclose(got, Predictor.from_run(run.path).predict_files(files), atol=1e-4)


def test_multilabel_bundle_applies_a_sigmoid_per_finding(tmp_path):
    from tests.volumes import blob_volume

    torch.set_num_threads(1)
    rows = ["path,Finding Labels,patient_id"]
    for i in range(16):
        findings = [[], ["a"], ["b"], ["a", "b"]][i % 4]
        write_nifti(tmp_path / "ml" / f"v{i}.nii.gz", blob_volume(i, 12, bool(findings)))
        rows.append(f"v{i}.nii.gz,{'|'.join(findings) or 'No Finding'},p{i}")
    (tmp_path / "ml" / "manifest.csv").write_text("\n".join(rows) + "\n")
    config = _config(tmp_path / "ml" / "manifest.csv", tmp_path / "run")
    config.optim.batch_size = 4
    config.task = "multilabel"
    run = train(config, show_progress=False)
    assert run.task == "multilabel" and run.dims == 3
    export_bundle(run.path, tmp_path / "bundle")
    config = json.loads((tmp_path / "bundle" / "configs" / "inference.json").read_text())
    assert config["postprocessing"]["transforms"][-1]["sigmoid"] is True
    files = [tmp_path / "ml" / f"v{i}.nii.gz" for i in (0, 1, 3)]
    got = _run_bundle(tmp_path / "bundle", files, tmp_path / "eval")
    expected = Predictor.from_run(run.path).predict_files(files)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_a_calibrated_runs_temperature_goes_into_the_bundle(run3d, tmp_path, npz3d):
    import shutil

    from medsight.runs import CALIBRATION

    calibrated = tmp_path / "calibrated"
    shutil.copytree(run3d.path, calibrated)
    (calibrated / CALIBRATION).write_text('{"method": "temperature", "temperature": 3.0}')
    volumes = npz_images(npz3d, "test")[:2].astype(np.float32)
    files = [write_nifti(tmp_path / f"c{i}.nii.gz", v) for i, v in enumerate(volumes)]
    export_bundle(calibrated, tmp_path / "bundle")
    got = _run_bundle(tmp_path / "bundle", files, tmp_path / "eval")
    expected = Predictor.from_run(calibrated).predict_files(files)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    uncalibrated = Predictor.from_run(run3d.path).predict_files(files)
    assert np.abs(uncalibrated - expected).max() > 1e-3  # the temperature did change them
    assert "calibrated by temperature scaling" in (tmp_path / "bundle/docs/README.md").read_text()


def test_2d_run_is_refused_in_one_line(tmp_path):
    from tests.conftest import make_class_folders

    torch.set_num_threads(1)
    images = make_class_folders(tmp_path / "img", {"a": 8, "b": 8})
    run = train(_config(images, tmp_path / "run", model="medcnn_lite"), show_progress=False)
    with pytest.raises(ExportError, match="MONAI Bundles here are for volume .* --format onnx"):
        export_bundle(run.path, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_2_5d_run_is_refused_in_one_line(npz3d, tmp_path):
    torch.set_num_threads(1)
    run = train(_config(npz3d, tmp_path / "run", model="medcnn_lite", slices=3))
    with pytest.raises(ExportError, match=r"2.5-D run \(--slices 3.*--format onnx"):
        export_bundle(run.path, tmp_path / "bundle")


def test_untraceable_layer_is_named(run3d, tmp_path, monkeypatch):
    from medsight.runs import Run

    original = Run.load_model

    def broken(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        name, module = next(
            (n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv3d)
        )
        forward = module.forward

        def untraceable(x):
            if torch.jit.is_tracing():
                raise RuntimeError("Tracer cannot infer type of output")
            return forward(x)

        module.forward = untraceable
        return model

    monkeypatch.setattr(Run, "load_model", broken)
    with pytest.raises(ExportError, match=r"in layer .*\(Conv3d\)"):
        export_bundle(run3d.path, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_cli_writes_the_bundle_with_the_model_cards_words(run3d, tmp_path):
    from typer.testing import CliRunner

    from medsight.cli import app
    from medsight.evaluation.modelcard import NOT_FOR_DIAGNOSIS

    runner = CliRunner()
    out = tmp_path / "bundle"
    args = ["export", str(run3d.path), "--format", "monai-bundle", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"wrote the MONAI Bundle {out}/" in result.output
    assert NOT_FOR_DIAGNOSIS[1:] in (out / "docs" / "README.md").read_text()
    again = runner.invoke(app, args)  # a previous bundle is replaced
    assert again.exit_code == 0, again.output
    missing = runner.invoke(app, args[:4])
    assert missing.exit_code == 2 and "give it with --out DIR" in missing.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    refused = runner.invoke(app, [*args[:4], "--out", str(tmp_path / "other")])
    assert refused.exit_code == 2 and "not a MONAI Bundle" in refused.output
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep"


def test_export_run_points_a_bundle_to_export_bundle(run3d):
    from medsight.errors import ConfigError
    from medsight.export import export_run

    with pytest.raises(ConfigError, match=r"export_bundle\(run, out\).*--format monai-bundle"):
        export_run(run3d.path if hasattr(run3d, "path") else run3d, format="monai-bundle")


def test_monais_shell_runner_runs_the_bundle_over_a_folder(run3d, npz3d, tmp_path):
    pytest.importorskip("fire")  # python -m monai.bundle needs it
    volumes = npz_images(npz3d, "test")[:2].astype(np.float32)
    files = [write_nifti(tmp_path / "scans" / f"v{i}.nii.gz", v) for i, v in enumerate(volumes)]
    bundle = tmp_path / "bundle"
    export_bundle(run3d.path, bundle)
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
    command += [str(bundle / "configs" / "inference.json"), "--meta_file"]
    command += [str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle)]
    command += ["--input_dir", str(tmp_path / "scans"), "--output_dir", str(tmp_path / "eval")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "eval" / "predictions.csv", newline="") as f:
        rows = {row[0]: [float(v) for v in row[1:]] for row in csv.reader(f)}
    got = np.array([rows[str(f)] for f in files])
    expected = Predictor.from_run(run3d.path).predict_files(files)
    np.testing.assert_allclose(got, expected, atol=1e-4)


#: The metadata.json keys and tensor-format keys the MONAI Bundle specification
#: (docs/source/mb_specification.rst) calls mandatory, as a JSON schema. MONAI's own
#: verify_metadata checks against it: the schema a bundle names is a download, and tests
#: run offline.
SPECIFICATION = {
    "type": "object",
    "required": [
        "version",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "optional_packages_version",
        "task",
        "description",
        "authors",
        "copyright",
        "network_data_format",
    ],
    "properties": {
        "optional_packages_version": {"type": "object"},
        "network_data_format": {
            "type": "object",
            "required": ["inputs", "outputs"],
            "properties": {
                part: {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": {
                        "type": "object",
                        "required": [
                            "type",
                            "format",
                            "num_channels",
                            "spatial_shape",
                            "dtype",
                            "value_range",
                            "is_patch_data",
                            "channel_def",
                        ],
                    },
                }
                for part in ("inputs", "outputs")
            },
        },
    },
}


def test_monai_verifies_the_metadata_against_the_specifications_mandatory_keys(run3d, tmp_path):
    from monai.bundle import verify_metadata

    export_bundle(run3d.path, tmp_path / "bundle")
    meta_file = tmp_path / "bundle" / "configs" / "metadata.json"
    schema = tmp_path / "schema.json"  # present, so verify_metadata reads it and fetches nothing
    schema.write_text(json.dumps(SPECIFICATION))
    verify_metadata(meta_file=str(meta_file), filepath=str(schema))
    broken = json.loads(meta_file.read_text())
    del broken["network_data_format"]["outputs"]["pred"]["is_patch_data"]
    meta_file.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="is_patch_data"):
        verify_metadata(meta_file=str(meta_file), filepath=str(schema))
