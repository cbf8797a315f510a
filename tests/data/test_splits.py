"""Splits: patient-grouped, stratified, seeded; given splits respected; k-fold disjoint."""

from __future__ import annotations

import pandas as pd
import pytest

from medsight.data.sources import validate_table
from medsight.data.splits import assign_splits, kfold_assignments, max_folds
from medsight.errors import ConfigError, DataError


def _table(n_patients=60, per_patient=3, positive_every=3, with_patients=True):
    rows = []
    for p in range(n_patients):
        label = "lesion" if p % positive_every == 0 else "normal"
        for i in range(per_patient):
            rows.append(
                {
                    "sample_id": f"P{p:03d}_{i}",
                    "source": f"/x/P{p:03d}_{i}.png",
                    "label": label,
                    "patient_id": f"P{p:03d}" if with_patients else None,
                }
            )
    return validate_table(pd.DataFrame(rows))


def test_no_patient_crosses_splits_and_ratios_hold():
    split = assign_splits(_table(), ratios=(0.7, 0.15, 0.15), seed=0)
    assert (split.groupby("patient_id")["split"].nunique() == 1).all()
    share = split["split"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.70, abs=0.03)
    assert share["val"] == pytest.approx(0.15, abs=0.03)
    assert share["test"] == pytest.approx(0.15, abs=0.03)


def test_splits_are_stratified_by_class():
    split = assign_splits(_table(n_patients=90), seed=3)
    lesion_share = split.groupby("split")["label"].apply(lambda s: (s == "lesion").mean())
    for value in lesion_share:
        assert value == pytest.approx(1 / 3, abs=0.05)


def test_same_seed_same_split_and_another_seed_differs():
    table = _table()
    first = assign_splits(table, seed=7)["split"].tolist()
    assert assign_splits(table, seed=7)["split"].tolist() == first
    assert assign_splits(table, seed=8)["split"].tolist() != first


def test_without_patients_each_image_is_its_own_group():
    split = assign_splits(_table(n_patients=40, per_patient=1, with_patients=False), seed=0)
    assert split["split"].value_counts().to_dict() == {"train": 28, "val": 6, "test": 6}


def test_given_splits_are_respected_and_partial_splits_refused():
    table = _table(n_patients=4, per_patient=1)
    table["split"] = ["test", "train", "train", "val"]
    assert assign_splits(table)["split"].tolist() == ["test", "train", "train", "val"]
    table.loc[0, "split"] = None
    with pytest.raises(DataError, match="1 of 4 rows have no split"):
        assign_splits(table)


def test_bad_ratios_name_the_problem():
    with pytest.raises(ConfigError, match="must sum to 1"):
        assign_splits(_table(), ratios=(0.7, 0.2, 0.2))
    with pytest.raises(ConfigError, match="three numbers"):
        assign_splits(_table(), ratios=(0.5, 0.5))


def test_zero_test_ratio_leaves_test_empty():
    split = assign_splits(_table(), ratios=(0.8, 0.2, 0.0))
    assert "test" not in set(split["split"])


def test_kfold_is_disjoint_by_patient_and_covers_everyone():
    table = _table(n_patients=50)
    folds = kfold_assignments(table, folds=5, seed=0)
    assert sorted(folds.unique()) == [0, 1, 2, 3, 4]
    assert (table.assign(fold=folds).groupby("patient_id")["fold"].nunique() == 1).all()
    for k in range(5):
        held_out = table[folds == k]
        assert set(held_out["label"]) == {"lesion", "normal"}


def test_too_many_folds_says_the_maximum():
    table = _table(n_patients=12, positive_every=4)  # 3 lesion patients
    assert max_folds(table) == 3
    with pytest.raises(ConfigError, match="maximum possible here is 3"):
        kfold_assignments(table, folds=5)
