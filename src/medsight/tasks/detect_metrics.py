"""Detection metrics: lesion-level FROC, COCO mean average precision, image-level AUROC and the
IoU of matched boxes, with image-level bootstrap CIs.

Inputs are plain arrays over ``N`` images (see the detection contract):

* ground truth ``gt``: ``(N, M, 5)`` rows ``[x1, y1, x2, y2, class_index]``; a row of class
  ``-1`` is padding and ignored;
* predictions ``pred``: ``(N, D, 6)`` rows ``[x1, y1, x2, y2, score, class_index]``; class
  ``-1`` is padding. Scores lie in [0, 1].

Coordinates are normalised to [0, 1] (IoU does not change under independent x / y scaling, so
every number here equals the one computed in pixels).

What counts as finding a lesion (:func:`match_detections`): detections are taken in order of
score (highest first, per image); each takes the not yet found lesion *of its class* that it
overlaps most, if that IoU is at least ``iou_threshold`` (0.5). A detection that takes a lesion
is a hit; every other one (wrong class, too little overlap, a second box on a lesion already
found) is a false positive. This is the COCO / PASCAL matching, so FROC and mAP@0.5 agree on
what a hit is. LUNA16 calls a candidate a hit when it lies within the radius of a nodule and
ignores extra hits on a found nodule; boxes carry no radius, and for 2-D lesion boxes the
DeepLesion benchmark (Yan et al., J. Med. Imaging 2018) uses IoU ≥ 0.5 with the same FP-per-image
points, so that is the criterion here. Counting duplicates as false positives is the stricter
choice: a detector that draws two boxes on one lesion shows the reader two marks.

FROC (:func:`froc`): one operating point per distinct score (the detections scoring at least
it), the sensitivity (lesions found / lesions) against the mean number of false positives per
image, starting at (0, 0); the sensitivity at a given FP rate is read off the piecewise-linear
curve (linear interpolation, as in the CAMELYON16 and MONAI ``compute_froc_score`` code), and
held at its last value beyond the largest FP rate the detector reaches. The FROC score (the
LUNA16 "CPM") is the mean over the seven rates 1/8, 1/4, 1/2, 1, 2, 4 and 8.

Mean average precision (:func:`coco_map`) is torchmetrics' ``MeanAveragePrecision`` with the
pycocotools backend (COCO's 101-point interpolated AP, at most 100 detections per image, every
box area). A class without any true box in the data has no AP (None) and is left out of the
means, as COCO does; its detections then count nowhere.

CIs are percentile intervals over bootstrap resamples of *images* (each resample draws N images
with replacement, keeping each image's lesions and detections together; every metric is computed
on the same resamples). The FROC, the IoU median and the image-level AUROC are re-scored on every
resample cheaply; COCO's AP re-accumulates pycocotools' per-image evaluation for each resample,
which costs more, so at most :data:`MAP_BOOTSTRAP` resamples are used for the AP intervals.

>>> m = detection_metrics(gt, pred, ["nodule"])                 # doctest: +SKIP
>>> m["sensitivity_at_1fp"]                                     # doctest: +SKIP
{'value': 0.84, 'ci': [0.78, 0.9]}
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medsight.errors import ConfigError, DataError
from medsight.stats import interval, value_entry

__all__ = [
    "FROC_FPS",
    "HEADLINE",
    "MAP_BOOTSTRAP",
    "Matching",
    "box_iou",
    "coco_map",
    "detection_metrics",
    "froc",
    "froc_sensitivity",
    "image_auroc",
    "image_scores",
    "match_detections",
    "median_iou",
    "operating_points",
    "validation_scores",
]

#: The false-positive rates (per image) of the FROC table and score (LUNA16 / CAMELYON16).
FROC_FPS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: What ``metrics.json`` leads with (``{"value", "ci"}`` each), in display order.
HEADLINE = ("map50", "map", "sensitivity_at_1fp", "froc_score", "median_iou", "auroc_macro")
#: The IoU a detection needs with a lesion of its class to find it.
IOU_THRESHOLD = 0.5
#: Resamples for the CIs of the COCO APs (each re-accumulates pycocotools' evaluation).
MAP_BOOTSTRAP = 200
#: Points of the FROC band (bootstrap interval) in metrics.json, on a log scale of FP / image.
BAND_POINTS = 49
#: COCO's cap on detections per image.
MAX_DETECTIONS = 100
_CHUNK_ELEMENTS = 2_000_000  # cells per bootstrap chunk (~16 MB)


# --------------------------------------------------------------------------- validation


def _check_arrays(gt, pred) -> tuple[np.ndarray, np.ndarray]:
    g = np.asarray(gt, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    if g.ndim != 3 or g.shape[-1] != 5:
        raise DataError(
            f"ground truth must be an (images, boxes, 5) array of [x1, y1, x2, y2, class]; "
            f"got shape {g.shape}"
        )
    if p.ndim != 3 or p.shape[-1] != 6:
        raise DataError(
            f"predictions must be an (images, boxes, 6) array of [x1, y1, x2, y2, score, class]; "
            f"got shape {p.shape}"
        )
    if g.shape[0] == 0:
        raise DataError("no images to score: the ground truth array is empty")
    if g.shape[0] != p.shape[0]:
        raise DataError(
            f"ground truth covers {g.shape[0]} images but predictions {p.shape[0]}; give both "
            "for the same images, in the same order"
        )
    for name, a, col in (("ground truth", g, 4), ("predictions", p, 5)):
        if not np.isfinite(a).all():
            i = int(np.flatnonzero(~np.isfinite(a).reshape(a.shape[0], -1).all(axis=1))[0])
            raise DataError(f"{name} of image {i} hold NaN or infinity")
        cls = a[..., col]
        if (cls != np.round(cls)).any() or (cls < -1).any():
            i, j = (int(v[0]) for v in np.nonzero((cls != np.round(cls)) | (cls < -1)))
            raise DataError(
                f"{name}[{i}, {j}] has class {float(cls[i, j])!r}; classes are whole numbers ≥ 0 "
                "(-1 marks a padding row)"
            )
        valid = cls >= 0
        bad = valid & ((a[..., 2] < a[..., 0]) | (a[..., 3] < a[..., 1]))
        if bad.any():
            i, j = (int(v[0]) for v in np.nonzero(bad))
            raise DataError(
                f"{name}[{i}, {j}] is the box {a[i, j, :4].tolist()}: corners must be "
                "[x1, y1, x2, y2] with x2 ≥ x1 and y2 ≥ y1"
            )
    score = p[..., 4]
    bad = (p[..., 5] >= 0) & ((score < 0) | (score > 1))
    if bad.any():
        i, j = (int(v[0]) for v in np.nonzero(bad))
        raise DataError(
            f"predictions[{i}, {j}] has score {float(score[i, j])!r}; scores must lie in [0, 1]"
        )
    return g, p


def _check_classes(g: np.ndarray, p: np.ndarray, classes: Sequence[str]) -> list[str]:
    names = [str(c) for c in classes]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"classes must be a non-empty list of unique names; got {names}")
    top = max(int(g[..., 4].max(initial=-1)), int(p[..., 5].max(initial=-1)))
    if top >= len(names):
        raise DataError(
            f"a box has class index {top} but only {len(names)} classes were given ({names})"
        )
    return names


def _check_bootstrap(n_bootstrap: int, confidence: float) -> None:
    if isinstance(n_bootstrap, bool) or int(n_bootstrap) != n_bootstrap or n_bootstrap < 0:
        raise ConfigError(f"n_bootstrap must be a whole number ≥ 0; got {n_bootstrap!r}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be between 0 and 1 (e.g. 0.95); got {confidence!r}")


# --------------------------------------------------------------------------- matching


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` ``(n, 4)`` with every box in ``b`` ``(m, 4)``, corners
    ``[x1, y1, x2, y2]`` (continuous coordinates: no +1 pixel); 0 where the union is empty.

    >>> box_iou(np.array([[0, 0, 2, 2.0]]), np.array([[1, 0, 3, 2.0]])).round(3).tolist()
    [[0.333]]
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    w, h = np.clip(hi - lo, 0.0, None).transpose(2, 0, 1)
    inter = w * h
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


@dataclass(frozen=True)
class Matching:
    """The outcome of :func:`match_detections`, flat over all images.

    Per detection (padding left out), in image order then score order: ``det_image``,
    ``det_score``, ``det_class``, ``hit`` (it found a lesion), ``det_iou`` (IoU with the lesion
    it found, NaN for a false positive), ``det_lesion`` (index into the lesion arrays, -1).
    Per lesion: ``lesion_image``, ``lesion_class``, ``found``, ``lesion_iou`` / ``lesion_score``
    (IoU and score of the detection that found it; NaN if missed), ``lesion_box`` ``(L, 4)``.
    ``n_images``: N (images without lesions or detections count too).
    """

    n_images: int
    det_image: np.ndarray
    det_score: np.ndarray
    det_class: np.ndarray
    det_box: np.ndarray
    hit: np.ndarray
    det_iou: np.ndarray
    det_lesion: np.ndarray
    lesion_image: np.ndarray
    lesion_class: np.ndarray
    lesion_box: np.ndarray
    found: np.ndarray
    lesion_iou: np.ndarray
    lesion_score: np.ndarray

    @property
    def n_lesions(self) -> int:
        return int(self.lesion_image.size)

    def lesions_per_image(self) -> np.ndarray:
        return np.bincount(self.lesion_image, minlength=self.n_images).astype(np.float64)


def match_detections(gt, pred, iou_threshold: float = IOU_THRESHOLD) -> Matching:
    """Match each image's detections to its lesions: greedy by score, same class,
    IoU ≥ ``iou_threshold``; see the module docstring for the convention and why.

    Within an image, detections are taken by descending score (ties: in array order); each
    takes the unfound lesion of its class with the largest IoU (ties: the first), provided the
    IoU reaches the threshold. Because a detection's fate depends only on higher-scored ones,
    keeping the detections above any score threshold keeps their matches: the FROC and the
    operating points read this one matching at every threshold.

    >>> gt = np.array([[[0, 0, .5, .5, 0]]])
    >>> pred = np.array([[[0, 0, .5, .5, .9, 0], [0, 0, .5, .5, .8, 0]]])
    >>> m = match_detections(gt, pred)
    >>> m.hit.tolist(), m.found.tolist()
    ([True, False], [True])
    """
    g, p = _check_arrays(gt, pred)
    if not 0 < iou_threshold <= 1:
        raise ConfigError(f"iou_threshold must lie in (0, 1]; got {iou_threshold!r}")
    det = {k: [] for k in ("image", "score", "cls", "box", "hit", "iou", "lesion")}
    les = {k: [] for k in ("image", "cls", "box", "found", "iou", "score")}
    offset = 0
    for i in range(g.shape[0]):
        gi = g[i][g[i, :, 4] >= 0]
        pi = p[i][p[i, :, 5] >= 0]
        pi = pi[np.argsort(-pi[:, 4], kind="stable")]
        ious = (
            box_iou(pi[:, :4], gi[:, :4]) if len(gi) and len(pi) else np.zeros((len(pi), len(gi)))
        )
        same = pi[:, None, 5] == gi[None, :, 4]
        taken = np.zeros(len(gi), dtype=bool)
        l_iou, l_score = np.full(len(gi), np.nan), np.full(len(gi), np.nan)
        for d in range(len(pi)):
            cand = np.where(same[d] & ~taken & (ious[d] >= iou_threshold), ious[d], -1.0)
            j = int(np.argmax(cand)) if len(gi) else -1
            hit = j >= 0 and cand[j] >= 0
            det["hit"].append(hit)
            det["iou"].append(ious[d, j] if hit else np.nan)
            det["lesion"].append(offset + j if hit else -1)
            if hit:
                taken[j] = True
                l_iou[j], l_score[j] = ious[d, j], pi[d, 4]
        det["image"].append(np.full(len(pi), i))
        det["score"].append(pi[:, 4])
        det["cls"].append(pi[:, 5])
        det["box"].append(pi[:, :4])
        les["image"].append(np.full(len(gi), i))
        les["cls"].append(gi[:, 4])
        les["box"].append(gi[:, :4])
        les["found"].append(taken)
        les["iou"].append(l_iou)
        les["score"].append(l_score)
        offset += len(gi)

    def cat(parts, dtype, shape=(0,)):
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(shape, dtype)

    return Matching(
        n_images=int(g.shape[0]),
        det_image=cat(det["image"], np.int64),
        det_score=cat(det["score"], np.float64),
        det_class=cat(det["cls"], np.int64),
        det_box=cat(det["box"], np.float64, (0, 4)),
        hit=np.asarray(det["hit"], dtype=bool),
        det_iou=np.asarray(det["iou"], dtype=np.float64),
        det_lesion=np.asarray(det["lesion"], dtype=np.int64),
        lesion_image=cat(les["image"], np.int64),
        lesion_class=cat(les["cls"], np.int64),
        lesion_box=cat(les["box"], np.float64, (0, 4)),
        found=cat(les["found"], bool),
        lesion_iou=cat(les["iou"], np.float64),
        lesion_score=cat(les["score"], np.float64),
    )


# --------------------------------------------------------------------------- FROC


class _Curve:
    """The FROC operating points of a matching, as weighted sums over images so a bootstrap
    resample (a row of multiplicities over the images) re-scores it in a few array passes."""

    def __init__(self, m: Matching):
        order = np.argsort(-m.det_score, kind="stable")
        self.score = m.det_score[order]
        self.image = m.det_image[order]
        self.hit = m.hit[order].astype(np.float64)
        # the last detection of each group of tied scores: one operating point per score
        self.ends = np.flatnonzero(np.r_[self.score[1:] != self.score[:-1], True])
        self.lesions = m.lesions_per_image()
        self.n = m.n_images

    def points(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per resample row of ``w`` ``(b, N)``: FP per image, sensitivity and hit count at each
        score threshold, with the (0, 0) start prepended. Sensitivity is NaN for a resample
        without lesions."""
        wd = w[:, self.image]
        tp = np.cumsum(wd * self.hit, axis=1)[:, self.ends]
        fp = np.cumsum(wd * (1.0 - self.hit), axis=1)[:, self.ends]
        zero = np.zeros((w.shape[0], 1))
        tp, fp = np.hstack([zero, tp]), np.hstack([zero, fp])
        lesions = w @ self.lesions
        with np.errstate(invalid="ignore", divide="ignore"):
            sens = np.where(lesions[:, None] > 0, tp / lesions[:, None], np.nan)
        return fp / w.sum(axis=1, keepdims=True), sens, tp

    def thresholds(self) -> np.ndarray:
        return np.r_[np.inf, self.score[self.ends]]


def froc_sensitivity(x, s, at) -> np.ndarray:
    """Sensitivity of the piecewise-linear FROC curve through ``(x, s)`` (FP per image, non-
    decreasing, and sensitivity: :func:`froc`'s ``curve``) at the FP rates ``at``: at a rate
    the curve reaches, its highest sensitivity there; between two rates, the straight line;
    beyond the last, the last sensitivity.

    >>> froc_sensitivity([0, 0, 0.5, 0.5], [0, 0.5, 0.5, 1.0], [0.25, 0.5, 2]).tolist()
    [0.5, 1.0, 1.0]
    """
    x, s = np.asarray(x, dtype=np.float64), np.asarray(s, dtype=np.float64)
    at = np.asarray(at, dtype=np.float64)
    j = np.searchsorted(x, at, side="right") - 1  # the last point with x ≤ at
    j = np.clip(j, 0, x.size - 1)
    nxt = np.minimum(j + 1, x.size - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(x[nxt] > x[j], (at - x[j]) / (x[nxt] - x[j]), 0.0)
    return s[j] + np.clip(frac, 0.0, 1.0) * (s[nxt] - s[j])


def _resamples(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """The bootstrap's resamples of images: ``(n_bootstrap, n)`` indices, one seeded draw that
    every metric of one evaluation shares (so their intervals are paired)."""
    return np.random.default_rng(seed).integers(0, n, size=(int(n_bootstrap), n))


def _weights(idx: np.ndarray, n: int, cells_per_row: int):
    """Yield ``(b, n)`` multiplicity rows of the resamples ``idx``, chunked to bound memory."""
    chunk = max(1, _CHUNK_ELEMENTS // max(1, cells_per_row))
    for start in range(0, idx.shape[0], chunk):
        part = idx[start : start + chunk]
        b = part.shape[0]
        flat = (part + (np.arange(b) * n)[:, None]).ravel()
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def _froc_point(m: Matching, fps: np.ndarray) -> dict:
    curve = _Curve(m)
    x, s, tp = curve.points(np.ones((1, m.n_images)))
    return {
        "curve": curve,
        "x": x[0],
        "s": s[0],
        "tp": tp[0],
        "at": froc_sensitivity(x[0], s[0], fps),
    }


def _check_fps(fps_per_image) -> np.ndarray:
    fps = np.asarray(fps_per_image, dtype=np.float64).ravel()
    if fps.size == 0 or not np.isfinite(fps).all() or (fps <= 0).any():
        raise ConfigError(f"fps_per_image must be positive numbers; got {list(fps_per_image)}")
    return fps


def froc(
    gt,
    pred,
    fps_per_image: Sequence[float] = FROC_FPS,
    *,
    iou_threshold: float = IOU_THRESHOLD,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    matching: Matching | None = None,
    resamples: np.ndarray | None = None,
) -> dict:
    """Lesion sensitivity at each rate of ``fps_per_image`` false positives per image, the
    FROC score (their mean) and the curve, with image-level bootstrap CIs.

    Returns ``{"fps_per_image": [...], "sensitivity": [{"value", "ci"}, ...], "score":
    {"value", "ci"}, "curve": {"fps_per_image", "sensitivity", "threshold"}, "band":
    {"fps_per_image", "lower", "upper"}, "n_images", "n_lesions"}``. The curve's first point
    is (0, 0) at threshold None (+∞); ``band`` is the bootstrap interval of the sensitivity on
    a log grid of FP rates (None without resamples). Everything is None without lesions.
    ``matching`` / ``resamples`` (``(B, N)`` image indices) let a caller share them.

    >>> gt = np.array([[[0, 0, .5, .5, 0]], [[0, 0, .5, .5, 0]]])
    >>> pred = np.array([[[0, 0, .5, .5, .9, 0]], [[.5, .5, 1, 1, .8, 0]]])
    >>> froc(gt, pred, [0.5, 1], n_bootstrap=0)["sensitivity"]
    [{'value': 0.5, 'ci': None}, {'value': 0.5, 'ci': None}]
    """
    fps = _check_fps(fps_per_image)
    _check_bootstrap(n_bootstrap, confidence)
    m = matching if matching is not None else match_detections(gt, pred, iou_threshold)
    out: dict = {
        "fps_per_image": [float(f) for f in fps],
        "n_images": m.n_images,
        "n_lesions": m.n_lesions,
        "iou_threshold": iou_threshold,
    }
    if m.n_lesions == 0:
        empty = {"value": None, "ci": None}
        return {
            **out,
            "sensitivity": [dict(empty) for _ in fps],
            "score": dict(empty),
            "curve": None,
            "band": None,
        }
    point = _froc_point(m, fps)
    curve = point["curve"]
    grid = np.unique(np.r_[np.geomspace(fps.min(), fps.max(), BAND_POINTS), fps])
    boot_at, boot_grid = None, None
    if resamples is None and n_bootstrap > 0:
        resamples = _resamples(m.n_images, n_bootstrap, seed)
    if resamples is not None and resamples.shape[0] > 0:
        at_parts, grid_parts = [], []
        for w in _weights(resamples, m.n_images, curve.image.size + m.n_images):
            x, s, _ = curve.points(w)
            at_parts.append(np.array([froc_sensitivity(x[r], s[r], fps) for r in range(len(w))]))
            grid_parts.append(np.array([froc_sensitivity(x[r], s[r], grid) for r in range(len(w))]))
        boot_at, boot_grid = np.vstack(at_parts), np.vstack(grid_parts)
    out["sensitivity"] = [
        value_entry(float(v), None if boot_at is None else boot_at[:, c], confidence)
        for c, v in enumerate(point["at"])
    ]
    out["score"] = value_entry(
        float(point["at"].mean()),
        None if boot_at is None else boot_at.mean(axis=1),
        confidence,
    )
    thresholds = curve.thresholds()
    out["curve"] = {
        "fps_per_image": [float(v) for v in point["x"]],
        "sensitivity": [float(v) for v in point["s"]],
        "threshold": [None if not np.isfinite(t) else float(t) for t in thresholds],
    }
    out["band"] = None
    if boot_grid is not None:
        bands = [interval(boot_grid[:, c], confidence) for c in range(grid.size)]
        out["band"] = {
            "fps_per_image": [float(v) for v in grid],
            "lower": [None if b is None else b[0] for b in bands],
            "upper": [None if b is None else b[1] for b in bands],
        }
    return out


def operating_points(
    gt=None,
    pred=None,
    fps_per_image: Sequence[float] = FROC_FPS,
    *,
    iou_threshold: float = IOU_THRESHOLD,
    matching: Matching | None = None,
) -> list[dict]:
    """The score threshold of each FP rate: the lowest threshold (the most detections kept)
    whose false positives per image stay at or below the rate, and the sensitivity, precision
    (hits / detections kept) and FP rate there. Chosen on the data given: optimistic on a test
    split, so confirm them on new data.

    Each entry: ``{"fps_per_image_target", "threshold", "fps_per_image", "sensitivity",
    "precision", "n_detections"}``; ``threshold`` None when no detection fits the rate.
    """
    fps = _check_fps(fps_per_image)
    m = matching if matching is not None else match_detections(gt, pred, iou_threshold)
    curve = _Curve(m)
    x, s, tp = (a[0] for a in curve.points(np.ones((1, m.n_images))))
    thresholds = curve.thresholds()
    kept = np.r_[0, curve.ends + 1]
    out = []
    for target in fps:
        j = int(np.searchsorted(x, target + 1e-12, side="right") - 1)
        n_det = int(kept[j])
        out.append(
            {
                "fps_per_image_target": float(target),
                "threshold": None if j == 0 else float(thresholds[j]),
                "fps_per_image": float(x[j]),
                "sensitivity": None if m.n_lesions == 0 else float(s[j]),
                "precision": float(tp[j] / n_det) if n_det else None,
                "n_detections": n_det,
            }
        )
    return out


# --------------------------------------------------------------------------- IoU of matches


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """``np.median`` of ``values`` each repeated ``weights`` (whole) times."""
    order = np.argsort(values, kind="stable")
    v, cum = values[order], np.cumsum(weights[order])
    total = cum[-1] if cum.size else 0
    if total <= 0:
        return np.nan
    lo = v[np.searchsorted(cum, (total - 1) // 2, side="right")]
    hi = v[np.searchsorted(cum, total // 2, side="right")]
    return float((lo + hi) / 2)


def median_iou(
    gt=None,
    pred=None,
    *,
    iou_threshold: float = IOU_THRESHOLD,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    matching: Matching | None = None,
    resamples: np.ndarray | None = None,
) -> dict:
    """``{"value", "ci"}``: the median IoU of the found lesions with the boxes that found them
    (every lesion found at any score, so it is at least ``iou_threshold``), with an
    image-level bootstrap interval; None when no lesion is found."""
    _check_bootstrap(n_bootstrap, confidence)
    m = matching if matching is not None else match_detections(gt, pred, iou_threshold)
    ious, image = m.lesion_iou[m.found], m.lesion_image[m.found]
    if ious.size == 0:
        return {"value": None, "ci": None}
    if resamples is None and n_bootstrap > 0:
        resamples = _resamples(m.n_images, n_bootstrap, seed)
    boot = None
    if resamples is not None and resamples.shape[0] > 0:
        boot = np.array(
            [
                _weighted_median(ious, w[image])
                for chunk in _weights(resamples, m.n_images, m.n_images)
                for w in chunk
            ]
        )
    return value_entry(float(np.median(ious)), boot, confidence)


# --------------------------------------------------------------------------- image level


def image_scores(pred, n_classes: int) -> np.ndarray:
    """``(N, K)``: each image's highest box score of each class (0 where it has none), the
    image-level score that makes a detector comparable with a classifier."""
    p = np.asarray(pred, dtype=np.float64)
    out = np.zeros((p.shape[0], int(n_classes)))
    cls = p[..., 5].astype(np.int64)
    for k in range(int(n_classes)):
        out[:, k] = np.where(cls == k, p[..., 4], 0.0).max(axis=1, initial=0.0)
    return out


def image_labels(gt, n_classes: int) -> np.ndarray:
    """``(N, K)`` 0/1: whether each image has a true box of each class."""
    g = np.asarray(gt, dtype=np.float64)
    cls = g[..., 4].astype(np.int64)
    return np.stack([(cls == k).any(axis=1) for k in range(int(n_classes))], axis=1).astype(float)


def image_auroc(
    gt,
    pred,
    classes: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Image-level AUROC of the top box score against "the image has a box of the class":
    ``{"auroc_macro": {"value", "ci"}, "per_class": {name: {"value", "ci"}}, "notes"}``.
    The multi-label metric code scores it (scikit-learn point values, image bootstrap), so a
    detection run's number means exactly what a multi-label classifier's ``auroc_macro`` does;
    a class present in all or no images has no AUROC and is left out of the mean."""
    from medsight.tasks.multilabel_metrics import compute_metrics

    g, p = _check_arrays(gt, pred)
    names = _check_classes(g, p, classes)
    k = len(names)
    scored = compute_metrics(
        image_labels(g, k),
        image_scores(p, k),
        names,
        n_bootstrap=n_bootstrap,
        seed=seed,
        confidence=confidence,
    )
    return {
        "auroc_macro": scored["auroc_macro"],
        "per_class": {name: scored["per_finding"][name]["auroc"] for name in names},
        "notes": scored["notes"],
    }


# --------------------------------------------------------------------------- COCO mAP


def _as_torchmetrics(g: np.ndarray, p: np.ndarray):
    import torch

    preds, target = [], []
    for gi, pi in zip(g, p):
        gi, pi = gi[gi[:, 4] >= 0], pi[pi[:, 5] >= 0]
        preds.append(
            {
                "boxes": torch.as_tensor(pi[:, :4], dtype=torch.float64),
                "scores": torch.as_tensor(pi[:, 4], dtype=torch.float64),
                "labels": torch.as_tensor(pi[:, 5], dtype=torch.int64),
            }
        )
        target.append(
            {
                "boxes": torch.as_tensor(gi[:, :4], dtype=torch.float64),
                "labels": torch.as_tensor(gi[:, 4], dtype=torch.int64),
            }
        )
    return preds, target


def _torchmetrics_map(g: np.ndarray, p: np.ndarray, k: int) -> dict:
    from torchmetrics.detection import MeanAveragePrecision

    # COCO's own thresholds in float64 (torchmetrics' defaults are float32 approximations,
    # which move AP in the 5th digit away from pycocotools').
    metric = MeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        iou_thresholds=np.linspace(0.5, 0.95, 10).tolist(),
        rec_thresholds=np.linspace(0.0, 1.0, 101).tolist(),
        class_metrics=True,
        backend="pycocotools",
    )
    preds, target = _as_torchmetrics(g, p)
    metric.update(preds, target)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = metric.compute()

    def defined(v) -> float | None:
        v = float(v)
        return None if v < 0 else v

    per_class: list[float | None] = [None] * k
    ids = result["classes"].reshape(-1).tolist()
    values = result["map_per_class"].reshape(-1).tolist()
    for c, v in zip(ids, values):
        if 0 <= int(c) < k:
            per_class[int(c)] = defined(v)
    return {
        "map": defined(result["map"]),
        "map50": defined(result["map_50"]),
        "map75": defined(result["map_75"]),
        "ap_per_class": per_class,
    }


class _CocoEval:
    """pycocotools' evaluation of the data once, per image; any resample of images is then
    scored by re-accumulating those per-image results (pycocotools' own ``accumulate``)."""

    def __init__(self, g: np.ndarray, p: np.ndarray, k: int):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        n = g.shape[0]
        images = [{"id": i} for i in range(n)]
        categories = [{"id": c} for c in range(k)]

        def annotations(a: np.ndarray, with_score: bool) -> list[dict]:
            out = []
            col = 5 if with_score else 4
            for i, rows in enumerate(a):
                for row in rows[rows[:, col] >= 0]:
                    w, h = float(row[2] - row[0]), float(row[3] - row[1])
                    ann = {
                        "id": len(out) + 1,
                        "image_id": i,
                        "category_id": int(row[col]),
                        "bbox": [float(row[0]), float(row[1]), w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                    if with_score:
                        ann["score"] = float(row[4])
                    out.append(ann)
            return out

        with contextlib.redirect_stdout(io.StringIO()):
            truth, found = COCO(), COCO()
            truth.dataset = {
                "images": images,
                "categories": categories,
                "annotations": annotations(g, False),
            }
            found.dataset = {
                "images": images,
                "categories": categories,
                "annotations": annotations(p, True),
            }
            truth.createIndex()
            found.createIndex()
            ev = COCOeval(truth, found, iouType="bbox")
            ev.params.imgIds = list(range(n))
            ev.params.catIds = list(range(k))
            ev.params.areaRng = [[0.0, 1e10]]
            ev.params.areaRngLbl = ["all"]
            ev.params.maxDets = [MAX_DETECTIONS]
            ev.evaluate()
        self.ev, self.n, self.k = ev, n, k
        self.base = list(ev.evalImgs)
        self.iou_thresholds = ev.params.iouThrs
        self.recall = ev.params.recThrs

    def precision(self, idx: np.ndarray | None = None) -> np.ndarray:
        """COCO's interpolated precision ``(T, R, K)`` of the images ``idx`` (with repeats;
        None: the data as given); -1 for a class without true boxes."""
        n = self.n
        if idx is None:
            self.ev.evalImgs = self.base
        else:
            self.ev.evalImgs = [self.base[c * n + int(i)] for c in range(self.k) for i in idx]
        with contextlib.redirect_stdout(io.StringIO()):
            self.ev.accumulate()
        return self.ev.eval["precision"][:, :, :, 0, 0]


def _ap_from_precision(prec: np.ndarray) -> dict:
    """mAP, mAP@0.5 and per-class APs of a ``(T, R, K)`` precision array (COCO's mean over the
    entries > -1)."""

    def mean(a: np.ndarray) -> float:
        a = a[a > -1]
        return float(a.mean()) if a.size else np.nan

    k = prec.shape[2]
    return {
        "map": mean(prec),
        "map50": mean(prec[0]),
        "ap": np.array([mean(prec[:, :, c]) for c in range(k)]),
        "ap50": np.array([mean(prec[0, :, c]) for c in range(k)]),
    }


def coco_map(
    gt,
    pred,
    classes: Sequence[str],
    *,
    n_bootstrap: int = MAP_BOOTSTRAP,
    seed: int = 0,
    confidence: float = 0.95,
    resamples: np.ndarray | None = None,
) -> dict:
    """COCO mean average precision: ``map`` (IoU 0.5:0.95), ``map50``, ``map75`` and per class
    ``ap`` / ``ap50``, from torchmetrics' ``MeanAveragePrecision`` (pycocotools backend), with
    image-level bootstrap CIs from pycocotools' accumulation over resampled images; and the PR
    curve of each class at IoU 0.5 (COCO's 101 recall points and interpolated precision).

    Returns ``{"map", "map50", "map75": {"value", "ci"}, "per_class": {name: {"ap", "ap50"}},
    "pr_curves": {name: {"recall", "precision"} | None}, "n_resamples"}``.
    """
    g, p = _check_arrays(gt, pred)
    names = _check_classes(g, p, classes)
    _check_bootstrap(n_bootstrap, confidence)
    k = len(names)
    tm = _torchmetrics_map(g, p, k)
    coco = _CocoEval(g, p, k)
    prec = coco.precision()
    if resamples is None and n_bootstrap > 0:
        resamples = _resamples(g.shape[0], n_bootstrap, seed)
    boot = None
    if resamples is not None and resamples.shape[0] > 0:
        draws = [_ap_from_precision(coco.precision(idx)) for idx in resamples]
        boot = {key: np.array([d[key] for d in draws]) for key in draws[0]}
        coco.precision()  # leave the evaluation as the data gave it
    out = {
        "map": value_entry(tm["map"], None if boot is None else boot["map"], confidence),
        "map50": value_entry(tm["map50"], None if boot is None else boot["map50"], confidence),
        "map75": value_entry(tm["map75"], None, confidence),
        "per_class": {},
        "pr_curves": {},
        "n_resamples": 0 if resamples is None else int(resamples.shape[0]),
    }
    point = _ap_from_precision(prec)
    for c, name in enumerate(names):
        ap50 = point["ap50"][c]
        out["per_class"][name] = {
            "ap": value_entry(
                tm["ap_per_class"][c], None if boot is None else boot["ap"][:, c], confidence
            ),  # fmt: skip
            "ap50": value_entry(
                None if np.isnan(ap50) else float(ap50),
                None if boot is None else boot["ap50"][:, c],
                confidence,
            ),
        }
        curve = prec[0, :, c]
        out["pr_curves"][name] = (
            None
            if (curve < 0).all()
            else {
                "recall": [float(r) for r in coco.recall],
                "precision": [float(v) for v in curve],
            }
        )
    return out


# --------------------------------------------------------------------------- public API


def validation_scores(gt, pred) -> dict[str, float | None]:
    """The cheap per-validation scores (no CIs): ``map``, ``map50`` (torchmetrics / COCO) and
    ``sensitivity_at_1fp`` (lesion sensitivity at one false positive per image); None where
    undefined (no true box)."""
    g, p = _check_arrays(gt, pred)
    k = int(max(g[..., 4].max(initial=-1), p[..., 5].max(initial=-1))) + 1
    if k == 0 or not (g[..., 4] >= 0).any():
        return {"map": None, "map50": None, "sensitivity_at_1fp": None}
    tm = _torchmetrics_map(g, p, k)
    m = match_detections(g, p)
    sens = _froc_point(m, np.array([1.0]))["at"][0]
    return {"map": tm["map"], "map50": tm["map50"], "sensitivity_at_1fp": float(sens)}


def detection_metrics(
    gt,
    pred,
    classes: Sequence[str],
    positive: str | None = None,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    iou_threshold: float = IOU_THRESHOLD,
    fps_per_image: Sequence[float] = FROC_FPS,
) -> dict:
    """The detection metric set with image-level bootstrap CIs: the body of ``metrics.json``.

    Keys (plain Python types; undefined values are None, explained in ``notes``):

    * :data:`HEADLINE`, each ``{"value", "ci"}``: ``map50``, ``map`` (COCO AP at IoU 0.5 and
      0.5:0.95, mean over classes), ``sensitivity_at_1fp`` (lesion sensitivity at 1 false
      positive per image), ``froc_score`` (mean sensitivity at the 7 FP rates), ``median_iou``
      (of the found lesions' boxes), ``auroc_macro`` (image-level AUROC of the top box score,
      mean over classes); also ``map75`` (no CI);
    * ``froc``: :func:`froc`'s result (the 7 points with CIs, the curve, the CI band);
    * ``per_class``: per class ``n_lesions``, ``n_images`` (with a box of it),
      ``n_detections``, ``sensitivity`` (lesions found at any score), ``ap``, ``ap50`` and
      ``auroc`` (image level), the last three ``{"value", "ci"}``;
    * ``curves``: ``{"pr": {class: {"recall", "precision"} | None}}`` at IoU 0.5;
    * ``operating_points``: :func:`operating_points` at the FROC rates;
    * ``n``, ``n_images``, ``n_lesions``, ``n_detections``, ``classes``, ``positive``,
      ``iou_threshold``, ``bootstrap`` (``n``, ``n_map``, ``seed``), ``notes``.

    ``positive`` is accepted for the task interface and recorded; detection has no single
    urgent class. The AP intervals use at most :data:`MAP_BOOTSTRAP` of the resamples.
    """
    g, p = _check_arrays(gt, pred)
    names = _check_classes(g, p, classes)
    _check_bootstrap(n_bootstrap, confidence)
    fps = _check_fps(fps_per_image)
    n = g.shape[0]
    m = match_detections(g, p, iou_threshold)
    resamples = _resamples(n, n_bootstrap, seed) if n_bootstrap > 0 else None
    map_resamples = None if resamples is None else resamples[:MAP_BOOTSTRAP]
    curve = froc(
        g,
        p,
        fps,
        iou_threshold=iou_threshold,
        n_bootstrap=n_bootstrap,
        confidence=confidence,
        matching=m,
        resamples=resamples,
    )
    one = np.flatnonzero(np.isclose(fps, 1.0))
    if one.size:
        at_1 = curve["sensitivity"][int(one[0])]
    else:
        at_1 = froc(
            g, p, [1.0], n_bootstrap=n_bootstrap, confidence=confidence,
            matching=m, resamples=resamples,
        )["sensitivity"][0]  # fmt: skip
    aps = coco_map(
        g, p, names, n_bootstrap=n_bootstrap, confidence=confidence, resamples=map_resamples
    )
    image = image_auroc(g, p, names, n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)
    result: dict = {
        "n": int(n),
        "n_images": int(n),
        "n_lesions": m.n_lesions,
        "n_detections": int(m.hit.size),
        "classes": names,
        "positive": positive,
        "iou_threshold": float(iou_threshold),
        "map50": aps["map50"],
        "map": aps["map"],
        "sensitivity_at_1fp": at_1,
        "froc_score": curve["score"],
        "median_iou": median_iou(
            matching=m, n_bootstrap=n_bootstrap, confidence=confidence, resamples=resamples
        ),
        "auroc_macro": image["auroc_macro"],
        "map75": aps["map75"],
        "froc": curve,
    }
    per_class = {}
    for c, name in enumerate(names):
        lesions = m.lesion_class == c
        per_class[name] = {
            "n_lesions": int(lesions.sum()),
            "n_images": int(np.unique(m.lesion_image[lesions]).size),
            "n_detections": int((m.det_class == c).sum()),
            "sensitivity": float(m.found[lesions].mean()) if lesions.any() else None,
            "ap": aps["per_class"][name]["ap"],
            "ap50": aps["per_class"][name]["ap50"],
            "auroc": image["per_class"][name],
        }
    result["per_class"] = per_class
    result["curves"] = {"pr": aps["pr_curves"]}
    result["operating_points"] = operating_points(fps_per_image=fps, matching=m)
    result["bootstrap"] = {
        "n": int(n_bootstrap),
        "n_map": aps["n_resamples"],
        "seed": int(seed),
        "confidence": float(confidence),
    }
    notes = []
    if m.n_lesions == 0:
        notes.append(
            "no image has a true box: sensitivity, FROC, AP and the IoU of matches are "
            "undefined (—)"
        )
    absent = [name for name, e in per_class.items() if e["n_lesions"] == 0]
    if absent and m.n_lesions:
        notes.append(
            f"class(es) {', '.join(map(repr, absent))} have no true box here: no AP or image "
            "AUROC (—), left out of the means; their detections still count as false positives "
            "in the FROC"
        )
    notes += [note for note in image["notes"] if note not in notes and "no positive" not in note]
    if 0 < aps["n_resamples"] < n_bootstrap:
        notes.append(
            f"the AP intervals use {aps['n_resamples']} of the {n_bootstrap} bootstrap "
            "resamples (each re-accumulates COCO's evaluation); the other intervals use all"
        )
    if (p[..., 5] >= 0).sum(axis=1).max(initial=0) > MAX_DETECTIONS:
        notes.append(
            f"some images have more than {MAX_DETECTIONS} detections: COCO's AP keeps the "
            f"{MAX_DETECTIONS} best of each image; the FROC keeps them all"
        )
    result["notes"] = notes
    return result
