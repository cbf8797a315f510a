"""Patient-grouped, class-stratified splits: train/val/test by ratio, and k-fold.

No patient ever crosses splits when ``patient_id`` is known, class proportions stay as close to
the whole set's as grouping allows, and a seed makes every split repeatable. A split the data
already carries (a ``split`` column, MedMNIST's official one) is respected, never redrawn.

Multi-label tables (several findings per image, :func:`medsight.data.findings.is_multilabel`)
and detection tables (boxes, :func:`medsight.data.boxes.is_detection`: their label is the box
classes present, ``"RBC|WBC"``, so each class is a finding) are split by *iterative
stratification* (Sechidis, Tsoumakas & Vlahavas, ECML PKDD 2011, as implemented by the
``iterative-stratification`` package), over patients:

1. each patient (an image without ``patient_id`` is its own patient) gets the findings of all
   its images (the maximum over them of :func:`~medsight.data.findings.positives`), plus one
   "no finding" column, so the share of patients without findings is stratified too;
2. the patients are stratified: ``MultilabelStratifiedShuffleSplit`` draws the test patients,
   then the validation patients from the rest (``MultilabelStratifiedKFold`` for k-fold);
3. a repair pass, rarest finding first: a finding held by at least as many patients as there
   are splits but missing from one split gets a patient moved in from the split holding it
   most (never one whose move would empty that split of another finding), and a patient
   without it moved back when one can be, so split sizes hold;
4. every image goes where its patient went.

Iterative stratification alone sends all three patients of a finding seen in three patients to
train (each is placed where the finding's remaining demand is largest), so the repair is what
lets a finding with three or more patients reach train, validation and test.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from medsight.data.boxes import is_detection
from medsight.data.findings import is_multilabel, positives
from medsight.data.sources import SPLITS
from medsight.errors import ConfigError, DataError

DEFAULT_RATIOS = (0.7, 0.15, 0.15)
_UNLABELLED = "\0unlabelled"


def _by_findings(table: pd.DataFrame) -> bool:
    """Multi-label and detection tables are stratified by the findings (box classes) present."""
    return is_multilabel(table) or is_detection(table)


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
    if _by_findings(table):
        return _assign_multilabel(table, ratios, seed)
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
    """The most folds possible: each class must reach every fold (counted in patients); for a
    multi-label table each finding that occurs, and there must be a patient per fold."""
    if _by_findings(table):
        _, names, findings = _patient_findings(table)
        held = findings.sum(axis=0)
        return int(min(len(names), *held[held > 0])) if held.any() else len(names)
    groups = pd.Series(group_keys(table), index=table.index)
    per_class = groups.groupby(table["label"].fillna(_UNLABELLED)).nunique()
    return int(per_class.min())


def kfold_assignments(table: pd.DataFrame, folds: int = 5, seed: int = 0) -> pd.Series:
    """Fold number (0..folds-1) per row: stratified by label, grouped by patient, seeded.

    Built on scikit-learn's ``StratifiedGroupKFold``; raises a ConfigError naming the maximum
    when ``folds`` exceeds the number of patients of the smallest class. A multi-label table's
    patients are split by ``MultilabelStratifiedKFold`` on their findings (module docstring).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if folds < 2:
        raise ConfigError(f"folds must be at least 2, got {folds}")
    possible = max_folds(table)
    if folds > possible:
        what = (
            "box class" if is_detection(table) else "finding" if is_multilabel(table) else "class"
        )
        raise ConfigError(
            f"folds={folds} is more than the smallest {what} has patients; "
            f"the maximum possible here is {possible}"
        )
    if _by_findings(table):
        return _kfold_multilabel(table, folds, seed)
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


# --------------------------------------------------------------------------- multi-label


def _patient_findings(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group index per row, group names, ``(G, K)`` 0/1 findings per group: the maximum over
    the group's images)."""
    names, index = np.unique(group_keys(table), return_inverse=True)
    per_image = positives(table["label"], table.attrs["classes"])
    per_group = np.zeros((len(names), per_image.shape[1]), dtype=np.int64)
    np.maximum.at(per_group, index, per_image)
    return index, names, per_group


def _strata(findings: np.ndarray) -> np.ndarray:
    """The findings and a "no finding" column: what patients are stratified on."""
    return np.column_stack([findings, findings.sum(axis=1) == 0]).astype(bool)


def _assign_multilabel(
    table: pd.DataFrame, ratios: tuple[float, float, float], seed: int
) -> pd.DataFrame:
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    index, names, findings = _patient_findings(table)
    strata = _strata(findings)
    split_of_group = np.zeros(len(names), dtype=np.int64)  # all train to start
    remaining = np.arange(len(names))
    # Test first, then validation out of the rest: each a two-way iterative stratification.
    for split, share in ((2, ratios[2]), (1, ratios[1] / max(ratios[0] + ratios[1], 1e-12))):
        # Too few patients to hold any out (iterstrat would refuse): they all stay in train.
        if ratios[split] == 0 or np.ceil(share * len(remaining)) >= len(remaining):
            continue
        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=share, random_state=seed)
        _, held_out = next(splitter.split(np.zeros(len(remaining)), strata[remaining]))
        split_of_group[remaining[held_out]] = split
        remaining = np.delete(remaining, held_out)
    active = [s for s in range(3) if ratios[s] > 0]
    _repair(split_of_group, findings, np.bincount(index, minlength=len(names)), active)
    out = table.copy()
    out["split"] = [SPLITS[s] for s in split_of_group[index]]
    return out


def _repair(
    split_of: np.ndarray, findings: np.ndarray, images: np.ndarray, active: list[int]
) -> None:
    """Move patients so that each finding held by at least ``len(active)`` patients reaches
    every active split (in place; see the module docstring)."""

    def held(split: int) -> np.ndarray:
        return findings[split_of == split].sum(axis=0)

    def harmless(group: int, split: int) -> bool:
        # Moving ``group`` out of ``split`` leaves there every finding it has there.
        return bool(np.all(held(split)[findings[group] > 0] >= 2))

    for k in np.argsort(findings.sum(axis=0), kind="stable"):
        if findings[:, k].sum() < len(active):
            continue
        for target in active:
            if held(target)[k] > 0:
                continue
            counts = {s: held(s)[k] for s in active}
            donor = max(counts, key=lambda s: (counts[s], -s))
            if counts[donor] < 2:
                continue
            movable = [
                g
                for g in np.flatnonzero((split_of == donor) & (findings[:, k] > 0))
                if harmless(g, donor)
            ]
            if not movable:
                continue
            moved = min(movable, key=lambda g: (images[g], g))
            split_of[moved] = target
            # Send back a patient without this finding, of a similar size, to keep sizes.
            back = [
                g
                for g in np.flatnonzero((split_of == target) & (findings[:, k] == 0))
                if harmless(g, target)
            ]
            if back:
                split_of[min(back, key=lambda g: (abs(images[g] - images[moved]), g))] = donor


def _kfold_multilabel(table: pd.DataFrame, folds: int, seed: int) -> pd.Series:
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    index, names, findings = _patient_findings(table)
    splitter = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_of_group = np.empty(len(names), dtype=np.int64)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(names)), _strata(findings))):
        fold_of_group[held_out] = k
    return pd.Series(fold_of_group[index], index=table.index, name="fold")


def _check_ratios(ratios) -> tuple[float, float, float]:
    values = tuple(float(r) for r in ratios)
    if len(values) != 3:
        raise ConfigError(f"ratios must be three numbers (train, val, test), got {ratios!r}")
    if any(r < 0 for r in values) or values[0] <= 0:
        raise ConfigError(f"ratios must be non-negative with train > 0, got {ratios!r}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ConfigError(f"ratios must sum to 1, got {ratios!r} (sum {sum(values):g})")
    return values  # type: ignore[return-value]
