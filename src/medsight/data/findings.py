"""Several findings per image: how a multi-label SampleTable writes its labels.

A multi-label table keeps the one ``label`` column every reader fills, as text, so splits,
``splits.csv``, ``predictions.csv`` and the checks carry it unchanged:

* the findings present, in the table's finding order, joined by ``|``
  (``"cardiomegaly|effusion"``);
* ``"no finding"`` for an image with none (NIH ChestX-ray14's ``No Finding``; an empty text
  would read back from a CSV as a missing label);
* a finding whose label is uncertain and ignored (CheXpert's −1 under ``--uncertain ignore``)
  written with a ``?`` prefix (``"effusion|?edema"``): masked out of the loss and the metrics.

The table says it is multi-label in ``table.attrs``: ``task = "multilabel"`` and
``classes`` = the findings in order (a finding that never occurs is still one). A run keeps
that order in ``classes.json``.

>>> encode_rows(np.array([[1, 0, np.nan], [0, 0, 0]]), ["effusion", "edema", "mass"])
['effusion|?mass', 'no finding']
>>> multi_hot(["effusion|?mass", "no finding"], ["effusion", "edema", "mass"]).tolist()
[[1.0, 0.0, nan], [0.0, 0.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from medsight.errors import DataError

#: The task name a multi-label table and run carry.
MULTILABEL = "multilabel"
#: Joins the findings of one image.
SEPARATOR = "|"
#: The label of an image with no finding (so no finding may be called this).
NO_FINDING = "no finding"
#: Marks a finding whose label is uncertain and ignored.
UNCERTAIN = "?"
#: What to do with uncertain labels (CheXpert's −1, a blank cell): leave them out of the loss
#: and the metrics, count them as absent, or as present.
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")


def is_multilabel(table: pd.DataFrame) -> bool:
    """Whether ``table`` holds several findings per image (see the module docstring)."""
    return table.attrs.get("task") == MULTILABEL


def mark_multilabel(table: pd.DataFrame, findings: Sequence[str]) -> pd.DataFrame:
    """Record on ``table`` that its labels are findings, in this order; returns it."""
    table.attrs["task"] = MULTILABEL
    table.attrs["classes"] = list(findings)
    return table


def encode_rows(matrix: np.ndarray, findings: Sequence[str]) -> list[str]:
    """An ``(N, K)`` matrix of 1 / 0 / NaN (ignored) → one label text per row."""
    matrix = np.asarray(matrix, dtype=np.float64)
    labels = []
    for row in matrix:
        parts = []
        for name, value in zip(findings, row):
            if np.isnan(value):
                parts.append(UNCERTAIN + name)
            elif value == 1:
                parts.append(name)
        labels.append(SEPARATOR.join(parts) or NO_FINDING)
    return labels


def split_label(label: str) -> list[str]:
    """``"a|?b"`` → ``["a", "?b"]``; ``"no finding"`` → ``[]``."""
    return [part for part in str(label).split(SEPARATOR) if part and part != NO_FINDING]


def multi_hot(labels: Iterable, findings: Sequence[str]) -> np.ndarray:
    """Label texts → an ``(N, K)`` float32 matrix: 1 present, 0 absent, NaN ignored. A missing
    label (None / NaN: an unlabelled image) is a row of NaN. A name that is not a finding is
    refused, naming it."""
    index = {name: k for k, name in enumerate(findings)}
    rows, unknown = [], set()
    for label in labels:
        row = np.zeros(len(findings), dtype=np.float32)
        if label is None or (isinstance(label, float) and np.isnan(label)):
            row[:] = np.nan
            rows.append(row)
            continue
        for part in split_label(label):
            uncertain = part.startswith(UNCERTAIN)
            name = part[1:] if uncertain else part
            if name not in index:
                unknown.add(name)
                continue
            row[index[name]] = np.nan if uncertain else 1.0
        rows.append(row)
    if unknown:
        raise DataError(
            f"finding(s) {sorted(unknown)} are not findings of this run; findings: {list(findings)}"
        )
    return np.stack(rows) if rows else np.zeros((0, len(findings)), dtype=np.float32)


def positives(labels: Iterable, findings: Sequence[str]) -> np.ndarray:
    """Label texts → an ``(N, K)`` 0/1 integer matrix of the findings present (ignored
    entries count as absent): what splits are stratified on and checks count."""
    return np.nan_to_num(multi_hot(labels, findings), nan=0.0).astype(np.int64)
