"""Export a run's network to ONNX (or TorchScript) for fast inference, checked against torch.

``export_run(RUN)`` writes ``RUN/model.onnx``: the eval-mode network from ``model.json`` +
``model.safetensors``, input ``(N, C, H, W)`` as ``preprocess.json`` describes it, output the
raw logits (the task's activation, softmax or per-finding sigmoid, and calibration stay in
:class:`~medsight.inference.Predictor`).
The file is written atomically and only after its outputs match torch's on a sample batch, so a
``model.onnx`` in a run directory is always one that passed the parity check.

ONNX export uses torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``):
it needs only the ``onnx`` package and takes under a second for medsight's models, where the
dynamo exporter needs ``onnxscript`` and takes several seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsight.errors import ConfigError, MedsightError
from medsight.runs import Run, write_atomic

__all__ = [
    "DEFAULT_OPSET",
    "EXPORT_FILES",
    "FORMATS",
    "PARITY_TOLERANCE",
    "ExportError",
    "export_run",
]

#: Export formats and the file each writes in the run directory.
EXPORT_FILES: dict[str, str] = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
FORMATS: tuple[str, ...] = tuple(EXPORT_FILES)
#: Opset 17 has LayerNorm as one op (the token-attention blocks use it); ONNX Runtime ≥ 1.12.
DEFAULT_OPSET = 17
#: Largest |Δ probability| (after the run's task activation: softmax for classification,
#: sigmoid per finding for multi-label) allowed between torch and the exported model.
PARITY_TOLERANCE = 1e-4
INPUT_NAME = "input"
OUTPUT_NAME = "logits"

_PARITY_BATCH = 8
_PARITY_SEED = 0


class ExportError(MedsightError):
    """The network could not be exported, or the exported model does not predict like torch."""


def export_run(
    run: str | Path,
    *,
    format: str = "onnx",
    opset: int | None = None,
    dynamic_batch: bool = True,
    check: bool = True,
) -> dict[str, Any]:
    """Export the run's network to ``RUN/model.onnx`` (or ``RUN/model.torchscript.pt``).

    The input is one preprocessed batch ``(N, C, H, W)`` (``N`` free when ``dynamic_batch``,
    else 1), the output the raw logits ``(N, K)``. With ``check`` the exported model is run on
    a seeded sample batch (8 images, then 1) in the preprocessed value range and its
    probabilities (the run's task's: softmax, or a sigmoid per finding) compared with torch's;
    the file is kept only if the largest difference is below :data:`PARITY_TOLERANCE`, else
    :class:`ExportError` is raised. ``opset`` (ONNX only) defaults to :data:`DEFAULT_OPSET`.
    TorchScript graphs are traced and take any batch size.

    Returns ``{"path", "format", "opset", "max_abs_diff_prob", "seconds"}`` (``opset`` is None
    for TorchScript, ``max_abs_diff_prob`` None without ``check``).

    Example:
        >>> export_run("runs/pneumonia")                                 # doctest: +SKIP
        {'path': 'runs/pneumonia/model.onnx', 'format': 'onnx', 'opset': 17,
         'max_abs_diff_prob': 5.96e-08, 'seconds': 0.41}
    """
    start = time.perf_counter()
    kind = format.strip().lower() if isinstance(format, str) else format
    if kind not in EXPORT_FILES:
        raise ConfigError(
            f"export format {format!r} is not known; choose one of: {', '.join(FORMATS)}"
        )
    if kind == "onnx":
        opset = DEFAULT_OPSET if opset is None else opset
        if isinstance(opset, bool) or not isinstance(opset, int) or opset < 7:
            raise ConfigError(
                f"opset={opset!r} must be an ONNX opset number such as {DEFAULT_OPSET}"
            )
        _require("onnx", "ONNX export")
        if check:
            _require("onnxruntime", "the ONNX parity check (or pass check=False)")
    elif opset is not None:
        raise ConfigError(f"opset={opset!r} applies to ONNX only; leave it out for TorchScript")

    loaded = run if isinstance(run, Run) else Run.load(run)
    from medsight.tasks import get_task

    if not get_task(loaded.task).dynamic_batch_export:
        # torchvision's detectors post-process image by image: a traced graph holds the batch
        # size it was traced with. One image per call; the ONNX backend feeds them in turn.
        dynamic_batch = False
    model = loaded.load_model()
    shape = (1, loaded.preprocess.channels, *loaded.preprocess.size)
    target = loaded.path / EXPORT_FILES[kind]
    diffs: list[float] = []

    def write(tmp: Path) -> None:
        try:
            if kind == "onnx":
                _export_onnx(model, shape, tmp, opset, dynamic_batch)
            else:
                _export_torchscript(model, shape, tmp)
        except ExportError as exc:
            raise ExportError(f"{target}: {exc}") from None
        if not check:
            return
        try:
            run_exported = _onnx_runner(tmp) if kind == "onnx" else _torchscript_runner(tmp)
            diffs.append(_parity(model, run_exported, loaded, dynamic_batch or kind != "onnx"))
        except Exception as exc:
            engine = "ONNX Runtime" if kind == "onnx" else "torch.jit"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(
                f"{target}: the exported model cannot be run by {engine} ({first}); nothing was"
                " written. Try another --opset or --format, or serve with the torch backend"
            ) from None
        if not diffs[-1] < PARITY_TOLERANCE:
            raise ExportError(
                f"{target}: the exported model does not predict like torch (largest "
                f"probability difference {diffs[-1]:.2e} ≥ {PARITY_TOLERANCE:.0e} on a sample"
                " batch); nothing was written. Try another --opset or --format, or serve"
                " with the torch backend"
            )

    try:
        write_atomic(target, write)
    except OSError as exc:
        raise ExportError(
            f"cannot write {target}: {exc.strerror or exc}; export where the run is writable"
        ) from None
    return {
        "path": str(target),
        "format": kind,
        "opset": opset if kind == "onnx" else None,
        "max_abs_diff_prob": diffs[-1] if diffs else None,
        "seconds": round(time.perf_counter() - start, 3),
    }


# --- exporting -------------------------------------------------------------------------------


def _require(module: str, purpose: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ExportError(f"{purpose} needs the {module} package: pip install {module}")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # The exporters warn about their own deprecation and about traced shape checks (the custom
    # CNN's "pool unless 1 px thin" is fixed for the run's input size, which is what we want);
    # the parity check, not these warnings, is what tells a good export from a bad one.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


@contextlib.contextmanager
def _captured_stdout() -> Iterator[Callable[[], str]]:
    """Catch what C++ prints on file descriptor 1 (the legacy exporter dumps its whole graph
    there when it fails); the caller reads it to find the failing layer."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no usable stdout: nothing to catch
        yield lambda: ""
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)

        def read() -> str:
            sink.flush()
            sink.seek(0)
            return sink.read().decode(errors="replace")

        try:
            yield read
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


@contextlib.contextmanager
def _module_stack(model: nn.Module) -> Iterator[list[str]]:
    """Names of the modules whose forward is running; after an exception in a forward, the
    innermost one is last."""
    stack: list[str] = []
    handles = []

    def enter(name: str) -> Callable:
        def hook(module, args) -> None:
            stack.append(name)

        return hook

    def leave(module, args, output) -> None:
        if stack:
            stack.pop()

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def _export_onnx(
    model: nn.Module, shape: tuple[int, ...], path: Path, opset: int, dynamic_batch: bool
) -> None:
    example = torch.zeros(shape)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with _quiet(), _captured_stdout() as printed, _module_stack(model) as stack:
        try:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=axes,
                do_constant_folding=True,
            )
        except Exception as exc:
            raise _export_error("ONNX", f"opset {opset}", exc, model, stack, printed()) from None


def _export_torchscript(model: nn.Module, shape: tuple[int, ...], path: Path) -> None:
    with _quiet(), _module_stack(model) as stack:
        try:
            with torch.no_grad():
                traced = torch.jit.trace(model, torch.zeros(shape), check_trace=False)
            torch.jit.save(traced, str(path))
        except Exception as exc:
            raise _export_error("TorchScript", "trace", exc, model, stack, "") from None


def _export_error(
    target: str, how: str, exc: Exception, model: nn.Module, stack: list[str], log: str
) -> ExportError:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    layer = _failing_layer(model, stack, message, log)
    where = f" in layer {layer}" if layer else ""
    advice = (
        "try another --opset, --format torchscript, or serve with the torch backend"
        if target == "ONNX"
        else "try --format onnx, or serve with the torch backend"
    )
    return ExportError(f"cannot export to {target} ({how}){where}: {message}; {advice}")


def _failing_layer(model: nn.Module, stack: list[str], message: str, log: str) -> str | None:
    """``"backbone.stage3.attention (CBAM)"``: where the export failed, when it can be told."""
    modules = dict(model.named_modules())
    if stack:  # the error came from inside a forward while tracing
        name = stack[-1]
        return f"{name} ({type(modules[name]).__name__})"
    op = re.search(r"operator '([\w:.]+)'", message)
    if not op:
        return None
    # The exporter printed its graph: the first node calling the op carries the module scope,
    # "pkg.Outer::/pkg.Sequential::stage3/pkg.CBAM::attention". Scopes list the modules as
    # called, so a backbone's stages called from its forward_features lack the backbone's own
    # name: match the scope's tail against the model's module names.
    for line in log.splitlines():
        if f"= {op.group(1)}(" not in line or "scope: " not in line:
            continue
        scope = line.split("scope: ", 1)[1].split(" #", 1)[0].strip()
        parts = [seg.split("::", 1) for seg in scope.split("/") if "::" in seg]
        attrs = [attr for _, attr in parts if attr]
        if not attrs:
            return None
        tail = ".".join(attrs)
        found = [n for n in modules if n == tail or n.endswith("." + tail)]
        name = found[0] if len(found) == 1 else tail
        kind = parts[-1][0].rsplit(".", 1)[-1]
        return f"{name} ({kind})"
    return None


# --- checking --------------------------------------------------------------------------------


def _onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {INPUT_NAME: x})[0]


def _torchscript_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).float().numpy()

    return run


def _parity(
    model: nn.Module, run_exported: Callable[[np.ndarray], np.ndarray], run: Run, batched: bool
) -> float:
    """Largest |Δ probability| between torch and the export on a seeded batch and on batch 1,
    the probabilities being the run's task's (uncalibrated)."""
    from medsight.tasks import get_task

    task = get_task(run.task)

    def probs(logits: np.ndarray) -> np.ndarray:
        return task.probabilities(np.asarray(logits, dtype=np.float64))

    prep = run.preprocess
    rng = np.random.default_rng(_PARITY_SEED)
    pixels = rng.random((_PARITY_BATCH, prep.channels, *prep.size), dtype=np.float32)
    x = prep.normalize(torch.from_numpy(pixels)).numpy()  # the range the model saw in training
    with torch.no_grad():
        expected = probs(model(torch.from_numpy(x)).float().numpy())
    if batched:
        got = run_exported(x)
    else:
        got = np.concatenate([run_exported(x[i : i + 1]) for i in range(len(x))])
    single = run_exported(x[:1])
    diff = task.parity_difference(expected, probs(got))
    return float(max(diff, task.parity_difference(expected[:1], probs(single))))
