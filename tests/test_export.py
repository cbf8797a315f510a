"""Export to ONNX / TorchScript with a parity check (Predictor backends: test_inference.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from medsight import runs
from medsight.errors import ConfigError
from medsight.export import PARITY_TOLERANCE, ExportError, export_run
from medsight.inference import Predictor

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-epoch medcnn_s with differential attention (LayerNorm, softmax, depthwise conv)."""
    from tests.conftest import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("export"), attention="diff")


def test_onnx_export_matches_torch_and_the_onnx_backend_predicts_the_same(tiny_run):
    run, files = tiny_run
    result = export_run(run)
    assert result["path"] == str(run / "model.onnx") and (run / "model.onnx").exists()
    assert result["format"] == "onnx" and result["opset"] == 17
    assert 0 <= result["max_abs_diff_prob"] < PARITY_TOLERANCE

    torch_predictor = Predictor.from_run(run)
    onnx_predictor = Predictor.from_run(run, backend="onnx")
    assert onnx_predictor.backend.name == "onnx" and onnx_predictor.model is None
    assert onnx_predictor.input_shape == torch_predictor.input_shape == (1, 1, 16, 16)
    expected = torch_predictor.predict_files(files)
    got = onnx_predictor.predict_files(files)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert got.argmax(1).tolist() == expected.argmax(1).tolist()
    # One image at a time and a batch give the same answer (dynamic batch axis).
    x = np.random.default_rng(1).normal(size=(5, 1, 16, 16)).astype(np.float32)
    batch = onnx_predictor.predict_array(x)
    singles = np.concatenate([onnx_predictor.predict_array(x[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(batch, singles, atol=1e-6)
    np.testing.assert_allclose(batch, torch_predictor.predict_array(x), atol=1e-4)


def test_torchscript_export_matches_torch(tiny_run):
    run, files = tiny_run
    result = export_run(run, format="torchscript")
    assert result["path"].endswith("model.torchscript.pt") and result["opset"] is None
    assert result["max_abs_diff_prob"] < PARITY_TOLERANCE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
        module = torch.jit.load(result["path"])
    x = torch.randn(2, 1, 16, 16)
    expected = Predictor.from_run(run).logits_array(x.numpy())
    np.testing.assert_allclose(module(x).detach().numpy(), expected, atol=1e-5)


def test_bad_format_backend_and_opset_are_refused(tiny_run):
    run, _ = tiny_run
    with pytest.raises(ConfigError, match="export format 'tflite' is not known; choose one of"):
        export_run(run, format="tflite")
    with pytest.raises(ConfigError, match="backend 'tensorrt' is not known; choose one of"):
        Predictor.from_run(run, backend="tensorrt")
    with pytest.raises(ConfigError, match="opset=17 applies to ONNX only"):
        export_run(run, format="torchscript", opset=17)
    with pytest.raises(ConfigError, match="must be an ONNX opset number"):
        export_run(run, opset=0)


class _Spectrum(nn.Module):
    def forward(self, x):
        return torch.fft.fft2(x).abs()


def test_an_untraceable_layer_is_named_and_nothing_is_written(tiny_run, monkeypatch, tmp_path):
    run, _ = tiny_run
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(1, 2, 3, padding=1))
    model.add_module("spectrum", _Spectrum())
    model.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(2 * 16 * 16, 2)))
    monkeypatch.setattr(runs.Run, "load_model", lambda self: model.eval())
    (run / "model.onnx").unlink(missing_ok=True)
    with pytest.raises(ExportError, match=r"in layer spectrum \(_Spectrum\): .*fft_fft2"):
        export_run(run)
    assert not (run / "model.onnx").exists()
    assert not list(run.glob("*.tmp*"))


def test_cli_export_prints_the_parity(tiny_run):
    from typer.testing import CliRunner

    from medsight.cli import app

    run, _ = tiny_run
    result = CliRunner().invoke(app, ["export", str(run), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())  # Rich wraps long lines
    assert "model.onnx" in printed and "max |Δprobability| vs PyTorch" in printed
    result = CliRunner().invoke(app, ["export", str(run / "nope")])
    assert result.exit_code != 0 and "is not a medsight run" in result.output
