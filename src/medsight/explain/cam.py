"""Saliency maps for a trained classifier: the CAM family, Integrated Gradients, attention.

:class:`Explainer` turns one preprocessed image into a heat-map in ``[0, 1]`` at the model's
input size, with one of :data:`METHODS`. The CAM family comes from pytorch-grad-cam, Integrated
Gradients from captum, and ``attention`` reads the model's own token-attention maps
(:mod:`medsight.explain.attention_maps`). The target layer is chosen per architecture from what
the model traced about itself (``MedsightClassifier.cam_layer_name``: the last conv stage, or
the attention block on a backbone), the most common thing users get wrong with Grad-CAM.

>>> explainer = Explainer.from_run("runs/phantom", method="gradcam")     # doctest: +SKIP
>>> heatmap = explainer.explain(x)          # x: (1, C, H, W) float32, as Predictor takes
>>> heatmap.shape, float(heatmap.max())     # doctest: +SKIP
((64, 64), 1.0)
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsight import runs
from medsight.errors import ConfigError, DataError
from medsight.explain.attention_maps import (
    TOKEN_BLOCKS,
    attention_maps,
    default_block,
    no_attention_message,
    token_blocks,
)

__all__ = [
    "CAM_METHODS",
    "METHODS",
    "Explainer",
    "best_method",
    "choose_best",
    "candidate_layers",
    "check_method",
    "default_layer",
    "layer_map_sizes",
]

#: pytorch-grad-cam classes by medsight method name.
CAM_METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "scorecam": "ScoreCAM",
    "eigencam": "EigenCAM",
    "layercam": "LayerCAM",
}
#: Every method :class:`Explainer` knows, in the order tables list them.
METHODS: tuple[str, ...] = (*CAM_METHODS, "ig", "attention")
#: What ``auto`` uses on a 3-D run not scored against masks, on the network's first stage:
#: the late stages of a 3-D network are a few voxels a side, and plain Grad-CAM scored 0 on the
#: 3-D phantom at every layer (benchmarks/README.md, "The default maps, before → after").
VOLUME_DEFAULT_METHOD = "gradcam++"
#: Convolutions whose maps the CAM family can weight (images and volumes).
_CONVS = (nn.Conv2d, nn.Conv3d)
#: What ``method="auto"`` uses on a run not scored against masks (with its default layer).
DEFAULT_METHOD = "gradcam"
#: Integrated Gradients: Riemann steps along the path from the baseline.
IG_STEPS = 32
#: Integrated Gradients maps are smoothed with a Gaussian this wide (fraction of the image side):
#: pixel attributions are speckled, and a point metric (the pointing game) would read the speckle.
IG_SMOOTH = 1 / 32
#: Images per forward pass when Score-CAM scores its masked inputs.
SCORECAM_BATCH = 64


#: Methods that take images only.
VOLUME_UNSUPPORTED = ("scorecam",)


def volume_methods() -> list[str]:
    """The methods that explain a 3-D network's volumes."""
    return [m for m in METHODS if m not in VOLUME_UNSUPPORTED and m != "attention"]


def check_method(method: str) -> str:
    """The canonical name of ``method`` (case and spaces ignored; ``grad-cam`` works too)."""
    key = method.strip().lower() if isinstance(method, str) else ""
    key = key.replace("-", "").replace("_", "").replace(" ", "")
    aliases = {"gradcampp": "gradcam++", "gradcamplusplus": "gradcam++"}
    aliases["integratedgradients"] = "ig"
    key = aliases.get(key, key)
    if key not in METHODS:
        raise ConfigError(
            f"explanation method {method!r} is not known; choose one of: {', '.join(METHODS)}"
            " (or auto)"
        )
    return key


def best_method(run_path: str | Path) -> str | None:
    """The best method of ``RUN/localisation.json`` (:func:`choose_best`), or None when the
    run has not been scored."""
    path = Path(run_path) / runs.LOCALISATION
    try:
        scores = json.loads(path.read_text())
        methods = scores.get("methods") or {}
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        return None
    known = {m: s for m, s in methods.items() if m in METHODS}
    return choose_best(known, scores.get("sanity") or {}) if known else None


def choose_best(methods: dict[str, dict], sanity: dict[str, dict]) -> str:
    """The method with the highest pointing game (energy in mask breaks ties) among those that
    pass the randomisation check, or were not checked; only when every checked method fails,
    the highest of all (the report and ``localisation.json`` say it failed)."""
    from medsight.explain.faithfulness import passes_sanity

    eligible = [m for m in methods if passes_sanity(sanity.get(m)) is not False] or list(methods)
    return max(eligible, key=lambda m: rank_key(methods[m]))


def rank_key(scores: dict | None) -> tuple[float, float]:
    """How methods are ranked: pointing game, then energy in mask (missing values last)."""
    scores = scores if isinstance(scores, dict) else {}
    return tuple(
        float((scores.get(m) or {}).get("value") or -1.0)
        for m in ("pointing_game", "energy_in_mask")
    )


def _first_stage(model: nn.Module) -> str | None:
    """The first stage of a network with a module of its own (None: the default layer)."""
    outputs = getattr(model, "stage_outputs", lambda: [])()
    first = next((name for name in outputs if name is not None), None)
    return f"backbone.{first}" if first else None


def _scored_layer(run_path: Path, method: str) -> str | None:
    """The layer ``method`` was scored with in ``RUN/localisation.json`` (``--layer`` then), so
    ``auto`` reuses the combination that localised best."""
    try:
        entry = json.loads((Path(run_path) / runs.LOCALISATION).read_text())["methods"][method]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None
    layer = entry.get("layer") if isinstance(entry, dict) else None
    return None if layer in (None, "input") else str(layer)


# --------------------------------------------------------------------------- layers


def candidate_layers(model: nn.Module) -> list[str]:
    """Layer names worth explaining: the backbone's stages and the attention blocks.

    Modules at most two levels deep that hold a convolution, plus every token-attention block.
    """
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, TOKEN_BLOCKS) or (
            name.count(".") <= 1 and any(isinstance(m, _CONVS) for m in module.modules())
        ):
            names.append(name)
    return names


#: How many of a backbone's last stages (after the stem) a fused map averages over: on 64 px
#: custom CNNs the 32, 16 and 8 px maps; a fourth, finer stage follows image edges whatever the
#: weights (benchmarks/README.md, "Which layer, under the sanity check").
FUSED_STAGES = 3


def fused_stages(model: nn.Module) -> str | None:
    """The last :data:`FUSED_STAGES` backbone stages after the stem, comma-joined (a fused
    target for the CAM family: pytorch-grad-cam averages their maps), or None when the model
    has fewer than two such stages."""
    outputs = getattr(model, "stage_outputs", lambda: [])()[1:]  # the stem first: left out
    stages = [f"backbone.{name}" for name in outputs if name is not None]
    return ",".join(stages[-FUSED_STAGES:]) if len(stages) >= 2 else None


def default_layer(model: nn.Module, method: str) -> str:
    """The target layer ``method`` uses on ``model`` when none is given.

    ``gradcam``: its map fused over the backbone's last stages (:func:`fused_stages`), the
    default that localised best among maps passing the sanity check in the benchmarks. The rest
    of the CAM family: the model's own choice (``cam_layer_name``: the attention block on a
    backbone, else the last conv stage); their fused maps fail the sanity check. A plain module:
    its last ``Conv2d``. ``ig``: ``"input"``. ``attention``: the last token-attention block.
    """
    method = check_method(method)
    if method == "ig":
        return "input"
    if method == "attention":
        return default_block(model)
    if method == DEFAULT_METHOD and fused_stages(model):
        return fused_stages(model)
    if hasattr(model, "cam_layer_name"):
        return model.cam_layer_name()
    convs = [name for name, m in model.named_modules() if isinstance(m, _CONVS)]
    if not convs:
        raise ConfigError(
            f"{type(model).__name__} has no convolution for the CAM methods; pass layer= with"
            " the name of a module that outputs a (B, C, H, W) or (B, C, X, Y, Z) map"
        )
    return convs[-1]


def _check_layer(model: nn.Module, layer: str, method: str) -> str:
    if "," in layer and method not in ("ig", "attention"):
        # several target layers (an ensemble's members): pytorch-grad-cam averages their maps
        return ",".join(_check_layer(model, part.strip(), method) for part in layer.split(","))
    modules = dict(model.named_modules())
    if method == "ig":
        if layer not in ("input", ""):
            raise ConfigError(
                f"--layer {layer!r} does not apply to ig: Integrated Gradients attributes to the"
                " input pixels; leave the layer out or choose a CAM method"
            )
        return "input"
    if layer not in modules or not layer:
        candidates = candidate_layers(model)
        close = difflib.get_close_matches(layer, list(modules), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(
            f"layer {layer!r} is not in {_model_name(model)}; {hint}candidate layers:"
            f" {', '.join(candidates) or 'none'} (default for {method}:"
            f" {_safe_default(model, method)})"
        )
    if method == "attention" and not isinstance(modules[layer], TOKEN_BLOCKS):
        blocks = [n for n, _ in token_blocks(model)]
        raise ConfigError(
            f"layer {layer!r} is not a token-attention block, so it has no attention map;"
            f" attention blocks in {_model_name(model)}: {', '.join(blocks) or 'none'}"
        )
    return layer


def _probe_size(model: nn.Module, preprocess: Any) -> tuple[int, ...]:
    """The input size a probe pass uses: the run's, else the model's default (64 when unknown)."""
    if preprocess is not None and getattr(preprocess, "size", None):
        return tuple(int(s) for s in preprocess.size)
    spec = getattr(model, "spec", None)
    side = int(getattr(spec, "default_size", 0) or 64)
    return (side,) * _dims(model)


def _dims(model: nn.Module) -> int:
    """2 for a network of images, 3 for one of volumes ``(B, C, X, Y, Z)``."""
    return int(getattr(model, "dims", 2) or 2)


def layer_map_sizes(
    model: nn.Module, names: list[str], size: tuple[int, ...]
) -> dict[str, tuple[int, ...] | None]:
    """The spatial size of each named layer's output for one zero image of ``size`` (None when
    the output is not a ``(B, C, *spatial)`` map, e.g. a pooled vector or a classifier)."""
    modules = dict(model.named_modules())
    seen: dict[str, tuple[int, ...] | None] = {name: None for name in names}

    def keep(name):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            ok = isinstance(out, torch.Tensor) and out.ndim == 2 + len(size)
            seen[name] = tuple(int(s) for s in out.shape[2:]) if ok else None

        return hook

    handles = [modules[n].register_forward_hook(keep(n)) for n in names if n in modules]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    channels = int(getattr(model, "in_chans", 0) or 3)
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, *size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _check_spatial(model: nn.Module, layer: str, size: tuple[int, ...]) -> None:
    """Refuse a CAM target layer whose output has no spatial map, listing the layers that have
    one with their map sizes (a CAM weights a map; a vector has nothing to point at)."""
    parts = layer.split(",")
    candidates = [c for c in candidate_layers(model) if c not in parts]
    try:
        sizes = layer_map_sizes(model, parts + candidates, size)
    except Exception:  # noqa: BLE001 - a network that takes another input size: the CAM will say
        return
    flat = [p for p in parts if sizes.get(p) is None]
    if not flat:
        return
    listed = ", ".join(
        f"{c} ({'×'.join(map(str, sizes[c]))})" for c in candidates if sizes.get(c) is not None
    )
    shown = "×".join(map(str, size))
    raise ConfigError(
        f"layer {', '.join(repr(p) for p in flat)} of {_model_name(model)} gives no spatial map"
        f" for a {shown} input, so a CAM has nothing to point at; layers with a map:"
        f" {listed or 'none'}"
    )


def _safe_default(model: nn.Module, method: str) -> str:
    try:
        return default_layer(model, method)
    except ConfigError:
        return "none"


def _model_name(model: nn.Module) -> str:
    spec = getattr(model, "spec", None)
    kind = getattr(model, "attention_kind", None)
    if spec is not None:
        return f"model {spec.name}" + (f" (attention {kind})" if kind else "")
    return f"model {type(model).__name__}"


# --------------------------------------------------------------------------- the explainer


def refuse_unexplained(run) -> None:
    """Refuse, saying what to use instead, a run whose task heat maps do not explain (a
    detector: its boxes show where it looked)."""
    from medsight.tasks import get_task

    if not get_task(run.task).explains:
        raise ConfigError(
            f"{run.path} is a {run.task} run: its boxes show where it found each lesion "
            "(medsight predict, the API's boxes); heat maps explain classifiers"
        )


class Explainer:
    """Heat-maps of one model with one method and target layer (configuration in, maps out).

    ``method`` is one of :data:`METHODS`; ``layer`` a module name of ``model`` (see
    :func:`candidate_layers`), default :func:`default_layer`. ``preprocess`` (the run's) lets
    Integrated Gradients start from a black image; without it the image's minimum is used.
    After construction ``method`` and ``layer`` hold what is actually used.

    Example:
        >>> explainer = Explainer(model, "gradcam")                   # doctest: +SKIP
        >>> explainer.explain(np.zeros((1, 1, 64, 64), np.float32)).shape
        (64, 64)
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "gradcam",
        layer: str | None = None,
        *,
        classes: list[str] | None = None,
        preprocess: Any = None,
        run: Any = None,
    ):
        self.model = model.eval()
        self.method = check_method(method)
        if self.method == "attention" and not token_blocks(model):
            raise ConfigError(no_attention_message(model))
        if self.method in VOLUME_UNSUPPORTED and _dims(model) == 3:
            raise ConfigError(
                f"{self.method} maps images only (pytorch-grad-cam's Score-CAM upsamples in 2-D);"
                f" for a 3-D network choose one of: {', '.join(volume_methods())}"
            )
        chosen = default_layer(model, self.method) if layer is None else str(layer).strip()
        self.layer = _check_layer(model, chosen, self.method)
        self.classes = list(classes) if classes is not None else None
        self.preprocess = preprocess
        if layer is not None and self.method in CAM_METHODS:
            _check_spatial(model, self.layer, _probe_size(model, preprocess))
        self.run = run
        self._cam = None
        self._param = next(model.parameters(), None)
        self._lock = threading.Lock()
        #: Why this method and layer: "asked" (named by the caller), "scored" (the best
        #: sanity-passing map of RUN/localisation.json) or "default" (auto on an unscored run).
        self.chosen_by = "asked"

    @classmethod
    def from_run(
        cls,
        run_or_path: Any,
        method: str = "auto",
        layer: str | None = None,
        device: str = "cpu",
    ) -> Explainer:
        """An explainer for a run (a :class:`~medsight.runs.Run` or its folder), its network
        on ``device`` (:func:`medsight.devices.resolve_device`).

        ``method="auto"`` takes the best method recorded in ``RUN/localisation.json`` (highest
        pointing game among maps passing the sanity check), with the layer it was scored on,
        when the run has been scored; else :data:`DEFAULT_METHOD` on its default layer (fused
        stages), or for a 3-D run :data:`VOLUME_DEFAULT_METHOD` on the first stage.
        ``chosen_by`` and :attr:`choice` say which.
        """
        from medsight.runs import Run

        run = run_or_path if isinstance(run_or_path, Run) else Run.load(run_or_path)
        refuse_unexplained(run)
        name = method.strip().lower() if isinstance(method, str) else method
        chosen_by = "asked"
        if name == "auto":
            scored = best_method(run.path)
            name, chosen_by = (scored, "scored") if scored else (DEFAULT_METHOD, "default")
            if layer is not None and name in ("ig", "attention"):
                name = DEFAULT_METHOD  # a layer was asked for: keep a method that uses one
            elif layer is None:
                layer = _scored_layer(run.path, name)
        model = run.load_model()
        if chosen_by == "default" and layer is None and run.dims == 3:
            name, layer = VOLUME_DEFAULT_METHOD, _first_stage(model)
        from medsight.devices import resolve_device

        explainer = cls(
            model.to(resolve_device(device)),
            name,
            layer,
            classes=run.classes,
            preprocess=run.preprocess,
            run=run,
        )
        explainer.chosen_by = chosen_by
        return explainer

    @property
    def choice(self) -> str:
        """One sentence on why this method and layer explain the run (for logs and notes)."""
        where = f"{self.method} on {self.layer}"
        run = getattr(self.run, "path", None)
        if self.chosen_by == "scored":
            return (
                f"{where}: the best map in {run}/{runs.LOCALISATION} among those passing the"
                " sanity check"
            )
        if self.chosen_by == "default":
            return (
                f"{where}: {run} has no maps scored against lesion masks, so auto uses the"
                " default that localised best among sanity-passing maps in medsight's benchmarks;"
                f" `medsight explain {run} --masks` chooses from your own masks"
            )
        return f"{where}: as asked"

    # ----------------------------------------------------------------------- public

    def explain(self, x: np.ndarray, target: int | str | None = None) -> np.ndarray:
        """The heat-map of one preprocessed image ``x`` (float32 ``(1, C, H, W)``; a volume
        ``(1, C, X, Y, Z)`` for a 3-D network, whose map is ``(X, Y, Z)``).

        ``target`` is a class (or finding) index or name; None explains the predicted (most
        probable) class. A multi-label run's finding is explained through its own logit, so
        each finding has its own map. Returns float32
        ``(H, W)`` in ``[0, 1]`` (the maximum is 1 unless the map is flat, then all 0).
        """
        batch = self._check_input(x, single=True)
        return self.explain_batch(batch, None if target is None else [target])[0]

    def explain_batch(
        self, x: np.ndarray, targets: list[int | str | None] | None = None
    ) -> np.ndarray:
        """Heat-maps of a batch ``(N, C, H, W)`` → float32 ``(N, H, W)``, each in ``[0, 1]``
        (volumes: ``(N, C, X, Y, Z)`` → ``(N, X, Y, Z)``).

        ``targets``: one class (index, name or None for the predicted one) per image.
        """
        batch = self._check_input(x, single=False)
        # The CAM hooks keep per-call state on this object: one explanation at a time (a server
        # may share the explainer between threads). Gradients are needed even when the caller
        # runs under torch.inference_mode / no_grad.
        with self._lock, torch.inference_mode(False), torch.enable_grad():
            tensor = torch.as_tensor(batch.copy(), device=self.device)
            indices = self._targets(tensor, targets)
            if self.method == "ig":
                maps = self._integrated_gradients(tensor, indices)
            elif self.method == "attention":
                maps = attention_maps(self.model, tensor, self.layer)
            else:
                maps = self._cam_maps(tensor, indices)
        return np.stack([_normalise(m) for m in maps]).astype(np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, K)`` of a preprocessed batch (no calibration): the run's task's
        (softmax, or a sigmoid per finding), softmax without a run."""
        batch = self._check_input(x, single=False)
        with torch.no_grad():
            logits = self.model(torch.as_tensor(batch, device=self.device))
        if self.run is not None:
            from medsight.tasks import get_task

            return get_task(self.run.task).probabilities(logits.float().cpu().numpy())
        return logits.softmax(-1).float().cpu().numpy()

    def close(self) -> None:
        """Remove the hooks pytorch-grad-cam put on the model."""
        if self._cam is not None:
            self._cam.activations_and_grads.release()
            self._cam = None

    def __enter__(self) -> Explainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Explainer(method={self.method!r}, layer={self.layer!r})"

    # ----------------------------------------------------------------------- helpers

    @property
    def device(self) -> torch.device:
        """Where the network runs."""
        return self._param.device if self._param is not None else torch.device("cpu")

    def _check_input(self, x: Any, single: bool) -> np.ndarray:
        array = np.asarray(x, dtype=np.float32)
        want = getattr(self.model, "in_chans", None)
        size = tuple(self.preprocess.size) if self.preprocess is not None else None
        dims = _dims(self.model)
        axes = "X, Y, Z" if dims == 3 else "H, W"
        shape = f"(1, {want or 'C'}, {axes if size is None else ', '.join(map(str, size))})"
        what = "volume" if dims == 3 else "image"
        if array.ndim != 2 + dims or (single and array.shape[0] != 1):
            raise DataError(
                f"explain needs one preprocessed {what} shaped {shape} (as"
                f" Predictor.predict_array takes), got an array of shape {array.shape}; run the"
                f" {what} through the run's preprocess first"
            )
        if want is not None and array.shape[1] != want:
            raise DataError(
                f"the image has {array.shape[1]} channel(s) but {_model_name(self.model)} takes"
                f" {want}; preprocess it with the run's preprocess.json (Predictor.preprocess)"
            )
        if not np.isfinite(array).all():
            raise DataError("the image holds NaN or infinite values; it cannot be explained")
        return array

    def _targets(self, x: torch.Tensor, targets) -> list[int]:
        n = x.shape[0]
        if targets is None:
            targets = [None] * n
        if len(targets) != n:
            raise ConfigError(f"got {len(targets)} targets for {n} images; give one per image")
        out: list[int | None] = [self._class_index(t) for t in targets]
        if any(t is None for t in out):
            with torch.no_grad():
                predicted = self.model(x).argmax(-1).tolist()
            out = [p if t is None else t for t, p in zip(out, predicted)]
        return [int(t) for t in out]

    def _class_index(self, target) -> int | None:
        if target is None:
            return None
        k = getattr(self.model, "num_classes", None)
        if isinstance(target, str) and not target.strip().lstrip("-").isdigit():
            if not self.classes or target not in self.classes:
                known = ", ".join(self.classes or []) or "unknown (no run loaded)"
                multilabel = getattr(self.run, "task", None) == "multilabel"
                noun, nouns = ("finding", "findings") if multilabel else ("class", "classes")
                raise ConfigError(f"{noun} {target!r} is not one of the run's {nouns}: {known}")
            return self.classes.index(target)
        index = int(target)
        if index < 0 or (k is not None and index >= k):
            names = f" ({', '.join(self.classes)})" if self.classes else ""
            raise ConfigError(f"class index {index} is out of range: 0 to {k - 1}{names}")
        return index

    def _cam_engine(self):
        if self._cam is None:
            import pytorch_grad_cam

            cls = getattr(pytorch_grad_cam, CAM_METHODS[self.method])
            layers = [self.model.get_submodule(name) for name in self.layer.split(",")]
            self._cam = cls(model=self.model, target_layers=layers)
            if self.method == "scorecam":
                self._cam.batch_size = SCORECAM_BATCH
        return self._cam

    def _cam_maps(self, x: torch.Tensor, targets: list[int]) -> np.ndarray:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cam = self._cam_engine()
        wanted = [ClassifierOutputTarget(t) for t in targets]
        # Score-CAM reports progress with tqdm on stderr; an explanation is not a long job.
        with contextlib.redirect_stderr(io.StringIO()), torch.enable_grad():
            maps = cam(input_tensor=x, targets=wanted)
        # Drop the stored activations now: BaseCAM.__del__ trips over them at interpreter exit.
        cam.activations_and_grads.clear()
        self.model.zero_grad(set_to_none=True)
        return maps

    def _baseline(self, x: torch.Tensor) -> torch.Tensor:
        if self.preprocess is not None:
            black = torch.zeros(x.shape[1], *([1] * (x.ndim - 2)), dtype=x.dtype)
            return self.preprocess.normalize(black).to(x.device)[None].expand_as(x).contiguous()
        return x.amin(dim=tuple(range(1, x.ndim)), keepdim=True).expand_as(x).contiguous()

    def _integrated_gradients(self, x: torch.Tensor, targets: list[int]) -> np.ndarray:
        from captum.attr import IntegratedGradients
        from scipy import ndimage

        ig = IntegratedGradients(self.model)
        with torch.enable_grad():
            attributions = ig.attribute(
                x,
                baselines=self._baseline(x),
                target=targets,
                n_steps=IG_STEPS,
                internal_batch_size=IG_STEPS,
            )
        self.model.zero_grad(set_to_none=True)
        maps = attributions.detach().abs().sum(1).cpu().numpy()
        sigma = max(0.5, IG_SMOOTH * max(maps.shape[1:]))
        return np.stack([ndimage.gaussian_filter(m, sigma) for m in maps])


def _normalise(heatmap: np.ndarray) -> np.ndarray:
    """Min–max to [0, 1]; a flat (or non-finite) map becomes all zeros."""
    heatmap = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(heatmap.min()), float(heatmap.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(heatmap, dtype=np.float32)
    return ((heatmap - lo) / (hi - lo)).astype(np.float32)
