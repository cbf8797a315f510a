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
    "BUNDLE_ACTIVATIONS",
    "BUNDLE_FILES",
    "DEFAULT_OPSET",
    "EXPORT_FILES",
    "FORMATS",
    "PARITY_TOLERANCE",
    "ExportError",
    "bundle_inference_config",
    "bundle_metadata",
    "export_bundle",
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
    if kind in ("monai-bundle", "monai_bundle", "bundle"):
        raise ConfigError(
            "a MONAI Bundle is a folder of its own: export_bundle(run, out) (CLI: medsight export"
            " RUN --format monai-bundle --out DIR)"
        )
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


# --- MONAI Bundle ----------------------------------------------------------------------------

#: The activation a MONAI Bundle's postprocessing applies, by medsight task.
BUNDLE_ACTIVATIONS: dict[str, str] = {"classify": "softmax", "multilabel": "sigmoid"}
#: The bundle's files, relative to its folder.
BUNDLE_FILES: tuple[str, ...] = (
    "configs/metadata.json",
    "configs/inference.json",
    "models/model.ts",
    "docs/README.md",
)
#: The version written into a new bundle's ``metadata.json``.
BUNDLE_VERSION = "0.1.0"
#: The JSON schema MONAI's bundles name in ``metadata.json``. medsight never fetches it (the
#: machines it runs on may be offline): ``monai.bundle.verify_metadata`` downloads it when a
#: user runs that check.
BUNDLE_SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
    "0.8.1/meta_schema_20220324.json"
)


def export_bundle(
    run: str | Path | Run,
    out: str | Path,
    *,
    intended_use: str | None = None,
    version: str = BUNDLE_VERSION,
) -> dict[str, Any]:
    """Write the run's network as a MONAI Bundle in the folder ``out``, for MONAI's own tools
    (``monai.bundle.ConfigWorkflow``, MONAI Deploy, MONAI Label).

    ``out`` gets ``configs/metadata.json`` (versions, task, input ``image`` and output ``pred``
    formats, class names), ``configs/inference.json`` (``LoadImaged`` + ``EnsureChannelFirstd``,
    the run's own ``preprocess.json`` transforms and normalisation, the TorchScript network, the
    task's activation — softmax for classification, a sigmoid per finding for multi-label, after
    the run's temperature when it is calibrated — and a ``SimpleInferer`` over
    ``datalist``, the NIfTI files in ``input_dir`` unless given, that writes
    ``output_dir/predictions.csv``), ``models/model.ts`` (traced with the run's input shape and
    checked against torch, as :func:`export_run` checks) and ``docs/README.md`` (the model card:
    ``intended_use``, the data, the test metrics when the run was evaluated, limitations).

    Only 3-D runs export (a 2-D or 2.5-D run is refused in one line: use ONNX). A previous
    bundle in ``out`` is replaced; any other non-empty folder is refused. Nothing is left in
    ``out`` when the export fails. Returns ``{"path", "files", "max_abs_diff_prob",
    "seconds"}``.

    Example:
        >>> export_bundle("runs/adrenal3d", "bundles/adrenal3d")          # doctest: +SKIP
        {'path': 'bundles/adrenal3d', 'files': [...], 'max_abs_diff_prob': 2.9e-08, ...}

    Run it with MONAI::

        from monai.bundle import ConfigWorkflow
        workflow = ConfigWorkflow("bundles/adrenal3d/configs/inference.json",
                                  meta_file="bundles/adrenal3d/configs/metadata.json",
                                  workflow_type="infer", input_dir="scans", output_dir="out")
        workflow.initialize(); workflow.run(); workflow.finalize()
    """
    import json
    import shutil

    start = time.perf_counter()
    loaded = run if isinstance(run, Run) else Run.load(run)
    _check_bundle_run(loaded)
    out = Path(out)
    _check_bundle_out(out)
    model = loaded.load_model()
    shape = (1, loaded.preprocess.channels, *loaded.preprocess.size)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for folder in ("configs", "models", "docs"):
            (staging / folder).mkdir()
        try:
            _export_torchscript(model, shape, staging / "models" / "model.ts")
        except ExportError as exc:
            raise ExportError(f"{out}: MONAI Bundle: {exc}") from None
        diff = _parity(model, _torchscript_runner(staging / "models" / "model.ts"), loaded, True)
        if not diff < PARITY_TOLERANCE:
            raise ExportError(
                f"{out}: the traced network does not predict like torch (largest probability "
                f"difference {diff:.2e} ≥ {PARITY_TOLERANCE:.0e}); nothing was written"
            )
        metadata = bundle_metadata(loaded, version=version, intended_use=intended_use)
        (staging / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        config = bundle_inference_config(loaded)
        (staging / "configs" / "inference.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "docs" / "README.md").write_text(_bundle_readme(loaded, intended_use))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except OSError as exc:
        raise ExportError(
            f"cannot write the bundle {out}: {exc.strerror or exc}; give a writable folder"
        ) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return {
        "path": str(out),
        "files": list(BUNDLE_FILES),
        "max_abs_diff_prob": diff,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _check_bundle_run(run: Run) -> None:
    prep = run.preprocess
    if getattr(prep, "slices", None) is not None:
        raise ExportError(
            f"{run.path}: a 2.5-D run (--slices {prep.slices}: axial slices of a volume as the "
            "channels of a 2-D network) does not export as a MONAI Bundle, which here holds "
            "3-D networks; export it with --format onnx"
        )
    if run.dims != 3 or getattr(prep, "dims", 2) != 3:
        raise ExportError(
            f"{run.path}: a 2-D run; MONAI Bundles here are for volume (3-D) runs; export it "
            "with --format onnx"
        )
    if run.task not in BUNDLE_ACTIVATIONS:
        raise ExportError(
            f"{run.path}: a {run.task} run; MONAI Bundles here hold classification and "
            "multi-label runs; export it with --format onnx"
        )
    _bundle_temperature(run)  # refuses a calibration the bundle cannot repeat


def _check_bundle_out(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"out={str(out)!r} is a file; give a folder for the MONAI Bundle")
    if any(out.iterdir()) and not (out / "configs" / "metadata.json").is_file():
        raise ExportError(
            f"out={str(out)!r} is a non-empty folder that is not a MONAI Bundle; give an empty "
            "or new folder"
        )


def _bundle_temperature(run: Run) -> float | list[float] | None:
    """The temperature(s) the run's calibration divides logits by (None: uncalibrated)."""
    calibration = run.calibration()
    if not calibration:
        return None
    method = calibration.get("method")
    if method == "temperature":
        return float(calibration["temperature"])
    if method == "per-finding temperature":
        return [float(t) for t in calibration["temperatures"]]
    raise ExportError(
        f"{run.path}: its calibration ({method}) cannot be written into a MONAI Bundle; "
        "recalibrate with temperature scaling or export with --format onnx"
    )


def bundle_inference_config(run: Run) -> dict[str, Any]:
    """The MONAI Bundle ``inference.json`` of a 3-D run: its preprocessing (``LoadImaged`` +
    ``EnsureChannelFirstd``, then the transforms of ``preprocess.json`` and ``(x - mean) /
    std``), the TorchScript network ``models/model.ts``, the task's activation, and a
    ``SimpleInferer`` over ``datalist`` writing ``output_dir/predictions.csv`` (one row
    per file: its path, then one probability per class in ``metadata.json``'s order)."""
    prep = run.preprocess
    steps: list[dict] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
    ]
    steps += [dict(step) for step in prep.transforms]
    if prep.channels > 1:  # a 1-channel volume repeated, as VolumePreprocess.prepare does
        steps.append({"_target_": "RepeatChanneld", "keys": "image", "repeats": prep.channels})
    mean = [float(m) for m in prep.mean]
    std = [float(s) for s in prep.std]
    channel_wise = len(mean) > 1 or len(std) > 1
    steps.append(
        {
            "_target_": "NormalizeIntensityd",
            "keys": "image",
            "subtrahend": mean if channel_wise else mean[0],
            "divisor": std if channel_wise else std[0],
            "channel_wise": channel_wise,
        }
    )
    steps.append({"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"})
    post: list[dict] = []
    temperature = _bundle_temperature(run)
    if temperature is not None:
        post.append(
            {
                "_target_": "Lambdad",
                "keys": "pred",
                "func": f"$lambda x: x / torch.tensor({temperature!r}, dtype=x.dtype)",
            }
        )
    activation = BUNDLE_ACTIVATIONS[run.task]
    post.append({"_target_": "Activationsd", "keys": "pred", activation: True})
    return {
        "imports": ["$import glob", "$import os", "$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "input_dir": ".",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "datalist": "$sorted(glob.glob(os.path.join(@input_dir, '*.nii*')))",
        "network_def": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), "
        "map_location=@device)",
        "network": "$@network_def.to(@device).eval()",
        "preprocessing": {"_target_": "Compose", "transforms": steps},
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': path} for path in @datalist]",
            "transform": "@preprocessing",
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": post},
        # Predictions without pytorch-ignite (MONAI's engines need it; medsight does not): the
        # inferer runs the network on each preprocessed volume, the postprocessing applies the
        # activation, a CSVSaver writes one row per file.
        "predict": "$torch.no_grad()(lambda image: @postprocessing({'pred': @inferer("
        "torch.as_tensor(image)[None].to(@device), @network)[0].float().cpu()})['pred'])",
        "saver": {
            "_target_": "CSVSaver",
            "output_dir": "@output_dir",
            "filename": "predictions.csv",
            "overwrite": True,
            "flush": False,
        },
        "infer": "$[@saver.save(@predict(item['image']), item['image'].meta) for item in @dataset]",
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@infer", "$@saver.finalize()"],
    }


def bundle_metadata(
    run: Run, *, version: str = BUNDLE_VERSION, intended_use: str | None = None
) -> dict[str, Any]:
    """The MONAI Bundle ``metadata.json`` of a 3-D run: versions, task, the input ``image``
    (channels, spatial shape, value range after normalisation) and the output ``pred`` (one
    probability per class, named in ``channel_def``); ``intended_use`` as the model card words
    it (default: research and teaching only, not for diagnosis)."""
    import json

    import monai

    from medsight.runs import METRICS, VERSIONS

    prep = run.preprocess
    classes = list(run.classes)
    versions = _read_json(run.path / VERSIONS)
    metrics = _read_json(run.path / METRICS)
    lo = min((0.0 - m) / s for m, s in zip(_per_channel(prep.mean, prep.channels),
                                           _per_channel(prep.std, prep.channels)))  # fmt: skip
    hi = max((1.0 - m) / s for m, s in zip(_per_channel(prep.mean, prep.channels),
                                           _per_channel(prep.std, prep.channels)))  # fmt: skip
    kind = "multi-label findings" if run.task == "multilabel" else "classes"
    activation = BUNDLE_ACTIVATIONS[run.task]
    description = (
        f"medsight {run.model_config.get('name', 'network')} for 3-D {_task_words(run)} of "
        "volumes into "
        f"{kind} {', '.join(classes)}; input {'x'.join(map(str, prep.size))} voxels after the "
        f"run's preprocessing; output {activation} probabilities."
    )
    eval_metrics = {}
    for key in ("auroc", "auroc_macro", "accuracy", "balanced_accuracy"):
        value = (metrics.get(key) or {}).get("value") if isinstance(metrics, dict) else None
        if value is not None:
            eval_metrics[key] = value
    return {
        "schema": BUNDLE_SCHEMA,
        "version": version,
        "changelog": {version: f"exported by medsight from run {run.path.name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        # The specification's mandatory key, and the one newer MONAI releases read.
        "optional_packages_version": {},
        "required_packages_version": {"nibabel": _version("nibabel")},
        "name": f"medsight {run.path.name}",
        "task": f"3-D {_task_words(run)} ({', '.join(classes)})",
        "description": description,
        "authors": "medsight (exported from a medsight training run)",
        "copyright": "The authors of the training run; see docs/README.md",
        "license": "The weights carry the terms of the data they were trained on; see "
        "docs/README.md. Not a medical device: research and teaching only.",
        "data_source": str(run.config.data.path),
        "data_type": "nibabel",
        "image_classes": f"{prep.channels} channel(s), intensities as preprocess.json scales them",
        "label_classes": json.dumps(classes),
        "pred_classes": json.dumps(classes),
        "eval_metrics": eval_metrics,
        "intended_use": intended_use
        or "Research and teaching only; not for diagnosis. See docs/README.md.",
        "references": [],
        "medsight_versions": versions if isinstance(versions, dict) else {},
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "CT/MR (NIfTI)",
                    "num_channels": prep.channels,
                    "spatial_shape": list(prep.size),
                    "dtype": "float32",
                    "value_range": [round(lo, 6), round(hi, 6)],
                    "is_patch_data": False,
                    "channel_def": {str(i): "image" for i in range(prep.channels)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": len(classes),
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "is_onehot": False,
                    "activation": activation,
                    "channel_def": {str(i): name for i, name in enumerate(classes)},
                }
            },
        },
    }


def _task_words(run: Run) -> str:
    return "multi-label classification" if run.task == "multilabel" else "classification"


def _per_channel(values: tuple[float, ...], channels: int) -> list[float]:
    return list(values) * channels if len(values) == 1 else list(values)


def _read_json(path: Path) -> Any:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _bundle_readme(run: Run, intended_use: str | None) -> str:
    """The bundle's ``docs/README.md``: the run's model card, and how to run the bundle."""
    from medsight.runs import METRICS

    prep = run.preprocess
    classes = list(run.classes)
    metrics = _read_json(run.path / METRICS)
    use = intended_use or (
        "Research and teaching: studying how volume models behave on "
        f"{', '.join(classes)} volumes. Not a medical device, not clinically validated, not for "
        "diagnosing, triaging or treating patients, and not for any decision about a person."
    )
    lines = [
        f"# medsight {run.path.name} (MONAI Bundle)",
        "",
        f"3-D {_task_words(run)} of volumes into: {', '.join(classes)}. Network "
        f"`{run.model_config.get('name', '?')}`, exported by medsight as TorchScript "
        "(`models/model.ts`).",
        "",
        "## Intended use",
        "",
        use,
        "",
        "## Data",
        "",
        f"Trained on `{run.config.data.path}` (the run's `splits.csv` lists which sample went "
        "to which split).",
        "",
        "## Input and output",
        "",
        f"- Input: a NIfTI volume (`.nii`, `.nii.gz`), loaded with `LoadImaged` + "
        f"`EnsureChannelFirstd`, then {', '.join(t['_target_'] for t in prep.transforms)} "
        f"(medsight's `preprocess.json`, intensity `{prep.intensity}`), then "
        f"`(x - {list(prep.mean)}) / {list(prep.std)}`: {prep.channels} × "
        f"{' × '.join(map(str, prep.size))} voxels.",
        f"- Output `pred`: {BUNDLE_ACTIVATIONS[run.task]} probabilities of "
        f"{', '.join(classes)}, in that order.",
    ]
    if _bundle_temperature(run) is not None:
        lines.append("- The logits are divided by the run's fitted temperature first.")
    lines += ["", "## Evaluation", ""]
    if isinstance(metrics, dict) and metrics:
        split = metrics.get("split", "test")
        lines.append(f"On the run's {split} split ({metrics.get('n', '?')} volumes):")
        lines.append("")
        for key, value in metrics.items():
            if isinstance(value, dict) and isinstance(value.get("value"), (int, float)):
                ci = value.get("ci")
                ci_text = f" (95 % CI {ci[0]:.3f}–{ci[1]:.3f})" if ci and len(ci) == 2 else ""
                lines.append(f"- {key}: {value['value']:.3f}{ci_text}")
    else:
        lines.append(
            "Not evaluated: the run had no `metrics.json` when it was exported "
            f"(`medsight evaluate {run.path}`, then export again)."
        )
    n = metrics.get("n") if isinstance(metrics, dict) else None
    lines += ["", "## Limitations", ""]
    if isinstance(n, int) and n < 100:
        lines.append(f"- Small evaluation set ({n} volumes): every estimate is uncertain.")
    lines += [
        "- The test volumes come from the same collection as the training volumes: performance "
        "at other hospitals or on other scanners is untested.",
        f"- Volumes are resampled to {' × '.join(map(str, prep.size))} voxels: findings smaller "
        "than a few voxels at that size may be missed.",
        "- Probabilities are "
        + ("calibrated by temperature scaling" if _bundle_temperature(run) else "not calibrated")
        + "; do not read them as risks.",
    ]
    if getattr(prep, "tilt", "refuse") == "correct":
        lines.append(
            "- medsight resampled gantry-tilted CT series onto an orthogonal grid before this "
            "network saw them; the bundle reads NIfTI as it is: correct the tilt when you "
            "convert such series (e.g. dcm2niix does)."
        )
    lines += [
        "",
        "## Run it",
        "",
        "```python",
        "from monai.bundle import ConfigWorkflow",
        'workflow = ConfigWorkflow("configs/inference.json", meta_file="configs/metadata.json",',
        '                          workflow_type="infer", bundle_root=".",',
        '                          input_dir="scans", output_dir="eval")',
        "workflow.initialize(); workflow.run(); workflow.finalize()",
        "```",
        "",
        "`eval/predictions.csv` gets one row per volume: its path, then one probability per "
        "class. Give `datalist` (a list of NIfTI paths) instead of `input_dir` to choose files.",
        "",
        "Or from a shell, with MONAI's bundle runner (it needs `pip install fire`):",
        "",
        "```bash",
        "python -m monai.bundle run --config_file configs/inference.json \\",
        "    --meta_file configs/metadata.json --bundle_root . \\",
        "    --input_dir scans --output_dir eval",
        "```",
        "",
    ]
    return "\n".join(lines)
