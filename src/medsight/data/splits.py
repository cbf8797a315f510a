"""Patient-grouped, class-stratified splits: train/val/test by ratio, and k-fold.

No patient ever crosses splits when ``patient_id`` is known, class proportions stay as close to
the whole set's as grouping allows, and a seed makes every split repeatable. A split the data
already carries (a ``split`` column, MedMNIST's official one) is respected, never redrawn.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from medsight.data.sources import SPLITS
from medsight.errors import ConfigError, DataError

DEFAULT_RATIOS = (0.7, 0.15, 0.15)
_UNLABELLED = "\0unlabelled"


def assign_splits(
    table: pd.DataFrame, ratios: tuple[float, float, float] = DEFAULT_RATIOS, seed: int = 0
) -> pd.DataFrame:
    """Return a copy of ``table`` whose ``split`` column is filled (train/val/test).

    A table whose every row already has a split is returned unchanged; a partly split table is
    an error (mixing given and drawn splits would hide leakage). Rows are grouped by
    ``patient_id`` when present, so all images of one patient land in one split.

    >>> split = assign_splits(table, ratios=(0.8, 0.1, 0.1), seed=1)   # doctest: +SKIP
    >>> split.groupby("split").size()                                    # doctest: +SKIP
    """
    ratios = _check_ratios(ratios)
    given = table["split"].notna()
    if given.all():
        return table.copy()
    if given.any():
        raise DataError(
            f"{int((~given).sum())} of {len(table)} rows have no split while the others do; "
            "give every row a split (train/val/test) or none, so medsight assigns them all"
        )
    groups = group_keys(table)
    labels = table["label"].fillna(_UNLABELLED).to_numpy()
    classes, label_index = np.unique(labels, return_inverse=True)
    group_names, group_index = np.unique(groups, return_inverse=True)
    counts = np.zeros((len(group_names), len(classes)), dtype=np.int64)
    np.add.at(counts, (group_index, label_index), 1)

    targets = np.outer(ratios, counts.sum(axis=0)).astype(float)  # (split, class)
    assigned = np.zeros_like(targets)
    active = np.array([r > 0 for r in ratios])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(group_names))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]  # big groups first
    split_of_group = np.empty(len(group_names), dtype=np.int64)
    for g in order:
        deficit = (targets - assigned) @ counts[g]
        deficit[~active] = -np.inf
        best = int(np.argmax(deficit))
        split_of_group[g] = best
        assigned[best] += counts[g]
    out = table.copy()
    out["split"] = [SPLITS[s] for s in split_of_group[group_index]]
    return out


def group_keys(table: pd.DataFrame) -> np.ndarray:
    """The grouping key per row: the patient when known, else the sample itself."""
    patients = table["patient_id"]
    return np.where(
        patients.notna(), "patient:" + patients.astype(str), "sample:" + table["sample_id"]
    )


def max_folds(table: pd.DataFrame) -> int:
    """The most folds possible: each class must reach every fold (counted in patients)."""
    groups = pd.Series(group_keys(table), index=table.index)
    per_class = groups.groupby(table["label"].fillna(_UNLABELLED)).nunique()
    return int(per_class.min())


def kfold_assignments(table: pd.DataFrame, folds: int = 5, seed: int = 0) -> pd.Series:
    """Fold number (0..folds-1) per row: stratified by label, grouped by patient, seeded.

    Built on scikit-learn's ``StratifiedGroupKFold``; raises a ConfigError naming the maximum
    when ``folds`` exceeds the number of patients of the smallest class.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if folds < 2:
        raise ConfigError(f"folds must be at least 2, got {folds}")
    possible = max_folds(table)
    if folds > possible:
        raise ConfigError(
            f"folds={folds} is more than the smallest class has patients; "
            f"the maximum possible here is {possible}"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    labels = table["label"].fillna(_UNLABELLED).to_numpy()
    fold = np.empty(len(table), dtype=np.int64)
    for k, (_, held_out) in enumerate(
        splitter.split(np.zeros(len(table)), labels, group_keys(table))
    ):
        fold[held_out] = k
    return pd.Series(fold, index=table.index, name="fold")


def fold_splits(table: pd.DataFrame, folds: int, fold: int, seed: int = 0) -> pd.DataFrame:
    """A copy of a split table where fold ``fold`` of the train+val rows is ``val`` and the
    other folds ``train``; the test rows stay untouched (cross-validation never sees them).

    Folds come from :func:`kfold_assignments` over train+val, so they are patient-grouped and
    stratified, and the same ``seed`` gives every fold run the same partition.
    """
    if not 0 <= fold < folds:
        raise ConfigError(f"fold must be between 0 and {folds - 1}, got {fold}")
    development = table["split"].isin(["train", "val"])
    if not development.any():
        raise DataError("cross-validation needs train or val rows; the table has none")
    assigned = kfold_assignments(table[development], folds=folds, seed=seed)
    out = table.copy()
    out.loc[development, "split"] = np.where(assigned == fold, "val", "train")
    return out


def _check_ratios(ratios) -> tuple[float, float, float]:
    values = tuple(float(r) for r in ratios)
    if len(values) != 3:
        raise ConfigError(f"ratios must be three numbers (train, val, test), got {ratios!r}")
    if any(r < 0 for r in values) or values[0] <= 0:
        raise ConfigError(f"ratios must be non-negative with train > 0, got {ratios!r}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ConfigError(f"ratios must sum to 1, got {ratios!r} (sum {sum(values):g})")
    return values  # type: ignore[return-value]
