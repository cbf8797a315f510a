"""Does the map point at the lesion? Boxes, regions and scores against ground-truth masks.

From a heat-map: a binary *region* (the largest connected component of the map at or above a
threshold of its maximum) and its bounding *box*. Against a lesion mask: the **pointing game**
(is the map's maximum inside the lesion), the **IoU** of the map's box with the lesion's box,
and the **energy in mask** (the fraction of the map's mass inside the lesion).
:func:`score_localisation` scores every method on a dataset with masks (the manifest's ``mask``
column, as ``medsight data synth`` writes) and writes ``RUN/localisation.json``::

    {"methods": {"gradcam": {"pointing_game": {"value": 0.9, "ci": [0.84, 0.95]},
                             "box_iou": {...}, "energy_in_mask": {...},
                             "layer": "backbone.stage3", "seconds_per_image": 0.01}, ...},
     "faithfulness": {"gradcam": {"deletion_auc": {...}, "insertion_auc": {...}}, ...},
     "sanity": {"gradcam": {"spearman": {...}, "passes": true}, ...},
     "best_method": "gradcam",
     "n_images": 120, "n_missing_masks": 0, ...}

Maps are computed for the image's *true* class: the question is whether the model's evidence
for the lesion class lies on the lesion, whatever it predicted. In a multi-label run each
finding present in an image is scored against that finding's own mask (the manifest's
``<finding>_mask_path`` column, as ``medsight data synth --multilabel`` writes), with the map of
that finding's output; ``per_finding`` then breaks each method's scores down by finding.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from medsight.errors import ConfigError, DataError, MedsightError
from medsight.stats import bootstrap_ci

__all__ = [
    "Box",
    "box_from_map",
    "box_iou",
    "energy_in_mask",
    "mask_box",
    "pointing_game",
    "region_from_map",
    "score_localisation",
]

#: ``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1`` exclusive (so width = x1 − x0); in 3-D
#: ``(x0, y0, z0, x1, y1, z1)`` in voxels.
Box = tuple[int, ...]
#: A map's region: pixels at or above this fraction of the map's maximum.
THRESHOLD = 0.5
N_BOOTSTRAP = 1000
#: Images per method for deletion/insertion and the randomisation check (both cost passes).
N_FAITHFULNESS = 16


# --------------------------------------------------------------------------- map geometry


def _check_2d(name: str, array: np.ndarray) -> np.ndarray:
    """``array`` as a 2-D ``(H, W)`` map or a 3-D ``(X, Y, Z)`` volume map."""
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise DataError(
            f"{name} must be a 2-D (H, W) or 3-D (X, Y, Z) array, got shape {array.shape}"
        )
    return array


def region_from_map(heatmap: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """The largest connected component (8-connected; 26-connected in 3-D) of
    ``heatmap ≥ threshold · max`` as a bool mask.

    The map is min–max normalised first; a flat map has no region (all False).

    Example:
        >>> m = np.zeros((5, 5)); m[1:3, 1:3] = 1; m[4, 4] = 0.9
        >>> region_from_map(m).sum()
        4
    """
    heat = _check_2d("heatmap", heatmap).astype(np.float64)
    lo, hi = float(np.nanmin(heat)), float(np.nanmax(heat))
    if not np.isfinite(hi - lo) or hi - lo <= 1e-12:
        return np.zeros(heat.shape, dtype=bool)
    hot = (heat - lo) / (hi - lo) >= threshold
    labels, n = ndimage.label(hot, structure=np.ones((3,) * heat.ndim, dtype=bool))
    if n <= 1:
        return hot
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def mask_box(mask: np.ndarray) -> Box | None:
    """The bounding box of the True (non-zero) pixels of ``mask``, or None when it has none:
    ``(x0, y0, x1, y1)`` for a 2-D ``(H, W)`` mask; ``(x0, y0, z0, x1, y1, z1)`` over the
    axes of a 3-D ``(X, Y, Z)`` one."""
    mask = _check_2d("mask", mask) > 0
    if mask.ndim == 3:
        others = [tuple(a for a in range(3) if a != k) for k in range(3)]
        spans = [np.flatnonzero(mask.any(axis=axes)) for axes in others]
        if spans[0].size == 0:
            return None
        return (*(int(s[0]) for s in spans), *(int(s[-1]) + 1 for s in spans))
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def box_from_map(heatmap: np.ndarray, threshold: float = THRESHOLD) -> Box | None:
    """The box around :func:`region_from_map`; None for a flat map."""
    return mask_box(region_from_map(heatmap, threshold))


def box_iou(a: Box | None, b: Box | None) -> float:
    """Intersection over union of two boxes (0 when either is None): ``(x0, y0, x1, y1)``, or
    ``(x0, y0, z0, x1, y1, z1)`` in 3-D (then volumes).

    Example:
        >>> box_iou((0, 0, 2, 2), (1, 0, 3, 2))    # overlap 2 px, union 6 px
        0.3333333333333333
    """
    if a is None or b is None:
        return 0.0
    n = len(a) // 2
    inter = float(np.prod([max(0, min(a[n + k], b[n + k]) - max(a[k], b[k])) for k in range(n)]))
    size_a = float(np.prod([a[n + k] - a[k] for k in range(n)]))
    size_b = float(np.prod([b[n + k] - b[k] for k in range(n)]))
    union = size_a + size_b - inter
    return float(inter / union) if union > 0 else 0.0


def _fit_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    mask = _check_2d("mask", mask) > 0
    if mask.shape == tuple(shape):
        return mask
    if mask.ndim != 2:  # a volume: nearest voxel along each axis
        index = np.ix_(*(
            np.minimum((np.arange(n) + 0.5) * m / n, m - 1).astype(int)
            for n, m in zip(shape, mask.shape)
        ))  # fmt: skip
        return mask[index]
    from PIL import Image

    # Maps and masks both cover the whole image; nearest keeps the mask binary.
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (shape[1], shape[0]), Image.Resampling.NEAREST
    )
    return np.asarray(resized) > 127


def pointing_game(heatmap: np.ndarray, mask: np.ndarray) -> bool:
    """True when the map's maximum lies inside the lesion ``mask`` (resized to the map).

    With several equal maxima the first in row-major order counts; a flat map has no maximum
    and misses.
    """
    heat = _check_2d("heatmap", heatmap)
    if float(np.nanmax(heat) - np.nanmin(heat)) <= 1e-12:
        return False
    inside = _fit_mask(mask, heat.shape)
    return bool(inside[np.unravel_index(int(np.nanargmax(heat)), heat.shape)])


def energy_in_mask(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's mass (negatives clipped to 0) inside ``mask``; 0 for an empty map."""
    heat = np.clip(np.nan_to_num(_check_2d("heatmap", heatmap).astype(np.float64)), 0, None)
    total = heat.sum()
    if total <= 0:
        return 0.0
    return float(heat[_fit_mask(mask, heat.shape)].sum() / total)


def score_map(heatmap: np.ndarray, mask: np.ndarray, threshold: float = THRESHOLD) -> dict:
    """The three localisation scores of one map against one (non-empty) mask."""
    inside = _fit_mask(mask, np.asarray(heatmap).shape)
    return {
        "pointing_game": float(pointing_game(heatmap, inside)),
        "box_iou": box_iou(box_from_map(heatmap, threshold), mask_box(inside)),
        "energy_in_mask": energy_in_mask(heatmap, inside),
    }


# --------------------------------------------------------------------------- dataset scoring


def read_mask(value: Any, dims: int = 2) -> Any:
    """The mask at ``value`` as a bool ``(H, W)`` array, or with ``dims`` 3 the mask volume
    (a :class:`~medsight.data.volumes.Volume`, its affine kept so it is oriented like its
    image); None when there is no path or it cannot be read."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return None
    if dims == 3:
        from medsight.data.volumes import read_volume

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return read_volume(str(value))
        except MedsightError:
            return None
    from medsight.data.imaging import decode

    try:
        pixels = decode(str(value)).pixels
    except MedsightError:
        return None
    return pixels.max(axis=0) > 0.5


def _nonempty(mask: Any) -> bool:
    return bool(np.asarray(getattr(mask, "array", mask)).any())


#: The spatial steps of a volume pipeline, and how each keeps a mask binary.
_SPATIAL_STEPS = {
    "Orientationd": {},
    "Spacingd": {"mode": "nearest"},
    "Resized": {"mode": "nearest"},
    "ResizeWithPadOrCropd": {},
    "SpatialPadd": {},
    "CenterSpatialCropd": {},
}


def _volume_mask(preprocess: Any, mask: Any) -> np.ndarray:
    """A mask volume through the spatial steps of the run's volume pipeline (orientation,
    spacing, resize, pad/crop; nearest neighbour), so it lies on the model's input grid, where
    the maps are: bool ``(X, Y, Z)``."""
    import torch
    from monai.data import MetaTensor

    from medsight.data.volumes import _instantiate

    data = {
        "image": MetaTensor(
            torch.from_numpy((mask.array.max(axis=0, keepdims=True) > 0).astype(np.float32)),
            affine=torch.from_numpy(mask.affine),
        )
    }
    for step in preprocess.transforms:
        if step["_target_"] in _SPATIAL_STEPS:
            data = _instantiate({**step, **_SPATIAL_STEPS[step["_target_"]]})(data)
    return torch.as_tensor(data["image"]).numpy()[0] > 0.5


def _benign_name(name: str) -> bool:
    from medsight.runs import _BENIGN_NAMES

    return str(name).strip().lower() in _BENIGN_NAMES


def _select_rows(table: pd.DataFrame, split: str | None, own: bool) -> tuple[pd.DataFrame, str]:
    """The rows to score: the run's ``split`` when ``table`` is the run's own data (``own``),
    the data's own ``split`` column when it has one, else every row (an external set)."""
    if split is None:
        return table, "all"
    if own and table["split"].notna().any():
        rows = table[table["split"] == split]
        if rows.empty:
            raise DataError(f"the run's {split} split has no image in this data; choose --split")
        return rows, split
    if "split" in table and table["split"].notna().any():
        rows = table[table["split"] == split]
        if not rows.empty:
            return rows, split
    return table, "all"


def _lesion_rows(
    rows: pd.DataFrame, dims: int = 2
) -> tuple[list[tuple[int, Any]], int, int, list[str]]:
    """``[(row position, mask)]`` of images to score, the missing and empty mask counts, and
    the lesion classes (those with a non-empty mask somewhere, or unnamed-normal classes whose
    masks are all missing)."""
    masks = [read_mask(v, dims) for v in rows["mask"]]
    labels = rows["label"].astype(str).tolist()
    lesion = {lab for lab, m in zip(labels, masks) if m is not None and _nonempty(m)}
    for lab in set(labels) - lesion:
        if not _benign_name(lab) and all(m is None for x, m in zip(labels, masks) if x == lab):
            lesion.add(lab)
    scored, missing, empty = [], 0, 0
    for i, (lab, m) in enumerate(zip(labels, masks)):
        if lab not in lesion:
            continue
        if m is None:
            missing += 1
        elif not _nonempty(m):
            empty += 1
        else:
            scored.append((i, m))
    return scored, missing, empty, sorted(lesion)


def _finding_rows(
    rows: pd.DataFrame, findings: Sequence[str], where: Any, dims: int = 2
) -> tuple[list[tuple[int, Any, int]], int, int]:
    """``[(row position, mask, finding index)]``: each finding present in an image, with that
    finding's mask (column ``<finding>_mask_path``); the missing and empty mask counts."""
    from medsight.data.findings import positives

    columns = {k: f"{name}_mask_path" for k, name in enumerate(findings)}
    if not any(column in rows.columns for column in columns.values()):
        raise DataError(
            f"{where} has no per-finding mask column ({', '.join(columns.values())}), so there "
            "is nothing to score the maps against; `medsight data synth --multilabel` writes them"
        )
    present = positives(rows["label"], findings)
    scored, missing, empty = [], 0, 0
    for k, column in columns.items():
        for i in np.flatnonzero(present[:, k]):
            mask = read_mask(rows.iloc[i][column], dims) if column in rows.columns else None
            if mask is None:
                missing += 1
            elif not _nonempty(mask):
                empty += 1
            else:
                scored.append((int(i), mask, k))
    return scored, missing, empty


#: Masks whose height/width ratio differs from their image's by more than this are refused.
ASPECT_TOLERANCE = 0.02


def _check_mask_size(mask: np.ndarray, image_size: tuple[int, int], source: str) -> int:
    """1 when ``mask`` must be resized to its image (same aspect), 0 when it fits; a mask of
    another aspect cannot say where the lesion is in the image and is refused."""
    if tuple(mask.shape) == tuple(image_size):
        return 0
    ratios = np.asarray(mask.shape, float) / np.asarray(image_size, float)
    if np.ptp(ratios) / ratios.min() > ASPECT_TOLERANCE:
        if len(image_size) == 3:
            shown = ("×".join(map(str, mask.shape)), "×".join(map(str, image_size)), "voxels")
        else:
            shown = (f"{mask.shape[1]}×{mask.shape[0]}", f"{image_size[1]}×{image_size[0]}",
                     "pixels")  # fmt: skip
        raise DataError(
            f"the mask of {source} is {shown[0]} {shown[2]} but the image is {shown[1]}: the"
            " aspect differs, so the mask cannot be placed on the image; give masks drawn on"
            " the images themselves (same size)"
        )
    return 1


def _layers_to_try(model, method: str, layer: str | None, search: bool) -> list[str | None]:
    """The target layers to score ``method`` on: ``layer`` (None: the default), and with
    ``search`` for a CAM method but Score-CAM also the last stage alone, the stage before it,
    and the last stages fused (pytorch-grad-cam averages their maps): a coarse last stage often
    misses small lesions that finer stages see (benchmarks/README.md, multi-label phantoms)."""
    from medsight.explain.cam import default_layer, fused_stages

    chosen = _layer_for(model, method, layer)
    # Score-CAM costs one forward pass per channel of its layer (about 100 times Grad-CAM):
    # searching its layers too made `explain --masks` an hour on a 2-core CPU.
    if not search or layer is not None or method in ("ig", "attention", "scorecam"):
        return [chosen]
    fused = fused_stages(model)
    if fused is None:
        return [chosen]
    stages = fused.split(",")
    layers = [default_layer(model, method), stages[-1], stages[-2], fused]
    if getattr(model, "dims", 2) == 3:
        # A 3-D network's late stages are 4 voxels a side at 32³: coarser than lesions a few
        # voxels across. Its first two stages (16³, 8³) and their fusion are tried too.
        early = [f"backbone.{n}" for n in model.stage_outputs()[:2] if n is not None]
        layers += [*early, ",".join(early)] if len(early) == 2 else early
    return list(dict.fromkeys(layers))


def _score_method(
    model, method, layer, run, x, masks, targets, n_faith, activation, *,
    threshold, n_bootstrap, seed, batch_size, multilabel, say,
) -> tuple[dict, dict | None, dict | None]:  # fmt: skip
    """One method on one layer: its localisation entry, and (with ``n_faith`` images) its
    deletion/insertion and sanity summaries."""
    from medsight.explain import faithfulness as FA
    from medsight.explain.cam import Explainer

    explainer = Explainer(model, method, layer, classes=run.classes, preprocess=run.preprocess)
    try:
        started = time.perf_counter()
        maps = np.concatenate(
            [
                explainer.explain_batch(x[i : i + batch_size], targets[i : i + batch_size])
                for i in range(0, len(x), batch_size)
            ]
        )
        seconds = (time.perf_counter() - started) / len(x)
        scores = [score_map(m, mask, threshold) for m, mask in zip(maps, masks)]
        entry: dict[str, Any] = {
            key: bootstrap_ci([s[key] for s in scores], n_bootstrap, seed)
            for key in ("pointing_game", "box_iou", "energy_in_mask")
        }
        entry.update(layer=explainer.layer, seconds_per_image=seconds)
        if multilabel:
            entry["per_finding"] = {
                run.classes[k]: {
                    key: bootstrap_ci(
                        [s[key] for s, t in zip(scores, targets) if t == k], n_bootstrap, seed
                    )
                    for key in ("pointing_game", "energy_in_mask")
                }
                | {"n_images": sum(t == k for t in targets)}
                for k in sorted(set(targets))
            }
        if not n_faith:
            return entry, None, None
        say(f"{method}: faithfulness on {n_faith} images")
        sample = slice(0, n_faith)
        faith = FA.deletion_insertion_summary(
            model, x[sample], maps[sample], targets[sample], run.preprocess, n_bootstrap, seed,
            activation=activation,
        )  # fmt: skip
        sanity = FA.sanity_summary(
            explainer, x[sample], maps[sample], targets[sample], seed, n_bootstrap
        )
        return entry, faith, sanity
    finally:
        explainer.close()


def _applicable(model, methods: Sequence[str] | None) -> list[str]:
    from medsight.explain.attention_maps import token_blocks
    from medsight.explain.cam import METHODS, check_method

    if methods:
        return list(dict.fromkeys(check_method(m) for m in methods))
    if getattr(model, "dims", 2) == 3:
        from medsight.explain.cam import volume_methods

        return volume_methods()
    return [m for m in METHODS if m != "attention" or token_blocks(model)]


def _layer_for(model, method: str, layer: str | None) -> str | None:
    """``layer`` for the CAM methods; for ``attention`` only when it names an attention block
    (one --layer serves a whole table of methods); never for ``ig``."""
    from medsight.explain.attention_maps import TOKEN_BLOCKS

    if layer is None or method == "ig":
        return None
    if method == "attention":
        named = dict(model.named_modules()).get(layer)
        return layer if isinstance(named, TOKEN_BLOCKS) else None
    return layer


def score_localisation(
    run_path: str | Path,
    data: str | Path | None = None,
    *,
    methods: Sequence[str] | None = None,
    limit: int | None = None,
    split: str | None = "test",
    layer: str | None = None,
    threshold: float = THRESHOLD,
    faithfulness: int = N_FAITHFULNESS,
    seed: int = 0,
    n_bootstrap: int = N_BOOTSTRAP,
    batch_size: int = 16,
    write: bool = True,
    progress: Callable[[str], None] | None = None,
    search_layers: bool = False,
    device: str = "cpu",
) -> dict:
    """Score each method's maps against the lesion masks of ``data`` (default: the run's data).

    Only images of lesion classes with a non-empty mask are scored; images of those classes
    without a readable mask are counted in ``n_missing_masks`` and skipped. ``split`` picks the
    run's split when ``data`` is the run's own data (``None``: every image). ``limit`` scores a
    seeded random sample of that many images. ``methods`` default to every method the model
    supports; ``layer`` overrides the CAM methods' target layer (and attention's when it names
    an attention block). ``search_layers`` (without ``layer``): each CAM method is also scored
    on the stage before the last and on all stages fused, and keeps its best layer among those
    passing the sanity check (``layers_tried`` lists them all). ``faithfulness`` images per
    method also get deletion/insertion AUCs and the randomised-weights check (0: skip).
    Writes ``RUN/localisation.json`` unless ``write`` is False, and returns its content.

    Example:
        >>> score_localisation("runs/phantom", methods=["gradcam"], limit=100)  # doctest: +SKIP
    """
    from medsight.data.imaging import decode
    from medsight.explain import faithfulness as FA
    from medsight.explain.cam import choose_best
    from medsight.runs import LOCALISATION, Run, write_json

    say = progress or (lambda message: None)
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise ConfigError(f"limit={limit!r} must be a whole number of 1 or more")
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"threshold={threshold!r} must be between 0 and 1 (e.g. 0.5)")
    run = Run.load(run_path)
    from medsight.explain.cam import refuse_unexplained

    refuse_unexplained(run)
    table = run.load_data(data)
    where = run.config.data.path if data is None else data
    multilabel = run.task == "multilabel"
    dims = int(getattr(run.preprocess, "dims", 2))
    if getattr(run.preprocess, "slices", None) is not None:
        raise ConfigError(
            f"{run.path} is a 2.5-D run (its input is {run.preprocess.slices} slices of a"
            " volume as channels): its maps cover one slab, not the volume its masks cover;"
            " score a 3-D run, or a 2-D run on slices with 2-D masks"
        )
    if "mask" not in table.columns and not multilabel:
        raise DataError(
            f"{where} has no 'mask' column, so there is nothing to score the maps against;"
            " give a manifest with a mask column (path of each image's lesion mask, empty for"
            " normal images), as `medsight data synth` writes"
        )
    rows, used_split = _select_rows(table, split, run.is_own_data(data))
    if multilabel:
        rows = rows[rows["label"].notna()].reset_index(drop=True)
        scored, n_missing, n_empty = _finding_rows(rows, run.classes, where, dims)
        lesion_classes = sorted({run.classes[k] for _, _, k in scored})
    else:
        rows = rows[rows["label"].astype(str).isin(run.classes)].reset_index(drop=True)
        lesion_rows, n_missing, n_empty, lesion_classes = _lesion_rows(rows, dims)
        scored = [(i, m, run.classes.index(str(rows.iloc[i]["label"]))) for i, m in lesion_rows]
    if n_missing:
        warnings.warn(
            f"{n_missing} image(s) of lesion classes have no readable mask; they are not scored",
            UserWarning,
            stacklevel=2,
        )
    if not scored:
        raise DataError(
            f"no image in {where} ({used_split} split) has a non-empty lesion mask to score"
            f" against ({n_missing} missing, {n_empty} empty)"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(scored))
    if limit is not None:
        order = order[: int(limit)]
    scored = [scored[i] for i in sorted(order)]

    xs, masks, targets, unreadable, resized = [], [], [], 0, 0
    for position, mask, target in scored:
        row = rows.iloc[position]
        try:
            if dims == 3:
                from medsight.data.volumes import read_volume

                image = read_volume(str(row["source"]))
            else:
                image = decode(str(row["source"]), window=run.preprocess.window)
        except MedsightError:
            unreadable += 1
            continue
        if dims == 3:
            resized += _check_mask_size(mask.array[0], tuple(image.shape), str(row["source"]))
            mask = _volume_mask(run.preprocess, mask)
        else:
            resized += _check_mask_size(mask, tuple(image.size), str(row["source"]))
        xs.append(run.preprocess(image))
        masks.append(mask)
        targets.append(target)
    if resized:
        warnings.warn(
            f"{resized} mask(s) differ in size from their image (same aspect); they were resized"
            " to the image, as a mask must cover the whole image",
            UserWarning,
            stacklevel=2,
        )
    if not xs:
        raise DataError(f"none of the {len(scored)} images to score could be read from {where}")
    x = np.stack(xs).astype(np.float32)
    from medsight.devices import resolve_device

    model = run.load_model().to(resolve_device(device))
    result: dict[str, Any] = {
        "methods": {},
        "n_images": len(xs),
        "n_missing_masks": n_missing,
        "n_empty_masks": n_empty,
        "n_unreadable": unreadable,
        "n_resized_masks": resized,
        "lesion_classes": lesion_classes,
        "split": used_split,
        "data": str(where),
        "target": "each finding present" if multilabel else "true class",
        "threshold": threshold,
    }
    activation = "sigmoid" if multilabel else "softmax"
    faith: dict[str, Any] = {}
    sanity: dict[str, Any] = {}
    n_faith = min(int(faithfulness), len(xs))
    for method in _applicable(model, methods):
        tried = {}
        for chosen in _layers_to_try(model, method, layer, search_layers):
            say(f"{method}{f' on {chosen}' if chosen else ''}: {len(xs)} images")
            tried[chosen] = _score_method(
                model, method, chosen, run, x, masks, targets, n_faith, activation,
                threshold=threshold, n_bootstrap=n_bootstrap, seed=seed, batch_size=batch_size,
                multilabel=multilabel, say=say,
            )  # fmt: skip
        # Each method keeps its best layer among those whose maps pass the sanity check.
        best = choose_best(
            {k: v[0] for k, v in tried.items()}, {k: v[2] for k, v in tried.items() if v[2]}
        )
        entry, faith_entry, sanity_entry = tried[best]
        if len(tried) > 1:
            entry["layers_tried"] = {
                v[0]["layer"]: {
                    "pointing_game": v[0]["pointing_game"],
                    "box_iou": v[0]["box_iou"],
                    "energy_in_mask": v[0]["energy_in_mask"],
                    **({"sanity": v[2]} if v[2] else {}),
                }
                for v in tried.values()
            }
        result["methods"][method] = entry
        if faith_entry is not None:
            faith[method], sanity[method] = faith_entry, sanity_entry
    if n_faith:
        result["faithfulness"] = faith
        result["sanity"] = sanity
        result["n_faithfulness_images"] = n_faith
    # A map that survives randomised weights never becomes the default, however well it points.
    result["best_method"] = choose_best(result["methods"], sanity)
    result["sanity_max_rho"] = FA.SANITY_MAX_RHO
    if write:
        write_json(run.path / LOCALISATION, result)
    return result
