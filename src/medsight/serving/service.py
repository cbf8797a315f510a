"""The model as the API sees it: uploaded bytes in, a typed prediction (or explanation) out.

:class:`ModelService` wraps a :class:`Predictor` with what serving adds: decoding uploads from
their content, the evaluated operating points (``metrics.json``), the model's identity for
audit trails, lazily loaded explanations, and a bound on how many uploads are decoded at once
(:class:`DecodeSlots`). What a prediction says and how urgent it is are the run's task's
(``decode``, ``triage``): triage watches the run's urgent outputs — classification's urgent
class (``classes.json`` ``positive``); a multi-label run's ``urgent`` findings
(``classes.json`` key ``"urgent"``, or ``medsight serve --urgent a,b``; all findings when
neither names any) — and records which of them set each study's urgency. It knows nothing about
HTTP.

Memory and time budget of one upload (what :class:`DecodeSlots` is sized from): decoding an
image of ``max_pixels`` pixels costs at most about :data:`BYTES_PER_PIXEL` bytes per pixel at its
peak (measured: an RGB PNG of 7745² = 60 M pixels, 170 KB on the wire, raised the server's
memory by 1.6 GB, 27 bytes per pixel, and took 7.5 s on one core), so one slot is budgeted
``BYTES_PER_PIXEL × max_pixels`` (1.9 GB at the default 60 M pixels). At most
``half the available memory ÷ that budget`` uploads (at least 1, at most the CPU count) are
decoded and scored at once; a request that finds every slot taken for ``wait`` seconds is
refused with :class:`Busy` (HTTP 503 with ``Retry-After``) rather than queued without bound.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medsight.data.imaging import DEFAULT_MAX_PIXELS, DecodedImage, sniff
from medsight.errors import ConfigError, ImageDecodeError, MedsightError
from medsight.serving.schemas import ModelRef, ThresholdFlag

if TYPE_CHECKING:  # torch comes with these: the server imports them only once it is listening
    from medsight.inference import Predictor

#: Side of the heat-map overlay PNG: large enough to read on a page, whatever the input size.
OVERLAY_SIDE = 384

log = logging.getLogger("medsight.serving")


#: The first bytes of a zip archive (a DICOM series uploaded to a 3-D run).
_ZIP = b"PK\x03\x04"


class UnsupportedImage(MedsightError):
    """The upload is not an image format medsight reads (HTTP 415)."""


class BadImage(MedsightError):
    """The upload looks like an image but cannot be decoded or used (HTTP 400)."""


class ExplanationsUnavailable(MedsightError):
    """Heat maps cannot be made here (``medsight.explain`` missing or failing) (HTTP 501)."""


class UnknownTarget(MedsightError):
    """An explanation asked for a class or finding the model does not have (HTTP 422)."""


class Busy(MedsightError):
    """Every decode slot is taken: try again in ``retry_after`` seconds (HTTP 503)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


#: Peak bytes per pixel of decoding and preprocessing one upload (27 measured, rounded up).
BYTES_PER_PIXEL = 32
#: The server's default pixel limit: 4096² (every radiograph, mammograms of 4096 × 3328
#: included), so that one upload costs at most ``BYTES_PER_PIXEL × SERVE_MAX_PIXELS`` = 512 MiB
#: (453 MB at the measured 27 bytes per pixel). Offline commands keep the decoder's 60 M.
SERVE_MAX_PIXELS = 4096 * 4096


def available_memory() -> int | None:
    """Bytes this process may still use: MemAvailable, capped by a cgroup limit; None if unknown."""
    found = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        with suppress(OSError, ValueError, AttributeError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    try:  # a container's limit is lower than the machine's free memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit.isdigit():
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def decode_slots_for(max_pixels: int, memory: int | None = None, cpus: int | None = None) -> int:
    """How many uploads may be decoded at once: half of ``memory`` (default: what is available
    now) divided by the budget of one upload, ``BYTES_PER_PIXEL × max_pixels``; at least 1, at
    most ``cpus`` (default: the CPU count); 2 when the memory is unknown.

    >>> decode_slots_for(60_000_000, memory=8 * 1024**3, cpus=8)
    2
    """
    memory = available_memory() if memory is None else memory
    cpus = cpus or os.cpu_count() or 1
    if memory is None:
        return min(2, cpus)
    return max(1, min(cpus, math.floor(memory / 2 / (BYTES_PER_PIXEL * max_pixels))))


class DecodeSlots:
    """A counting semaphore over uploads being decoded and scored, refusing rather than queuing
    without bound: :meth:`hold` waits at most ``wait`` seconds, then raises :class:`Busy`."""

    def __init__(self, slots: int, wait: float = 5.0):
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.slots = slots
        self.wait = wait
        self._semaphore = threading.BoundedSemaphore(slots)

    @contextmanager
    def hold(self) -> Iterator[None]:
        if self.wait > 0:
            acquired = self._semaphore.acquire(timeout=self.wait)
        else:
            acquired = self._semaphore.acquire(blocking=False)
        if not acquired:
            raise Busy(
                f"the server is already decoding {self.slots} upload(s), its limit for the "
                "memory it has; retry in a few seconds",
                retry_after=max(1, math.ceil(self.wait)),
            )
        try:
            yield
        finally:
            self._semaphore.release()


@dataclass
class Scored:
    """One decoded, preprocessed and scored upload."""

    image: DecodedImage
    x: np.ndarray  # (1, C, H, W) float32, the model input
    probabilities: np.ndarray  # (K,)
    seconds: float


class ModelService:
    """A loaded run ready to score uploads; safe to share between request threads.

    >>> service = ModelService(Predictor.from_run("runs/phantom"))    # doctest: +SKIP
    >>> service.score(open("scan.dcm", "rb").read()).probabilities    # doctest: +SKIP
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        slots: DecodeSlots | None = None,
        urgent: Sequence[str] | None = None,
    ):
        from medsight.runs import CLASSES, METRICS, WEIGHTS

        self.predictor = predictor
        self.run = predictor.run
        self.max_pixels = max_pixels
        self.task = predictor.task
        self.classes = list(predictor.classes_)
        self.positive = self.run.positive_class
        #: The threshold each output is decided by (multi-label findings), else None.
        self.thresholds = predictor.thresholds_
        #: The outputs triage watches (see :func:`urgent_outputs`).
        self.urgent = urgent_outputs(
            self.classes,
            self.positive,
            urgent if urgent else (_read_json(self.run.path / CLASSES) or {}).get("urgent"),
            "--urgent" if urgent else f"{self.run.path / CLASSES} 'urgent'",
        )
        if self.positive is not None:
            self.positive = self.urgent[0]
        self.metrics = _read_json(self.run.path / METRICS)
        self.model_ref = ModelRef(
            name=str(self.run.model_config.get("name", "unknown")),
            run=self.run.path.name,
            version=_weights_digest(self.run.path / WEIGHTS),
        )
        # One inference at a time: concurrent torch/ORT calls on a few cores only fight over
        # them (each call already uses every core), while decoding still runs in parallel.
        self._infer_lock = threading.Lock()
        self.slots = slots or DecodeSlots(decode_slots_for(max_pixels))
        self._explainer = None
        self._explainer_error: str | None = None
        self._explainer_lock = threading.Lock()

    @property
    def backend(self) -> str:
        return self.predictor.backend.name

    # ------------------------------------------------------------------ scoring

    def decode(self, data: bytes) -> DecodedImage:
        """Decode an upload from its content; raise :class:`UnsupportedImage` / :class:`BadImage`.

        The client's file name is never used: it may hold patient names or path tricks.
        """
        if not data:
            raise BadImage("the uploaded file is empty; send the image in the form field 'file'")
        kind = sniff(data[:512])
        volumes = self.predictor.dims == 3  # a NIfTI volume or a .zip of one DICOM series
        if volumes and kind not in ("nifti", "gzip", "raster", "dicom") and data[:4] != _ZIP:
            raise UnsupportedImage(
                "this model takes volumes: send a NIfTI file (.nii or .nii.gz) or a .zip of one "
                "DICOM series (judged from the content, not the name)"
            )
        if not volumes and kind is None:
            raise UnsupportedImage(
                "the upload is not a PNG, JPEG, TIFF, BMP or DICOM image (judged from its "
                "content, not its name); send one of those"
            )
        try:
            return self.predictor.read_bytes(data, max_pixels=self.max_pixels)
        except ImageDecodeError as exc:
            what = "the volume cannot be read" if volumes else "the image cannot be decoded"
            raise BadImage(f"{what}: {exc.reason}") from None

    def score(self, data: bytes) -> Scored:
        """Decode, preprocess and predict one upload."""
        start = time.perf_counter()
        image = self.decode(data)
        try:
            x = self.predictor.preprocess(image)[None]
        except MedsightError as exc:
            raise BadImage(f"the image cannot be prepared for the model: {exc}") from None
        with self._infer_lock:
            try:
                probs = self.predictor.predict_array(x)[0]
            except MedsightError as exc:  # e.g. NaN/inf pixels making NaN logits
                raise BadImage(f"the model cannot score this image: {exc}") from None
        return Scored(image, x, np.asarray(probs, dtype=np.float64), time.perf_counter() - start)

    def prediction(self, probs: np.ndarray, size: tuple[int, int] | None = None) -> dict:
        """One image's ``(K,)`` probabilities → its prediction, in the task's schema (each
        output against its threshold where the task has them); ``size``, the image's
        ``(height, width)``, places a detector's boxes in its pixels."""
        sizes = None if size is None else [tuple(size)]
        return self.predictor.decode(np.asarray(probs)[None], sizes=sizes)[0]

    def label(self, probs: np.ndarray) -> str:
        """The label of the task's prediction (what a reviewer confirms or corrects)."""
        return self.prediction(probs)["label"]

    def class_scores(self, probs: np.ndarray) -> np.ndarray:
        """``(K,)``: each class's probability (a detector's: its top box score)."""
        return self.task.column_values(np.asarray(probs)[None], self.classes)[0]

    def probabilities(self, probs: np.ndarray) -> dict[str, float]:
        return {name: round(float(p), 6) for name, p in zip(self.classes, self.class_scores(probs))}

    # ------------------------------------------------------------------ operating points

    def operating_points(self) -> dict[str, dict[str, dict]]:
        """``{class: {point: {threshold, sensitivity, ...}}}`` from metrics.json (may be empty)."""
        found = (self.metrics or {}).get("thresholds") or {}
        return {
            name: {k: v for k, v in points.items() if v and v.get("threshold") is not None}
            for name, points in found.items()
            if name in self.classes and points
        }

    def decision_point(self) -> str | None:
        """The evaluated operating point the thresholds were taken at (None without
        thresholds), as the task resolved the one asked for."""
        return None if self.thresholds is None else self.predictor.point

    def threshold_flags(self, probs: np.ndarray) -> list[ThresholdFlag]:
        """Every evaluated operating point, and whether this image's probability of its class
        (the probability column the task's metrics set the threshold on) reaches it."""
        flags = []
        scores = self.class_scores(probs)
        for name, points in self.operating_points().items():
            p = float(scores[self.classes.index(name)])
            for point, values in points.items():
                flags.append(
                    ThresholdFlag(
                        class_name=name,
                        operating_point=point,
                        threshold=float(values["threshold"]),
                        flagged=p >= float(values["threshold"]),
                        sensitivity=values.get("sensitivity"),
                        specificity=values.get("specificity"),
                    )
                )
        return flags

    def triage(self, probs: np.ndarray) -> tuple[float, str | None]:
        """The task's triage score of one image (the worklist order) and the class or finding
        that set it: classification's urgent class; for a multi-label run the urgent finding
        whose probability, against its own threshold, is highest (see
        :meth:`~medsight.tasks.multilabel.MultiLabelTask.triage`)."""
        return self.task.triage(
            probs, self.classes, self.positive, thresholds=self.thresholds, urgent=self.urgent
        )

    def urgency(self, probs: np.ndarray) -> float:
        """The task's triage score of one image (see :meth:`triage`)."""
        return self.triage(probs)[0]

    def flag(self, probs: np.ndarray, driver: str | None = None) -> str | None:
        """The strictest (highest-threshold) operating point reached by ``driver``, the class
        or finding that set the urgency (default: the urgent class)."""
        driver = driver or self.positive
        reached = [
            (f.threshold, f.operating_point)
            for f in self.threshold_flags(probs)
            if f.class_name == driver and f.flagged
        ]
        return max(reached)[1] if reached else None

    # ------------------------------------------------------------------ explanations

    def explainer(self):
        """The run's explainer, built on first use; :class:`ExplanationsUnavailable` if none."""
        with self._explainer_lock:
            if not self.task.explains:
                self._explainer_error = (
                    f"a {self.task.name} run shows where its finding is with its boxes "
                    "(/v1/predict); heat maps explain classifiers"
                )
            if self._explainer is None and self._explainer_error is None:
                try:
                    from medsight.explain import Explainer

                    self._explainer = Explainer.from_run(self.run.path, method="auto")
                    log.info("explanations: %s", self._explainer.choice)
                except ImportError as exc:
                    self._explainer_error = (
                        f"explanations are not available in this installation ({exc}); "
                        "install a medsight with the medsight.explain module"
                    )
                except Exception as exc:  # noqa: BLE001 - a broken explainer must not kill serving
                    self._explainer_error = f"explanations cannot be built for this run: {exc}"
            if self._explainer is None:
                raise ExplanationsUnavailable(self._explainer_error)
            return self._explainer

    def sanity(self, method: str) -> dict:
        """``sanity_rho`` and ``passes_sanity`` of ``method`` from the run's
        ``localisation.json`` (both None when it was not checked)."""
        from medsight.explain.faithfulness import passes_sanity
        from medsight.runs import LOCALISATION

        try:
            scores = json.loads((self.run.path / LOCALISATION).read_text())
            entry = (scores.get("sanity") or {}).get(method)
        except (OSError, ValueError, AttributeError):
            entry = None
        rho = ((entry or {}).get("spearman") or {}).get("value")
        chosen_by = getattr(self._explainer, "chosen_by", None)
        return {"sanity_rho": rho, "passes_sanity": passes_sanity(entry), "chosen_by": chosen_by}

    def explanations_available(self) -> bool:
        """True when ``medsight.explain`` can be imported (the explainer itself loads lazily)."""
        if self._explainer is not None:
            return True
        if self._explainer_error is not None or not self.task.explains:
            return False
        import importlib.util

        try:
            return importlib.util.find_spec("medsight.explain") is not None
        except (ImportError, ValueError):
            return False

    def check_target(self, target: str | None) -> None:
        """Raise :class:`UnknownTarget` unless ``target`` is None or a class (finding)."""
        if target is not None and target not in self.classes:
            raise UnknownTarget(
                f"class {target!r} is not an output of this model; use one of: "
                f"{', '.join(self.classes)}"
            )

    def explain_target(self, probs: np.ndarray, target: str | None = None) -> str:
        """The class or finding a heat map explains: ``target`` (checked), else the task's
        first (most probable) explanation target — the predicted class, or the most probable
        finding above its threshold."""
        self.check_target(target)
        if target is not None:
            return target
        return self.task.explain_targets(probs, self.classes, self.thresholds)[0]

    def reviewer_label(self, text: str | None) -> str | None:
        """A reviewer's label, checked against the model's outputs: a class; for a run whose
        outputs each have a threshold (findings), the findings present joined by ``|`` (put in
        the model's finding order, so that agreement compares like with like) or
        ``"no finding"``. Raises :class:`UnknownTarget` naming what is allowed."""
        if text is None:
            return None
        if self.thresholds is None:
            if text not in self.classes:
                raise UnknownTarget(
                    f"reviewer_label {text!r} is not a class of this model; "
                    f"use one of: {', '.join(self.classes)}"
                )
            return text
        from medsight.data.findings import NO_FINDING, SEPARATOR

        parts = [part.strip() for part in text.split(SEPARATOR)]
        if parts == [NO_FINDING]:
            return NO_FINDING
        unknown = [part for part in parts if part not in self.classes]
        if unknown or not parts:
            raise UnknownTarget(
                f"reviewer_label {text!r} names {', '.join(map(repr, unknown))}, not findings "
                f"of this model; give the findings present joined by '{SEPARATOR}' "
                f"(findings: {', '.join(self.classes)}) or '{NO_FINDING}'"
            )
        return SEPARATOR.join(name for name in self.classes if name in parts)

    def explain(
        self, scored: Scored, target: str | None = None
    ) -> tuple[str, str | None, str, str]:
        """``(method, layer, base64 PNG, target)`` of the heat map over the image for a scored
        upload: the map of ``target`` (a class or finding; see :meth:`explain_target`)."""
        explainer = self.explainer()  # first: a task without heat maps (boxes) says so, 501
        target = self.explain_target(scored.probabilities, target)
        try:
            from medsight.explain.overlay import overlay, overlay_volume

            with self._infer_lock:
                heatmap = np.asarray(explainer.explain(scored.x, target=target), dtype=np.float32)
            caption = _caption(self.prediction(scored.probabilities))
            if self.thresholds is not None:  # one map per output: say whose this is
                k = self.classes.index(target)
                caption = f"map: {target} {scored.probabilities[k]:.0%}"
            image = scored.image
            if self.predictor.dims == 3:  # shown on the map's grid: the prepared volume
                prepared = self.predictor.preprocess.prepare(image)
                slab = getattr(self.predictor.preprocess, "slices", None)
                if slab is None:
                    picture = overlay_volume(prepared, heatmap, label=caption)
                    return self._explained(explainer, picture, target)
                image = DecodedImage(prepared[slab // 2][None], "upload")  # the slab's middle
            display = _display_image(self.predictor, image)
            heatmap = _resize(heatmap, display.shape[:2])
            picture = overlay(display, heatmap, label=caption)
        except ExplanationsUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - an explainer failure is reported, never a 500
            raise ExplanationsUnavailable(f"the heat map could not be computed: {exc}") from exc
        return self._explained(explainer, picture, target)

    @staticmethod
    def _explained(explainer, picture, target: str) -> tuple[str, str | None, str, str]:
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        method = str(getattr(explainer, "method", "unknown"))
        layer = getattr(explainer, "layer", None)
        return (
            method,
            (str(layer) if layer is not None else None),
            base64.b64encode(buffer.getvalue()).decode("ascii"),
            target,
        )


def urgent_outputs(
    classes: list[str], positive: str | None, urgent: Sequence[str] | str | None, source: str
) -> list[str]:
    """The classes (findings) triage watches, in class order: ``urgent`` (a list, or names
    joined by commas) when given, else the urgent class ``positive``, else every output.
    A run with one urgent class (classification) takes exactly one. Names that are not
    outputs of the run are refused, naming ``source`` and the outputs."""
    if isinstance(urgent, str):
        urgent = [name.strip() for name in urgent.split(",") if name.strip()]
    if not urgent:
        return [positive] if positive is not None else list(classes)
    names = [str(name).strip() for name in urgent]
    unknown = [name for name in names if name not in classes]
    if unknown:
        raise ConfigError(
            f"{source} names {', '.join(map(repr, unknown))}, not outputs of this run; "
            f"choose among: {', '.join(classes)}"
        )
    if positive is not None and len(set(names)) != 1:
        raise ConfigError(
            f"{source} names {len(set(names))} classes; a classification run has one urgent "
            f"class (the one its worklist is ordered by): name one of {', '.join(classes)}"
        )
    return [name for name in classes if name in names]


def _display_image(predictor: Predictor, image: DecodedImage) -> np.ndarray:
    """The image as the model saw it (channels, aspect), at a size people can look at."""
    import torch
    import torch.nn.functional as F

    pixels = np.clip(image.pixels, 0.0, 1.0)
    pixels = pixels if pixels.shape[0] in (1, 3) else pixels[:1]
    side = max(OVERLAY_SIDE, *predictor.preprocess.size)
    tensor = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None]
    tensor = F.interpolate(tensor, size=(side, side), mode="bilinear", antialias=True)
    out = tensor[0].clamp(0, 1).numpy()
    return out[0] if out.shape[0] == 1 else out.transpose(1, 2, 0)


def _resize(heatmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if heatmap.shape == tuple(shape):
        return heatmap
    picture = Image.fromarray(np.asarray(heatmap, dtype=np.float32))
    resized = picture.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _caption(decoded: dict) -> str:
    """The overlay's caption: the prediction's label, and its confidence where it has one."""
    confidence = decoded.get("confidence")
    return decoded["label"] + ("" if confidence is None else f" {confidence:.0%}")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        return None


def _weights_digest(path: Path) -> str:
    if not path.exists():
        return "unknown"
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]
