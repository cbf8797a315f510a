"""The Predictor: a run directory alone predicts as training did, on torch or ONNX Runtime, with
its calibration and test-time augmentation; predict_paths reports unreadable files per row."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medsight import runs
from medsight.cli import app
from medsight.data.imaging import decode
from medsight.data.transforms import Preprocess
from medsight.errors import ConfigError
from medsight.export import export_run
from medsight.inference import Predictor, check_tta, predict_paths, tta_views
from medsight.models import create_model
from medsight.runs import Run
from tests.conftest import make_two_class_manifest, train_tiny_run, write_run

needs_onnxruntime = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed"
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-epoch medcnn_s with differential attention, and six of its images."""
    return train_tiny_run(tmp_path_factory.mktemp("inference"), attention="diff")


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- save → load


def test_a_saved_run_predicts_what_the_model_computed_before_saving(tmp_path):
    data = make_two_class_manifest(tmp_path / "data", 4, 2, 16)
    torch.manual_seed(0)
    model = create_model("medcnn_s", 2, in_chans=1, attention="se")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(3):  # moves the weights and the batch-norm statistics off their initial values
        x = torch.rand(8, 1, 16, 16)
        loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 2, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    run_dir = write_run(tmp_path / "run", data, attention="se", model=model)

    predictor = Predictor.from_run(run_dir)
    files = sorted((data / "img").glob("*.png"))
    batch = np.stack([Preprocess(size=(16, 16))(decode(str(f))) for f in files])
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(predictor.logits_array(batch), expected, atol=1e-6)
    np.testing.assert_allclose(predictor.predict_files(files), _softmax(expected), atol=1e-6)


def test_predict_files_equals_predict_array_on_the_preprocessed_images(tiny_run):
    run, files = tiny_run
    predictor = Predictor.from_run(run)
    preprocess = Preprocess.load(run / runs.PREPROCESS)
    batch = np.stack([preprocess(decode(str(f))) for f in files])
    assert batch.shape == (len(files), *predictor.input_shape[1:]) and batch.dtype == np.float32
    from_files = predictor.predict_files(files)
    np.testing.assert_allclose(from_files, predictor.predict_array(batch), atol=1e-6)
    np.testing.assert_allclose(from_files.sum(axis=1), 1.0, atol=1e-6)
    assert predictor.classes_ == Run.load(run).classes


def test_a_saved_temperature_divides_the_logits_before_the_softmax(tiny_run, tmp_path):
    run, _ = tiny_run
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    x = np.random.default_rng(3).normal(size=(4, 1, 16, 16)).astype(np.float32)
    plain = Predictor.from_run(copy)
    assert plain.calibration is None
    logits = plain.logits_array(x)
    np.testing.assert_allclose(plain.predict_array(x), _softmax(logits), atol=1e-6)

    temperature = 2.5
    (copy / runs.CALIBRATION).write_text(
        json.dumps({"method": "temperature", "temperature": temperature})
    )
    calibrated = Predictor.from_run(copy)
    assert calibrated.calibration["temperature"] == temperature
    np.testing.assert_allclose(calibrated.logits_array(x), logits, atol=1e-6)  # logits unchanged
    np.testing.assert_allclose(
        calibrated.predict_array(x), _softmax(logits / temperature), atol=1e-6
    )
    assert (calibrated.predict_array(x).argmax(1) == plain.predict_array(x).argmax(1)).all()


def test_predict_paths_reports_an_unreadable_file_and_predicts_the_others(tiny_run, tmp_path):
    run, files = tiny_run
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    missing = tmp_path / "missing.png"
    paths = [files[0], broken, files[1], missing, files[2]]
    table = predict_paths(run, paths, batch_size=2)

    classes = Run.load(run).classes
    assert list(table.columns) == [
        "file",
        "label",
        "confidence",
        *(f"p_{c}" for c in classes),
        "error",
    ]
    assert table["file"].tolist() == [str(p) for p in paths]
    bad = table.iloc[[1, 3]]
    assert bad["error"].str.contains("broken.png").iloc[0]
    assert "file not found" in bad["error"].iloc[1]
    assert (bad["label"] == "").all() and bad[[f"p_{c}" for c in classes]].isna().all().all()
    good = table.iloc[[0, 2, 4]]
    assert (good["error"] == "").all()
    expected = Predictor.from_run(run).predict_files([files[0], files[1], files[2]])
    np.testing.assert_allclose(good[[f"p_{c}" for c in classes]].to_numpy(), expected, atol=1e-6)
    assert good["label"].tolist() == [classes[k] for k in expected.argmax(1)]
    np.testing.assert_allclose(good["confidence"].to_numpy(), expected.max(1), atol=1e-6)


def _nan_tiff(path):
    from PIL import Image

    Image.fromarray(np.full((16, 16), np.nan, np.float32), mode="F").save(path)
    return path


def test_predict_paths_keeps_the_good_predictions_beside_an_image_with_nan_pixels(
    tiny_run, tmp_path
):
    run, files = tiny_run
    nan = _nan_tiff(tmp_path / "nan.tif")
    paths = [files[0], nan, files[1]]
    table = predict_paths(run, paths, batch_size=8)  # one batch: the NaN row is in it

    classes = Run.load(run).classes
    probs = [f"p_{c}" for c in classes]
    assert table["error"].tolist() == [
        "",
        f"{nan}: pixel values include NaN or infinity; medsight needs finite numbers "
        "(fix the image, or leave it out)",
        "",
    ]
    assert table.loc[1, "label"] == "" and table.loc[[1], probs].isna().all().all()
    expected = Predictor.from_run(run).predict_files([files[0], files[1]])
    np.testing.assert_allclose(table.loc[[0, 2], probs].to_numpy(), expected, atol=1e-6)


# --------------------------------------------------------------------------- backends


class _FixedLogits:
    """A backend that answers the same logits for every image."""

    name = "fixed"

    def __init__(self, logits):
        self.values = np.asarray(logits, dtype=np.float32)

    def logits(self, x):
        return np.tile(self.values, (len(x), 1))


def test_any_backend_turns_a_batch_into_logits_and_the_predictor_applies_the_softmax(tiny_run):
    run, _ = tiny_run
    predictor = Predictor(Run.load(run), backend=_FixedLogits([2.0, 0.0]))
    assert predictor.backend.name == "fixed" and predictor.model is None
    probs = predictor.predict_array(np.zeros((3, 1, 16, 16), np.float32))
    np.testing.assert_allclose(probs, _softmax(np.array([[2.0, 0.0]] * 3)), atol=1e-6)


def test_a_predictor_needs_exactly_one_of_a_model_and_a_backend(tiny_run):
    run = Run.load(tiny_run[0])
    with pytest.raises(ConfigError, match="exactly one"):
        Predictor(run)
    with pytest.raises(ConfigError, match="exactly one"):
        Predictor(run, run.load_model(), backend=_FixedLogits([0.0, 0.0]))


@needs_onnxruntime
def test_static_batch_export_is_fed_one_image_at_a_time(tiny_run, tmp_path):
    run, _ = tiny_run
    export_run(run, dynamic_batch=False)
    predictor = Predictor.from_run(run, backend="onnx")
    assert predictor.backend.fixed_batch == 1
    x = np.zeros((3, 1, 16, 16), dtype=np.float32)
    assert predictor.predict_array(x).shape == (3, 2)
    export_run(run)  # leave the dynamic export for the other tests


@needs_onnxruntime
def test_a_stale_onnx_file_is_re_exported_not_used(tiny_run):
    run, _ = tiny_run
    export_run(run)
    onnx_file, weights = run / "model.onnx", run / runs.WEIGHTS
    stat = weights.stat()
    os.utime(onnx_file, ns=(stat.st_atime_ns, stat.st_mtime_ns - 10**9))
    onnx_file.write_bytes(b"not an onnx graph")  # would fail to load if it were used
    os.utime(onnx_file, ns=(stat.st_atime_ns, stat.st_mtime_ns - 10**9))
    with pytest.warns(UserWarning, match="older than model.safetensors"):
        predictor = Predictor.from_run(run, backend="onnx")
    assert onnx_file.stat().st_mtime_ns >= stat.st_mtime_ns
    assert predictor.predict_array(np.zeros((1, 1, 16, 16), np.float32)).shape == (1, 2)


@needs_onnxruntime
def test_missing_onnx_file_is_exported_on_first_use(tiny_run):
    run, _ = tiny_run
    (run / "model.onnx").unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Predictor.from_run(run, backend="onnx")
    assert (run / "model.onnx").exists()


def test_without_onnxruntime_the_torch_backend_is_used_with_a_notice(tiny_run, monkeypatch):
    run, _ = tiny_run
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.warns(UserWarning, match="onnxruntime is not installed; using the torch"):
        predictor = Predictor.from_run(run, backend="onnx")
    assert predictor.backend.name == "torch"


# --------------------------------------------------------------------------- TTA


def test_tta_views_are_the_batch_then_its_mirror_or_its_quarter_turns():
    x = np.arange(2 * 1 * 3 * 3, dtype=np.float32).reshape(2, 1, 3, 3)
    (only,) = tta_views(x, None)
    assert only is x
    plain, mirror = tta_views(x, "flip")
    assert plain is x and mirror.shape == x.shape and mirror.flags.c_contiguous
    np.testing.assert_array_equal(mirror[0, 0], [[2, 1, 0], [5, 4, 3], [8, 7, 6]])
    views = tta_views(x, "rot")
    assert len(views) == 4 and views[0] is x
    assert all(v.shape == x.shape and v.flags.c_contiguous for v in views)
    np.testing.assert_array_equal(views[1][0, 0], [[2, 5, 8], [1, 4, 7], [0, 3, 6]])  # 90° left
    np.testing.assert_array_equal(views[2][0, 0], x[0, 0, ::-1, ::-1])
    np.testing.assert_array_equal(views[3][1, 0], np.rot90(x[1, 0], 3))


def _run_like(augment: str, size=(16, 16)):
    """What check_tta reads of a run: its augmentation preset and its input size."""
    return SimpleNamespace(
        config=SimpleNamespace(optim=SimpleNamespace(augment=augment)),
        preprocess=SimpleNamespace(size=size),
    )


def test_check_tta_accepts_valid_views_and_names_why_others_are_refused():
    for off in (None, "", "none", " None "):
        assert check_tta(off, _run_like("xray")) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_tta(" FLIP ", _run_like("ct")) == "flip"
        assert check_tta("rot", _run_like("histo")) == "rot"
    with pytest.raises(ConfigError, match="laterality.*--augment xray"):
        check_tta("flip", _run_like("xray"))
    with pytest.raises(ConfigError, match="fixed anterior-posterior orientation"):
        check_tta("rot", _run_like("mri"))
    with pytest.raises(ConfigError, match="square inputs"):
        check_tta("rot", _run_like("derm", size=(16, 24)))
    with pytest.warns(UserWarning, match="modality is not recorded"):
        assert check_tta("flip", _run_like("auto")) == "flip"


def test_tta_flip_averages_the_image_and_its_mirror(tiny_run):
    paths = [tiny_run[0]]
    with pytest.warns(UserWarning, match="cannot check"):
        predictor = Predictor.from_run(paths[0], tta="flip")
    plain = Predictor.from_run(paths[0])
    x = np.random.default_rng(2).normal(size=(4, 1, 16, 16)).astype(np.float32)
    expected = (plain.predict_array(x) + plain.predict_array(x[..., ::-1].copy())) / 2
    np.testing.assert_allclose(predictor.predict_array(x), expected, atol=1e-6)
    with pytest.warns(UserWarning):
        rot = Predictor.from_run(paths[0], tta="rot")
    views = [np.rot90(x, k, axes=(-2, -1)).copy() for k in range(4)]
    expected = np.mean([plain.predict_array(v) for v in views], axis=0)
    np.testing.assert_allclose(rot.predict_array(x), expected, atol=1e-6)


def test_tta_is_refused_where_the_modality_forbids_it(tiny_run, tmp_path):
    paths = [tiny_run[0]]
    run_dir = tmp_path / "xray-run"
    import shutil

    shutil.copytree(paths[0], run_dir)
    config = Run.load(run_dir).config.with_overrides({"optim.augment": "xray"})
    (run_dir / "config.yaml").write_text(config.to_yaml())
    with pytest.raises(ConfigError, match="laterality"):
        Predictor.from_run(run_dir, tta="flip")
    with pytest.raises(ConfigError, match="not known"):
        Predictor.from_run(paths[0], tta="zoom")
    config = config.with_overrides({"optim.augment": "histo"})
    (run_dir / "config.yaml").write_text(config.to_yaml())
    assert Predictor.from_run(run_dir, tta="rot").tta == "rot"  # valid: no warning needed
    result = CliRunner().invoke(app, ["evaluate", str(run_dir), "--bootstrap", "0", "--tta", "rot"])
    assert result.exit_code == 0, result.output
    assert json.loads((Path(run_dir) / "metrics.json").read_text())["tta"] == "rot"


def test_a_runs_ct_window_is_applied_when_it_predicts_a_file_as_when_it_trained(tmp_path):
    from tests.conftest import write_dicom

    run = write_run(tmp_path / "run", tmp_path)
    Preprocess(size=(16, 16), window=(40.0, 80.0)).save(run / runs.PREPROCESS)
    hu = np.linspace(-200, 200, 256, dtype=np.float32).reshape(16, 16).astype(np.int16)
    dcm = write_dicom(tmp_path / "ct.dcm", hu, WindowCenter=0, WindowWidth=2000)
    predictor = Predictor.from_run(run)
    image = predictor.read(dcm)
    assert image.meta["window"] == [40.0, 80.0]  # the run's window, not the file's own
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0  # 0..80 HU → 0..1, clipped
    trained_on = decode(str(dcm), window=(40.0, 80.0))
    np.testing.assert_allclose(
        predictor.predict_files([dcm]),
        predictor.predict_array(predictor.preprocess(trained_on)[None]),
        atol=1e-6,
    )
