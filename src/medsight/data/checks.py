"""Audit a SampleTable before training: unreadable or tiny files, duplicates, leakage, balance.

:func:`check_samples` decodes every image once and returns a :class:`CheckReport`; the CLI
prints it as tables and JSON. Nothing is fixed silently: the report names each problem file,
duplicate group and patient that crosses splits.

A multi-label table (several findings per image) is counted per finding instead of per label
text: prevalence per finding and split, pairs of findings seen together, images without a
finding, and each finding a split lacks (a warning: its metrics there cannot be computed);
see :func:`multilabel_summary`.

A detection table (boxes, :mod:`medsight.data.boxes`) is counted per box class: images where
a class is present per split (as for findings), and the boxes themselves: per image (mean, max,
images without any), per class and split, and the boxes a model cannot learn from as drawn:
outside their image, of zero area, or duplicated (same image and class, IoU above
:data:`DUPLICATE_IOU`); see :func:`detection_summary`.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from medsight.data.boxes import is_detection, parse_boxes
from medsight.data.findings import NO_FINDING, is_multilabel, multi_hot
from medsight.data.imaging import DEFAULT_MAX_PIXELS, MIN_SIDE
from medsight.data.sources import class_names, iter_decoded
from medsight.errors import ImageDecodeError

UNASSIGNED = "unassigned"
#: Two boxes of one class in one image overlapping more than this are counted as duplicates.
DUPLICATE_IOU = 0.95


@dataclass
class CheckReport:
    """What :func:`check_samples` found; ``to_dict()`` is the ``--json`` document."""

    n_images: int
    n_readable: int
    classes: dict[str, int]
    splits: dict[str, dict[str, int]]
    sizes: dict[str, int]
    channels: dict[str, int]
    unreadable: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    leakage: list[dict] = field(default_factory=list)
    imbalance_ratio: float | None = None
    unlabelled: int = 0
    ignored_files: dict[str, int] = field(default_factory=dict)
    too_small: list[dict] = field(default_factory=list)
    multilabel: dict | None = None  # multilabel_summary() of a multi-label table
    detection: dict | None = None  # detection_summary() of a table with boxes
    volumes: dict | None = None  # volume_summary() of a 3-D table

    @property
    def usable(self) -> bool:
        """At least one image decodes."""
        return self.n_readable > 0

    @property
    def clean(self) -> bool:
        """No unreadable or too small file, no duplicate, no leakage, and for boxes none outside
        its image, of zero area or duplicated (what ``--strict`` demands)."""
        boxes = self.detection or {}
        bad_boxes = any(boxes.get(k) for k in ("outside", "zero_area", "duplicate_boxes"))
        return not (
            self.unreadable or self.too_small or self.duplicates or self.leakage or bad_boxes
        )

    def to_dict(self) -> dict:
        return asdict(self)


def check_samples(
    table: pd.DataFrame,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[int], None] | None = None,
) -> CheckReport:
    """Decode every image of ``table`` and report problems; one bad file never stops the audit.

    >>> report = check_samples(load_samples("data/"))      # doctest: +SKIP
    >>> report.leakage                                      # doctest: +SKIP
    [{'kind': 'patient', 'patient_id': 'P7', 'splits': {'train': 3, 'test': 1}}]
    """
    splits = table["split"].fillna(UNASSIGNED)
    labels = table["label"]
    geometry: dict[str, dict] = {}
    decoded = iter_decoded(table, max_pixels=max_pixels)
    if table.attrs.get("dims") == 3:
        decoded = _iter_volumes(table, max_pixels, geometry)
    unreadable: list[dict] = []
    too_small: list[dict] = []
    sizes: Counter[str] = Counter()
    channels: Counter[str] = Counter()
    by_hash: dict[str, list[int]] = defaultdict(list)
    sources = dict(zip(table["sample_id"], table["source"]))
    for position, (sample_id, result) in enumerate(decoded):
        if isinstance(result, ImageDecodeError):
            unreadable.append(
                {"sample_id": sample_id, "source": sources[sample_id], "reason": result.reason}
            )
        else:
            height, width = result.size
            sizes[getattr(result, "size_text", f"{width}x{height}")] += 1
            if min(height, width) < MIN_SIDE:
                too_small.append(
                    {
                        "sample_id": sample_id,
                        "source": sources[sample_id],
                        "size": f"{width}x{height}",
                        "reason": f"{width}x{height} pixels is below the minimum of {MIN_SIDE} "
                        "on each side; training refuses it",
                    }
                )
            channels[result.channels] += 1
            # Hash the array's own buffer: tobytes() would copy the whole image once more.
            digest = hashlib.blake2b(np.ascontiguousarray(result.pixels).data, digest_size=16)
            digest.update(str(result.pixels.shape).encode())
            by_hash[digest.hexdigest()].append(position)
        if progress is not None:
            progress(1)

    duplicates, duplicate_leaks = [], []
    for digest, positions in by_hash.items():
        if len(positions) < 2:
            continue
        rows = table.iloc[positions]
        group_splits = sorted(set(splits.iloc[positions]))
        group = {
            "hash": digest,
            "sample_ids": rows["sample_id"].tolist(),
            "labels": sorted({str(v) for v in rows["label"].dropna()}),
            "splits": group_splits,
        }
        duplicates.append(group)
        assigned = [s for s in group_splits if s != UNASSIGNED]
        if len(assigned) > 1:
            duplicate_leaks.append({"kind": "duplicate", **group})

    leakage = _patient_leakage(table, splits) + duplicate_leaks
    readable_mask = ~table["sample_id"].isin({u["sample_id"] for u in unreadable})
    if is_multilabel(table) or is_detection(table):
        summary = multilabel_summary(table[readable_mask])
        return CheckReport(
            n_images=len(table),
            n_readable=int(readable_mask.sum()),
            # per finding: images where it is present (an image counts under each of its own)
            classes={f: v["count"] for f, v in summary["prevalence"]["all"].items()},
            splits={
                s: {f: v["count"] for f, v in by_finding.items()}
                for s, by_finding in summary["prevalence"].items()
                if s != "all"
            },
            sizes=dict(sizes.most_common()),
            channels=dict(channels.most_common()),
            unreadable=unreadable,
            duplicates=duplicates,
            leakage=leakage,
            unlabelled=int(labels[readable_mask].isna().sum()),
            ignored_files=dict(table.attrs.get("ignored", {})),
            too_small=too_small,
            multilabel=None if is_detection(table) else summary,
            detection=detection_summary(table[readable_mask]) if is_detection(table) else None,
        )
    volumes = volume_summary(geometry, splits, table["sample_id"]) if geometry else None
    class_counts = labels[readable_mask].value_counts()
    ordered = [c for c in class_names(table) if c in class_counts.index]
    classes = {c: int(class_counts[c]) for c in ordered}
    per_split: dict[str, dict[str, int]] = {}
    for split_name in ["train", "val", "test", UNASSIGNED]:
        in_split = readable_mask & (splits == split_name)
        if in_split.any():
            counts = labels[in_split].value_counts()
            per_split[split_name] = {c: int(counts.get(c, 0)) for c in ordered}
    imbalance = None
    if len(classes) > 1 and min(classes.values()) > 0:
        imbalance = round(max(classes.values()) / min(classes.values()), 3)
    return CheckReport(
        n_images=len(table),
        n_readable=int(readable_mask.sum()),
        classes=classes,
        splits=per_split,
        sizes=dict(sizes.most_common()),
        channels=dict(channels.most_common()),
        unreadable=unreadable,
        duplicates=duplicates,
        leakage=leakage,
        imbalance_ratio=imbalance,
        unlabelled=int(labels[readable_mask].isna().sum()),
        ignored_files=dict(table.attrs.get("ignored", {})),
        too_small=too_small,
        volumes=volumes,
    )


class _VolumeView:
    """A read volume as the audit loop sees an image: ``size`` (its last two axes, for the
    minimum-side check), ``channels`` and ``pixels`` (hashed for duplicates)."""

    def __init__(self, volume):
        self.pixels = volume.array
        shape = volume.shape
        self.size = (min(shape[1], shape[2]), min(shape[0], shape[2]))
        self.size_text = "x".join(map(str, shape))
        self.channels = "L" if volume.array.shape[0] == 1 else f"{volume.array.shape[0]}ch"


def _iter_volumes(table: pd.DataFrame, max_pixels: int, geometry: dict):
    """Each row's volume (or its error), its shape, spacing and orientation kept in
    ``geometry`` by sample id."""
    from medsight.data.volumes import read_volume, tilt_error

    volume_index = table.attrs.get("volume")
    for sample_id, source in zip(table["sample_id"], table["source"]):
        try:
            volume = read_volume(source, volume=volume_index, max_pixels=max_pixels)
        except ImageDecodeError as exc:
            yield sample_id, exc
            continue
        if "gantry_tilt" in volume.meta:  # named here; a run refuses or corrects it (--tilt)
            yield sample_id, tilt_error(volume)
            continue
        geometry[sample_id] = {
            "shape": "x".join(map(str, volume.shape)),
            "spacing": "x".join(f"{s:.3g}" for s in volume.spacing),
            "orientation": volume.orientation,
        }
        yield sample_id, _VolumeView(volume)


def volume_summary(geometry: dict[str, dict], splits: pd.Series, sample_ids: pd.Series) -> dict:
    """Shapes, spacings and orientations of the readable volumes, per split, and what is
    inconsistent across the set (``mixed``: the properties that take several values, which
    resampling to one spacing and RAS orientation evens out)."""
    split_of = dict(zip(sample_ids, splits))
    per_split: dict[str, dict[str, Counter]] = {}
    for sample_id, found in geometry.items():
        into = per_split.setdefault(split_of[sample_id], defaultdict(Counter))
        for key, value in found.items():
            into[key][value] += 1
    overall = {
        key: Counter(found[key] for found in geometry.values())
        for key in ("shape", "spacing", "orientation")
    }
    return {
        "per_split": {
            split: {key: dict(counter.most_common()) for key, counter in found.items()}
            for split, found in per_split.items()
        },
        "mixed": [key for key, counter in overall.items() if len(counter) > 1],
    }


def multilabel_summary(table: pd.DataFrame) -> dict:
    """Counts of a multi-label table's findings, per split (``train``, ``val``, ``test``,
    ``unassigned``, those present) and over ``all`` images:

    * ``prevalence[split][finding]`` = ``{"count", "percent"}``: images where it is present,
      and their share of the split's labelled images;
    * ``no_finding[split]`` = ``{"count", "percent"}``: images labelled with no finding;
    * ``uncertain[finding]``: images where it is uncertain and ignored (only those with any);
    * ``co_occurrence``: ``[{"findings": [a, b], "count", "percent"}]``, every pair seen
      together in at least one image, most frequent first;
    * ``missing``: ``[{"split", "finding"}]``, each finding with no image in a split (over
      ``all``: a finding that never occurs).

    Unlabelled images (no label at all) are left out of every count and share.

    >>> multilabel_summary(table)["prevalence"]["train"]["effusion"]   # doctest: +SKIP
    {'count': 12, 'percent': 8.3}
    """
    findings = list(table.attrs["classes"])
    labelled = table[table["label"].notna()]
    matrix = multi_hot(labelled["label"], findings)
    present = np.nan_to_num(matrix, nan=0.0).astype(np.int64)
    splits = labelled["split"].fillna(UNASSIGNED).to_numpy()
    groups = {"all": np.ones(len(labelled), dtype=bool)}
    for name in ("train", "val", "test", UNASSIGNED):
        if (splits == name).any():
            groups[name] = splits == name
    prevalence, no_finding, missing = {}, {}, []
    for name, rows in groups.items():
        n = int(rows.sum())
        counts = present[rows].sum(axis=0)
        prevalence[name] = {f: _count(int(c), n) for f, c in zip(findings, counts)}
        no_finding[name] = _count(int((labelled["label"][rows] == NO_FINDING).sum()), n)
        missing += [{"split": name, "finding": f} for f, c in zip(findings, counts) if c == 0]
    uncertain = {f: int(c) for f, c in zip(findings, np.isnan(matrix).sum(axis=0)) if c}
    together = present.T @ present  # (K, K): images with both
    pairs = [
        {"findings": [findings[a], findings[b]], **_count(int(together[a, b]), len(labelled))}
        for a in range(len(findings))
        for b in range(a + 1, len(findings))
        if together[a, b]
    ]
    pairs.sort(key=lambda p: -p["count"])  # stable: ties keep the findings' order
    return {
        "findings": findings,
        "images": {name: int(rows.sum()) for name, rows in groups.items()},
        "prevalence": prevalence,
        "no_finding": no_finding,
        "uncertain": uncertain,
        "co_occurrence": pairs,
        "missing": missing,
    }


def detection_summary(table: pd.DataFrame) -> dict:
    """Counts of a detection table's boxes:

    * ``boxes``: all boxes; ``boxes_per_image`` = ``{"mean", "max"}``;
      ``images_without_boxes`` (negatives) and ``images``;
    * ``boxes_per_class[split][class]`` for ``all`` and each split present (``unassigned`` for
      rows without one); ``images_per_class[class]``: images with at least one;
    * ``outside``: boxes reaching beyond their image (``{"sample_id", "box", "size"}``);
      ``zero_area``: boxes with ``x2 <= x1`` or ``y2 <= y1``; ``duplicate_boxes``: pairs of
      one image and class with IoU above :data:`DUPLICATE_IOU` (``{"sample_id", "boxes",
      "iou"}``); ``unknown_classes``: box classes not in the table's classes;
    * ``reader_fixes``: what the reader already did (boxes of zero area dropped, boxes partly
      outside clipped), from ``table.attrs["box_fixes"]``.

    >>> detection_summary(table)["boxes_per_image"]        # doctest: +SKIP
    {'mean': 13.4, 'max': 32}
    """
    classes = list(table.attrs.get("classes", []))
    splits = table["split"].fillna(UNASSIGNED).to_numpy()
    per_class: dict[str, Counter] = {"all": Counter()}
    images_per_class: Counter[str] = Counter()
    counts, outside, zero_area, duplicates, unknown = [], [], [], [], set()
    for sample_id, text, width, height, split in zip(
        table["sample_id"], table["boxes"], table["width"], table["height"], splits
    ):
        boxes = parse_boxes(text)
        counts.append(len(boxes))
        per_class.setdefault(str(split), Counter())
        for box in boxes:
            per_class["all"][box[4]] += 1
            per_class[str(split)][box[4]] += 1
        images_per_class.update({b[4] for b in boxes})
        unknown |= {b[4] for b in boxes} - set(classes)
        for box in boxes:
            x1, y1, x2, y2 = box[:4]
            if x2 <= x1 or y2 <= y1:
                zero_area.append({"sample_id": str(sample_id), "box": box})
            if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
                outside.append(
                    {"sample_id": str(sample_id), "box": box, "size": f"{width}x{height}"}
                )
        duplicates += _duplicate_boxes(str(sample_id), boxes)
    order = classes + sorted(unknown)
    split_order = ["all", "train", "val", "test", UNASSIGNED]
    counts_array = np.asarray(counts, dtype=np.int64)
    return {
        "classes": classes,
        "images": len(counts),
        "boxes": int(counts_array.sum()),
        "boxes_per_image": {
            "mean": round(float(counts_array.mean()), 2) if len(counts) else 0.0,
            "max": int(counts_array.max()) if len(counts) else 0,
        },
        "images_without_boxes": int((counts_array == 0).sum()),
        "boxes_per_class": {
            s: {c: int(per_class[s].get(c, 0)) for c in order}
            for s in split_order
            if s in per_class
        },
        "images_per_class": {c: int(images_per_class.get(c, 0)) for c in order},
        "outside": outside,
        "zero_area": zero_area,
        "duplicate_boxes": duplicates,
        "unknown_classes": sorted(unknown),
        "reader_fixes": dict(table.attrs.get("box_fixes", {})),
    }


def _duplicate_boxes(sample_id: str, boxes: list[list]) -> list[dict]:
    """Pairs of boxes of one class in one image with IoU above :data:`DUPLICATE_IOU`."""
    found = []
    by_class: dict[str, list[list]] = defaultdict(list)
    for box in boxes:
        by_class[box[4]].append(box)
    for same in by_class.values():
        if len(same) < 2:
            continue
        xy = np.asarray([b[:4] for b in same], dtype=np.float64)
        area = np.clip(xy[:, 2] - xy[:, 0], 0, None) * np.clip(xy[:, 3] - xy[:, 1], 0, None)
        lo = np.maximum(xy[:, None, :2], xy[None, :, :2])
        hi = np.minimum(xy[:, None, 2:], xy[None, :, 2:])
        inter = np.clip(hi - lo, 0, None).prod(axis=2)
        union = area[:, None] + area[None, :] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        for a, b in zip(*np.triu_indices(len(same), k=1)):
            if iou[a, b] > DUPLICATE_IOU:
                found.append(
                    {
                        "sample_id": sample_id,
                        "boxes": [same[a], same[b]],
                        "iou": round(float(iou[a, b]), 3),
                    }
                )
    return found


def _count(count: int, total: int) -> dict:
    return {"count": count, "percent": round(100.0 * count / total, 1) if total else 0.0}


def _patient_leakage(table: pd.DataFrame, splits: pd.Series) -> list[dict]:
    known = table["patient_id"].notna() & (splits != UNASSIGNED)
    if not known.any():
        return []
    frame = pd.DataFrame({"patient": table["patient_id"][known], "split": splits[known]})
    leaks = []
    for patient, rows in frame.groupby("patient", sort=True):
        counts = rows["split"].value_counts()
        if len(counts) > 1:
            ordered = {s: int(counts[s]) for s in ("train", "val", "test") if s in counts}
            leaks.append({"kind": "patient", "patient_id": str(patient), "splits": ordered})
    return leaks
