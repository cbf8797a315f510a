"""Predict exactly as training did, from a run directory alone.

``Predictor.from_run(RUN)`` rebuilds the network from ``model.json`` + ``model.safetensors``
and the input pipeline from ``preprocess.json``; callers never re-implement preprocessing.
The network runs on a *backend*: torch (the default) or ONNX Runtime
(``backend="onnx"``, from ``RUN/model.onnx``, exported on first use). Both turn a preprocessed
batch into logits; the run's task turns logits into probabilities (through its calibration)
and probabilities into predictions, the same way for both. A task that decides each output by
its own threshold (multi-label findings) takes it from the run's evaluated operating points
(``metrics.json`` ``thresholds``, Youden's point by default), else 0.5.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from medsight.data.datasets import ImageDataset
from medsight.data.imaging import DEFAULT_MAX_PIXELS, decode, decode_bytes
from medsight.data.sources import python_strings
from medsight.devices import describe
from medsight.errors import ConfigError, DataError, MedsightError
from medsight.runs import METRICS, WEIGHTS, Run
from medsight.tasks import Task, get_task

#: Names accepted by ``Predictor.from_run(..., backend=)``.
BACKENDS: tuple[str, ...] = ("torch", "onnx")
#: The evaluated operating point a thresholded task (multi-label) decides its outputs at.
DEFAULT_POINT = "youden"


def operating_points(run: Run) -> dict[str, dict[str, dict]]:
    """``{class: {point: {threshold, sensitivity, ...}}}`` from the run's ``metrics.json``
    (``thresholds``), points without a threshold left out; empty when the run was not
    evaluated (or the file cannot be read)."""
    try:
        found = json.loads((run.path / METRICS).read_text()).get("thresholds") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(found, dict):
        return {}
    return {
        name: {
            k: v
            for k, v in points.items()
            if isinstance(v, dict) and v.get("threshold") is not None
        }
        for name, points in found.items()
        if name in run.classes and isinstance(points, dict) and points
    }


class Backend(Protocol):
    """What runs the network: a preprocessed float32 ``(N, C, H, W)`` batch → ``(N, K)`` logits."""

    name: str

    def logits(self, x: np.ndarray) -> np.ndarray: ...


class TorchBackend:
    """The torch module itself, in eval mode, on ``device``."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu"):
        from medsight.devices import resolve_device

        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def logits(self, x: np.ndarray) -> np.ndarray:
        tensor = torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)
        return self.model(tensor).float().cpu().numpy()


class OnnxBackend:
    """An ONNX Runtime session on an exported ``model.onnx``: its CUDA provider on a GPU
    device when installed, else the CPU (:attr:`providers_note` says which, and why).

    Tuned for CPU inference: all graph optimisations, one intra-op thread per core, sequential
    execution. A model exported with a fixed batch size is fed that many images at a time.
    """

    name = "onnx"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        import onnxruntime as ort

        from medsight.devices import onnx_providers, resolve_device

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = os.cpu_count() or 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only
        self.path = Path(path)
        asked = resolve_device(device)
        providers, self.providers_note = onnx_providers(asked)
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        #: The device the session runs on (ONNX Runtime falls back to the CPU silently).
        on_gpu = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.device = asked if on_gpu else torch.device("cpu")
        if asked.type == "cuda" and not on_gpu:
            if "not installed" not in self.providers_note:  # installed, but it did not start
                self.providers_note = "ONNX Runtime on the CPU: its CUDA provider did not start"
            warnings.warn(self.providers_note, UserWarning, stacklevel=2)
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        batch = first.shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = self.fixed_batch
        if step is None or len(x) == step:
            return self.session.run(None, {self.input_name: x})[0]
        if len(x) % step:
            raise ConfigError(
                f"{self.path} was exported for batches of {step}, got {len(x)} images; "
                "re-export it with a dynamic batch (medsight export RUN)"
            )
        chunks = [
            self.session.run(None, {self.input_name: x[i : i + step]})[0]
            for i in range(0, len(x), step)
        ]
        return np.concatenate(chunks)


def _onnx_backend(run: Run, device: str | torch.device = "cpu") -> OnnxBackend:
    """The run's ``model.onnx``, exported first when missing or older than the weights.

    A stale file (older than ``model.safetensors``, e.g. after ``--resume``) is never used:
    it is re-exported, with a warning, because silently serving old weights is worse than the
    second or so an export takes.
    """
    from medsight.export import EXPORT_FILES, export_run

    path = run.path / EXPORT_FILES["onnx"]
    if path.exists() and path.stat().st_mtime_ns < (run.path / WEIGHTS).stat().st_mtime_ns:
        warnings.warn(
            f"{path} is older than {WEIGHTS} (the weights changed since it was exported);"
            " re-exporting it",
            UserWarning,
            stacklevel=3,
        )
        export_run(run.path, format="onnx")
    elif not path.exists():
        export_run(run.path, format="onnx")
    return OnnxBackend(path, device)


#: Test-time augmentation modes: the prediction is the mean over these views of the image.
TTA_MODES: dict[str, str] = {
    "flip": "the image and its left-right mirror",
    "rot": "the image turned by 0, 90, 180 and 270 degrees",
}
#: Training augmentation presets (the modality) under which a TTA view is a valid image.
_TTA_VALID = {"flip": ("ct", "mri", "derm", "histo"), "rot": ("derm", "histo")}
_TTA_WHY = {
    "xray": "chest X-rays carry laterality (the heart is on the left)",
    "ct": "CT and MRI slices have a fixed anterior-posterior orientation",
    "mri": "CT and MRI slices have a fixed anterior-posterior orientation",
}


def check_tta(tta: str | None, run: Run) -> str | None:
    """The TTA mode to use with ``run``, or None; refuses a view that is not a valid image of
    the run's modality (its augmentation preset) and warns when the modality is unknown."""
    if tta is None or str(tta).strip().lower() in ("", "none"):
        return None
    if not get_task(getattr(run, "task", None)).averages_views:
        raise ConfigError(
            f"--tta averages outputs of transformed views; a {run.task} run's outputs (boxes) "
            "cannot be averaged that way: leave --tta out"
        )
    if getattr(run.preprocess, "dims", 2) == 3:
        raise ConfigError(
            "--tta views are 2-D flips and turns of images; a 3-D run has none: leave --tta out"
        )
    mode = str(tta).strip().lower()
    if mode not in TTA_MODES:
        raise ConfigError(f"--tta {tta!r} is not known; choose one of: {', '.join(TTA_MODES)}")
    preset = run.config.optim.augment
    if preset in _TTA_WHY and preset not in _TTA_VALID[mode]:
        raise ConfigError(
            f"--tta {mode} would show the model images that cannot occur: {_TTA_WHY[preset]} "
            f"(the run was trained with --augment {preset}); valid for: "
            f"{', '.join(_TTA_VALID[mode])}"
        )
    if preset not in _TTA_VALID[mode]:
        warnings.warn(
            f"the run's modality is not recorded (--augment {preset}), so medsight cannot check "
            f"that --tta {mode} ({TTA_MODES[mode]}) gives valid images; use it only where "
            "orientation carries no meaning",
            UserWarning,
            stacklevel=3,
        )
    if mode == "rot" and run.preprocess.size[0] != run.preprocess.size[1]:
        raise ConfigError(f"--tta rot needs square inputs; the run takes {run.preprocess.size}")
    return mode


def tta_views(x: np.ndarray, mode: str | None) -> list[np.ndarray]:
    """The views of a ``(N, C, H, W)`` batch that ``mode`` averages over (the batch first)."""
    if mode is None:
        return [x]
    if mode == "flip":
        return [x, np.ascontiguousarray(x[..., ::-1])]
    return [x] + [np.ascontiguousarray(np.rot90(x, k, axes=(-2, -1))) for k in (1, 2, 3)]


class Predictor:
    """Probabilities for raw files, SampleTables or preprocessed batches, as the run's task
    makes them (:attr:`task`).

    >>> predictor = Predictor.from_run("runs/phantom")             # doctest: +SKIP
    >>> predictor.predict_files(["scan.dcm"]).round(3)              # doctest: +SKIP
    array([[0.02 , 0.031, 0.949]], dtype=float32)
    """

    def __init__(
        self,
        run: Run,
        model: torch.nn.Module | None = None,
        device: str | torch.device = "cpu",
        *,
        backend: Backend | None = None,
        tta: str | None = None,
        point: str = DEFAULT_POINT,
    ):
        if (model is None) == (backend is None):
            raise ConfigError("Predictor needs a torch model or a backend (exactly one of them)")
        self.run = run
        #: The run's task: it turns logits into probabilities and those into predictions.
        self.task: Task = get_task(run.task)
        self.backend: Backend = backend if backend is not None else TorchBackend(model, device)
        #: The torch module (None when another backend runs the network).
        self.model = getattr(self.backend, "model", None)
        self.device = getattr(self.backend, "device", torch.device("cpu"))
        #: Where the network runs, in words: ``torch on cpu (2 cores)``, or ONNX Runtime's
        #: provider and, when it fell back to the CPU, why.
        self.runs_on: str = getattr(self.backend, "providers_note", None) or (
            f"{self.backend.name} on {describe(self.device)}"
        )
        self.classes_ = list(run.classes)
        self.preprocess = run.preprocess
        self.calibration = run.calibration()
        #: Test-time augmentation (:data:`TTA_MODES`) applied by the ``predict_*`` methods.
        self.tta = check_tta(tta, run)
        #: The evaluated operating point thresholds are taken from (thresholded tasks), as
        #: the task names it (a detector reads the default ``youden`` as its own ``fp_1``).
        self.point = self.task.decision_point(point)
        #: The threshold each output is decided by, in class order (multi-label: per finding,
        #: from ``metrics.json`` at :attr:`point`, else 0.5); None when the task decides
        #: without thresholds (classification: the most probable class).
        points = operating_points(run)
        self.thresholds_: list[float] | None = self.task.decision_thresholds(
            self.classes_, points, point
        )
        #: Where :attr:`thresholds_` come from, in words (None without thresholds).
        self.thresholds_from_: str | None = None
        if self.thresholds_ is not None:
            self.thresholds_from_ = (
                f"metrics.json, operating point {self.point}"
                if points
                else "0.5 each: the run has not been evaluated"
            )

    @classmethod
    def from_run(
        cls,
        path: str | Path,
        backend: str = "torch",
        tta: str | None = None,
        point: str = DEFAULT_POINT,
        device: str | torch.device = "cpu",
    ) -> Predictor:
        """Load a run for prediction on ``backend``: ``"torch"`` or ``"onnx"`` (ONNX Runtime),
        on ``device`` (:func:`medsight.devices.resolve_device`: ``auto``, ``cpu``, ``cuda:N``;
        ONNX Runtime uses its CUDA provider on a GPU when installed, else the CPU).
        ``tta`` (``"flip"`` or ``"rot"``) averages the probabilities of transformed views.
        ``point``: the evaluated operating point whose thresholds decide a multi-label run's
        findings (``youden``, ``sensitivity_0.90``...; 0.5 when the run was not evaluated).

        ``"onnx"`` uses ``RUN/model.onnx``, exporting it first when it is missing or older than
        ``model.safetensors`` (with a warning); without onnxruntime installed it warns and
        falls back to torch.
        """
        name = backend.strip().lower() if isinstance(backend, str) else backend
        if name not in BACKENDS:
            raise ConfigError(
                f"backend {backend!r} is not known; choose one of: {', '.join(BACKENDS)}"
            )
        run = Run.load(path)
        if name == "onnx":
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                warnings.warn(
                    "onnxruntime is not installed; using the torch backend",
                    UserWarning,
                    stacklevel=2,
                )
            else:
                backend_ = _onnx_backend(run, device)
                return cls(run, backend=backend_, tta=tta, point=point)
        return cls(run, run.load_model(), device, tta=tta, point=point)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(1, C, H, W)``: one preprocessed image; ``(1, C, X, Y, Z)`` for a 3-D run."""
        return (1, self.preprocess.channels, *self.preprocess.size)

    def logits_array(self, x: np.ndarray) -> np.ndarray:
        """A preprocessed float32 ``(N, C, H, W)`` batch → ``(N, K)`` raw logits."""
        return self.backend.logits(x)

    def predict_array(self, x: np.ndarray) -> np.ndarray:
        """A preprocessed float32 ``(N, C, H, W)`` batch → ``(N, K)`` probabilities.

        When the run holds a calibration (``medsight evaluate --calibrate``), it is applied;
        with :attr:`tta`, the calibrated probabilities of every view are averaged.
        """
        views = tta_views(np.asarray(x, dtype=np.float32), self.tta)
        if len(views) == 1:
            return self.probabilities(self.logits_array(views[0]))
        return np.mean([self.probabilities(self.logits_array(v)) for v in views], axis=0)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Logits → probabilities (the task's), through the run's calibration when it has one.

        Raises :class:`~medsight.errors.DataError` when a row of logits holds NaN or infinity.
        """
        z = np.asarray(logits)
        if not np.isfinite(z).all():
            row = int(np.flatnonzero(~np.isfinite(z.reshape(len(z), -1)).all(axis=1))[0])
            raise DataError(f"logits row {row} holds NaN or infinity: {z[row].tolist()}")
        return self.task.probabilities(logits, self.calibration)

    def decode(
        self, probs: np.ndarray, sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[dict]:
        """``(N, K)`` probabilities → one prediction per row, in the task's schema (each
        output against :attr:`thresholds_` when the task has thresholds). ``sizes``: each
        row's original ``(height, width)``, which places a detector's boxes in its pixels."""
        kwargs: dict = {} if sizes is None else {"sizes": sizes}
        if self.thresholds_ is not None:
            kwargs["thresholds"] = self.thresholds_
        return self.task.decode(probs, self.classes_, **kwargs)

    def _no_rows(self) -> np.ndarray:
        return np.zeros((0, *self.task.output_shape(self.classes_)), np.float32)

    @property
    def dims(self) -> int:
        """2: the run takes images; 3: volumes."""
        return int(getattr(self.preprocess, "dims", 2))

    def read(self, path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS):
        """One file as the run takes it: a :class:`~medsight.data.imaging.DecodedImage`, or for
        a 3-D run a :class:`~medsight.data.volumes.Volume` (NIfTI, DICOM series folder)."""
        if self.dims == 3:
            from medsight.data.volumes import read_volume

            return read_volume(str(path), max_pixels=max_pixels)
        return decode(str(path), max_pixels=max_pixels, **self.preprocess.decode_options())

    def read_bytes(self, data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name="upload"):
        """:meth:`read` for an in-memory file (format judged from its content)."""
        if self.dims == 3:
            from medsight.data.volumes import read_volume_bytes

            return read_volume_bytes(data, name=name, max_pixels=max_pixels)
        return decode_bytes(
            data, name=name, max_pixels=max_pixels, **self.preprocess.decode_options()
        )

    def predict_files(self, paths: Sequence[str | Path]) -> np.ndarray:
        """Raw image files (any format medsight reads; volumes for a 3-D run) → ``(N, K)``
        probabilities."""
        batch = np.stack([self.preprocess(self.read(p)) for p in paths])
        return self.predict_array(batch)

    def predict_bytes(self, data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """One in-memory file (format judged from its content) → ``(K,)`` probabilities.

        Raises :class:`~medsight.errors.ImageDecodeError` when it is not a readable image
        (for a 3-D run: a NIfTI volume or a .zip of one DICOM series).
        """
        image = self.read_bytes(data, max_pixels=max_pixels)
        return self.predict_array(self.preprocess(image)[None])[0]

    def predict_table(self, table: pd.DataFrame, batch_size: int = 256) -> np.ndarray:
        """Every row of a SampleTable → ``(N, K)`` probabilities, in row order."""
        if self.tta is None:
            return self.probabilities(self.logits_table(table, batch_size))
        unlabelled = table.assign(label=None)
        dataset = ImageDataset(unlabelled, self.preprocess, self.classes_, cache_max_side=0)
        chunks = [self.predict_array(x.numpy()) for x, _ in DataLoader(dataset, batch_size)]
        return np.concatenate(chunks) if chunks else self._no_rows()

    def logits_table(self, table: pd.DataFrame, batch_size: int = 256) -> np.ndarray:
        """Every row of a SampleTable → ``(N, K)`` raw logits, in row order."""
        unlabelled = table.assign(label=None)  # labels play no part in prediction
        dataset = ImageDataset(unlabelled, self.preprocess, self.classes_, cache_max_side=0)
        chunks = [self.logits_array(x.numpy()) for x, _ in DataLoader(dataset, batch_size)]
        return np.concatenate(chunks) if chunks else self._no_rows()


def predict_paths(
    run: str | Path,
    paths: Sequence[str | Path],
    *,
    backend: str = "torch",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    batch_size: int = 64,
    tta: str | None = None,
    point: str = DEFAULT_POINT,
    device: str = "cpu",
) -> pd.DataFrame:
    """Predict image files with a run: one row per file (``file``, the single-valued fields of
    the task's prediction, its probability columns, ``error``; for classification ``file,
    label, confidence, p_<class>..., error``; for multi-label ``file, label, confidence,
    p_<finding>..., error``, the label naming the findings above their thresholds, which are
    taken at the evaluated operating ``point``). A file that cannot be read, or whose outputs
    hold NaN or infinity (NaN or infinite pixels), gets its reason in ``error`` and an empty
    prediction; every other file is predicted as if it were alone.

    >>> predict_paths("runs/phantom", ["a.png", "b.dcm"]).label.tolist()   # doctest: +SKIP
    ['lesion', 'normal']
    """
    predictor = Predictor.from_run(run, backend=backend, tta=tta, point=point, device=device)
    task = predictor.task
    # A table cell holds one value: list fields (multi-label "findings") are the probability
    # columns and the label already.
    fields = {
        name: field
        for name, field in task.prediction_schema.model_fields.items()
        if field.annotation in (str, float, int, bool)
    }
    # List fields a table shows as JSON text (a detector's boxes).
    as_json = [
        name
        for name, field in task.prediction_schema.model_fields.items()
        if (field.json_schema_extra or {}).get("table") == "json"
    ]
    columns = task.prediction_columns(predictor.classes_)
    # An unreadable file's prediction is empty: "" for text fields, NaN for numbers.
    empty = {name: "" if field.annotation is str else np.nan for name, field in fields.items()}
    empty.update(dict.fromkeys(as_json, ""))
    rows: list[dict] = []
    ready: list[tuple[int, np.ndarray]] = []
    sizes: dict[int, tuple[int, int]] = {}
    for path in paths:
        row: dict = {"file": str(path), **empty, **dict.fromkeys(columns, np.nan), "error": ""}
        try:
            image = predictor.read(path, max_pixels=max_pixels)
            sizes[len(rows)] = image.shape if predictor.dims == 3 else image.size
            ready.append((len(rows), predictor.preprocess(image)))
        except MedsightError as exc:
            row["error"] = str(exc)
        except OSError as exc:  # e.g. a file that is not readable by this user
            row["error"] = f"{path}: cannot read it: {exc.strerror or exc}"
        rows.append(row)
    for start in range(0, len(ready), batch_size):
        chunk = ready[start : start + batch_size]
        for (i, x), probs in zip(chunk, _probabilities(predictor, [x for _, x in chunk])):
            if probs is None:
                pixels = "" if np.isfinite(x).all() else "; its pixel values hold NaN or infinity"
                rows[i]["error"] = (
                    f"{rows[i]['file']}: the model's outputs hold NaN or infinity{pixels}"
                )
                continue
            decoded = predictor.decode(probs[None], sizes=[sizes[i]])[0]
            rows[i].update({name: decoded[name] for name in fields})
            rows[i].update({name: json.dumps(decoded[name]) for name in as_json})
            values = task.column_values(probs[None], predictor.classes_)[0]
            rows[i].update({name: float(v) for name, v in zip(columns, values)})
    with python_strings():  # a file name that is not UTF-8 still gets its row
        table = pd.DataFrame(rows, columns=["file", *fields, *as_json, *columns, "error"])
    table.attrs["json_columns"] = as_json  # cells holding JSON text (boxes)
    if predictor.thresholds_ is not None:
        table.attrs["thresholds"] = dict(zip(predictor.classes_, predictor.thresholds_))
        table.attrs["thresholds_from"] = predictor.thresholds_from_
    return table


def _probabilities(predictor: Predictor, images: list[np.ndarray]) -> list[np.ndarray | None]:
    """Each image's probabilities, None where the outputs hold NaN or infinity: the batch at
    once, and image by image only when some image's outputs are not finite."""
    try:
        return list(predictor.predict_array(np.stack(images)))
    except DataError:  # the task refuses non-finite outputs; find whose they are
        if len(images) == 1:
            views = tta_views(images[0][None], predictor.tta)
            if all(np.isfinite(predictor.logits_array(v)).all() for v in views):
                raise  # refused for another reason: not this image's outputs
            return [None]
    return [_probabilities(predictor, [x])[0] for x in images]
