"""--device and --precision: what each resolves to, and the errors that say what the machine has."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from medsight import devices
from medsight.config import DataConfig, TrainConfig
from medsight.errors import ConfigError

CPU = torch.device("cpu")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)


def test_auto_is_the_cpu_without_a_gpu_and_the_first_gpu_with_one(no_gpu):
    assert devices.resolve_device("auto") == CPU
    assert devices.resolve_device(None) == CPU
    assert devices.resolve_device(" CPU ") == CPU


def test_auto_takes_the_first_gpu(one_gpu):
    assert devices.resolve_device("auto") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda") == torch.device("cuda", 0)


def test_cuda_without_a_gpu_says_what_was_found(no_gpu):
    with pytest.raises(ConfigError) as error:
        devices.resolve_device("cuda")
    message = str(error.value)
    assert message.startswith("--device cuda: no CUDA GPU is visible (torch ")
    assert "use --device cpu" in message


def test_a_gpu_index_beyond_the_machine_lists_its_gpus(one_gpu):
    with pytest.raises(ConfigError, match=r"has 1 CUDA GPU\(s\) \(cuda:0 Test GPU\); give cuda:0"):
        devices.resolve_device("cuda:3")


@pytest.mark.parametrize("spec", ["tpu", "gpu0", "cuda:x"])
def test_a_name_that_is_no_device_lists_the_choices(spec):
    with pytest.raises(ConfigError, match="is not a device; give auto"):
        devices.resolve_device(spec)


def test_precision_auto_is_fp32_on_the_cpu_and_bf16_on_a_modern_gpu(one_gpu):
    assert devices.resolve_precision("auto", CPU) == "fp32"
    assert devices.resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert devices.resolve_precision("bf16", CPU) == "bf16"  # asked for: CPU autocast has it


def test_precision_auto_falls_back_to_fp16_on_an_older_gpu(one_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    gpu = torch.device("cuda", 0)
    assert devices.resolve_precision("auto", gpu) == "fp16"
    with pytest.raises(ConfigError, match="does not support bfloat16; use fp16"):
        devices.resolve_precision("bf16", gpu)


def test_fp16_needs_a_gpu_and_unknown_precisions_are_named():
    with pytest.raises(ConfigError, match="--precision fp16 needs a CUDA GPU"):
        devices.resolve_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="--precision 'int8': give one of auto, fp32"):
        devices.resolve_precision("int8", CPU)


def test_only_fp16_on_a_gpu_scales_the_loss():
    assert not devices.grad_scaler(CPU, "fp32").is_enabled()
    assert not devices.grad_scaler(CPU, "bf16").is_enabled()


def test_bf16_autocast_on_the_cpu_computes_in_bf16():
    layer = torch.nn.Linear(4, 2)
    with devices.autocast(CPU, "bf16"):
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    with devices.autocast(CPU, "fp32"):
        assert layer(torch.ones(1, 4)).dtype == torch.float32


def test_onnx_runs_on_the_cpu_and_says_why_when_its_cuda_provider_is_missing(one_gpu, monkeypatch):
    import onnxruntime as ort

    providers, note = devices.onnx_providers(CPU)
    assert providers == ["CPUExecutionProvider"] and note == "ONNX Runtime on the CPU"
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    providers, note = devices.onnx_providers("cuda")
    assert providers == ["CPUExecutionProvider"]
    assert "CUDA provider is not installed (pip install onnxruntime-gpu" in note
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    providers, note = devices.onnx_providers("cuda:0")
    assert providers[0] == ("CUDAExecutionProvider", {"device_id": 0})
    assert note == "ONNX Runtime on cuda:0 (Test GPU) (CUDAExecutionProvider)"


def test_a_config_from_before_precision_reads_amp_as_auto_or_fp32():
    data = {"path": "d"}
    assert TrainConfig.parse({"data": data, "optim": {"amp": True}}).precision == "auto"
    assert TrainConfig.parse({"data": data, "optim": {"amp": False}}).precision == "fp32"
    assert TrainConfig(data=DataConfig(path="d")).device == "auto"


class Stop(Exception):
    pass


def test_a_run_begun_on_a_gpu_resumes_on_the_cpu_when_told(tmp_path, monkeypatch, no_gpu):
    from typer.testing import CliRunner

    from medsight import runs
    from medsight.cli import app
    from medsight.training.trainer import train
    from tests.conftest import make_two_class_manifest, tiny_train_config

    data = make_two_class_manifest(tmp_path / "data", 8, 2, 16)
    out = tmp_path / "run"

    def stop(epoch, row):
        raise Stop

    with pytest.raises(Stop):
        train(tiny_train_config(data, out), show_progress=False, on_epoch=stop)
    # as a GPU run records itself: its checkpoint's tensors tagged for cuda:0
    checkpoint = out / "checkpoints" / "last.pt"
    saved = torch.load(checkpoint, weights_only=False)
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(saved, checkpoint)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(checkpoint, weights_only=False)  # as it would load without map_location
    config = (out / runs.CONFIG).read_text()
    config = config.replace("device: auto", "device: cuda").replace(
        "precision: fp32", "precision: fp16"
    )
    (out / runs.CONFIG).write_text(config)

    refused = CliRunner().invoke(app, ["train", "--resume", str(out)])
    assert refused.exit_code != 0
    assert "--device cuda: no CUDA GPU is visible" in " ".join(refused.output.split())
    resumed = CliRunner().invoke(
        app, ["train", "--resume", str(out), "--device", "cpu", "--precision", "fp32"]
    )
    assert resumed.exit_code == 0, resumed.output
    assert runs.Run.load(out).config.optim.epochs == 2
    assert pd.read_csv(out / runs.HISTORY)["epoch"].max() == 2


def test_a_predictor_says_where_it_runs(tmp_path):
    from medsight.inference import Predictor
    from tests.conftest import train_tiny_run

    run, _ = train_tiny_run(tmp_path)
    on_torch = Predictor.from_run(run, device="cpu")
    assert on_torch.runs_on.startswith("torch on cpu (") and on_torch.device == CPU
    assert Predictor.from_run(run, backend="onnx").runs_on == "ONNX Runtime on the CPU"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
            Predictor.from_run(run, device="cuda")
