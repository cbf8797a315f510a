"""Where tensors run and in what precision: ``--device`` and ``--precision`` resolved once, with
errors that say what the machine has, and the ONNX Runtime providers that match.

>>> resolve_device("auto")          # CUDA when a GPU is present, else the CPU   # doctest: +SKIP
device(type='cpu')
>>> resolve_precision("auto", torch.device("cpu"))
'fp32'
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

from medsight.errors import ConfigError

DEVICE_HELP = "auto (CUDA when a GPU is present, else CPU), cpu, cuda, cuda:N or mps"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
Precision = Literal["auto", "fp32", "bf16", "fp16"]


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device ``spec`` names; ``auto`` is the first CUDA GPU when there is one, else
    the CPU (Apple's ``mps`` only when asked for: some operators still fall back to the CPU).

    A device the machine lacks is refused with what it has, e.g. ``--device cuda: no CUDA GPU
    is visible (torch 2.14.1, CPU-only build); use --device cpu``.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {spec!r} is not a device; give {DEVICE_HELP}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"--device {spec}: no CUDA GPU is visible ({_cuda_why()}); use --device cpu"
            )
        index = 0 if device.index is None else device.index
        if index >= count:
            raise ConfigError(
                f"--device {spec}: this machine has {count} CUDA GPU(s) ({describe_gpus()}); "
                f"give cuda:0…cuda:{count - 1}"
            )
        return torch.device("cuda", index)
    if device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError(
                f"--device {spec}: Apple's Metal (MPS) is not available here; use --device cpu"
            )
        return torch.device("mps")
    raise ConfigError(f"--device {spec!r} is not supported; give {DEVICE_HELP}")


def _cuda_why() -> str:
    build = torch.version.cuda
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    parts = [f"torch {torch.__version__.split('+')[0]}"]
    parts.append(f"built for CUDA {build}" if build else "a CPU-only build")
    if visible is not None:
        parts.append(f"CUDA_VISIBLE_DEVICES={visible!r}")
    return ", ".join(parts)


def describe_gpus() -> str:
    """``cuda:0 NVIDIA H100 80GB HBM3`` for each visible GPU (or ``none``)."""
    if not torch.cuda.is_available():
        return "none"
    return ", ".join(
        f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())
    )


def describe(device: torch.device) -> str:
    """What a run records and a command prints: ``cpu (2 cores)``, ``cuda:0 (NVIDIA H100…)``."""
    if device.type == "cuda":
        index = device.index or 0
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({os.cpu_count() or 1} cores)"
    return str(device)


def resolve_precision(spec: str | None, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``spec`` on ``device``.

    ``auto``: bf16 on a CUDA GPU that supports it (Ampere and later: no loss scaling needed),
    fp16 on older GPUs, fp32 on CPU and MPS (CPU autocast is slower than fp32 for these
    networks). fp16 on the CPU is refused; bf16 on the CPU is allowed when asked for.
    """
    text = (spec or "auto").strip().lower()
    if text not in PRECISIONS:
        raise ConfigError(f"--precision {spec!r}: give one of {', '.join(PRECISIONS)}")
    if text == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if text == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"--precision fp16 needs a CUDA GPU (this run is on {device}); use fp32, or bf16 "
            "on a CPU that supports it"
        )
    if text == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"--precision bf16: {describe(device)} does not support bfloat16; use fp16"
        )
    return text


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only where fp16 needs one (bf16 keeps fp32's exponent range)."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")


def onnx_providers(device: torch.device | str | None = "cpu") -> tuple[list[str], str]:
    """ONNX Runtime's execution providers for ``device``, and a line saying which is used.

    CUDA when the device is a GPU and ``onnxruntime-gpu`` offers its CUDA provider, else the
    CPU, with the reason (``CUDAExecutionProvider is not installed: pip install
    onnxruntime-gpu``).
    """
    import onnxruntime as ort

    device = resolve_device(device) if not isinstance(device, torch.device) else device
    if device.type != "cuda":
        return ["CPUExecutionProvider"], "ONNX Runtime on the CPU"
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        options = {"device_id": device.index or 0}
        return (
            [("CUDAExecutionProvider", options), "CPUExecutionProvider"],  # type: ignore[list-item]
            f"ONNX Runtime on {describe(device)} (CUDAExecutionProvider)",
        )
    return (
        ["CPUExecutionProvider"],
        "ONNX Runtime on the CPU: its CUDA provider is not installed (pip install "
        "onnxruntime-gpu for GPU inference)",
    )


def active_provider(session) -> str:
    """The provider an ONNX Runtime session really uses (it falls back silently)."""
    return session.get_providers()[0]
