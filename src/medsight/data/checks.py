"""Audit a SampleTable before training: unreadable or tiny files, duplicates, leakage, balance.

:func:`check_samples` decodes every image once and returns a :class:`CheckReport`; the CLI
prints it as tables and JSON. Nothing is fixed silently: the report names each problem file,
duplicate group and patient that crosses splits.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

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
