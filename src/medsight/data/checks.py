"""Audit a SampleTable before training: unreadable or tiny files, duplicates, leakage, balance.

:func:`check_samples` decodes every image once and returns a :class:`CheckReport`; the CLI
prints it as tables and JSON. Nothing is fixed silently: the report names each problem file,
duplicate group and patient that crosses splits.

A multi-label table (several findings per image) is counted per finding instead of per label
text: prevalence per finding and split, pairs of findings seen together, images without a
finding, and each finding a split lacks (a warning: its metrics there cannot be computed);
see :func:`multilabel_summary`.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from medsight.data.findings import NO_FINDING, is_multilabel, multi_hot
from medsight.data.imaging import DEFAULT_MAX_PIXELS, MIN_SIDE
from medsight.data.sources import class_names, iter_decoded
from medsight.errors import ImageDecodeError

UNASSIGNED = "unassigned"


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

    @property
    def usable(self) -> bool:
        """At least one image decodes."""
        return self.n_readable > 0

    @property
    def clean(self) -> bool:
        """No unreadable or too small file, no duplicate, no leakage (what ``--strict`` demands)."""
        return not (self.unreadable or self.too_small or self.duplicates or self.leakage)

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
    unreadable: list[dict] = []
    too_small: list[dict] = []
    sizes: Counter[str] = Counter()
    channels: Counter[str] = Counter()
    by_hash: dict[str, list[int]] = defaultdict(list)
    sources = dict(zip(table["sample_id"], table["source"]))
    for position, (sample_id, result) in enumerate(iter_decoded(table, max_pixels=max_pixels)):
        if isinstance(result, ImageDecodeError):
            unreadable.append(
                {"sample_id": sample_id, "source": sources[sample_id], "reason": result.reason}
            )
        else:
            height, width = result.size
            sizes[f"{width}x{height}"] += 1
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
    if is_multilabel(table):
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
            multilabel=summary,
        )
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
    )


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
