"""Multi-label metrics against scikit-learn, the joint image bootstrap, undefined findings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    hamming_loss,
    label_ranking_average_precision_score,
    roc_auc_score,
)

from medsight.errors import ConfigError, DataError
from medsight.stats import UNDEFINED, format_value_ci
from medsight.tasks import get_task
from medsight.tasks.classify_metrics import operating_points
from medsight.tasks.multilabel_metrics import (
    HEADLINE,
    _Engine,
    _multiplicities,
    compute_metrics,
    paired_bootstrap_auroc,
    subgroup_scores,
)

FINDINGS = ["effusion", "mass", "nodule", "edema"]


def _data(n=240, seed=0, ignored=0.0, ties=True):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 4)) < [0.3, 0.15, 0.5, 0.25]).astype(np.float64)
    p = np.clip(0.35 * y + 0.65 * rng.random((n, 4)), 0, 1)
    if ties:
        p = np.round(p, 2)  # ties, as a real model's rounded outputs have
    if ignored:
        y[rng.random((n, 4)) < ignored] = np.nan
    return y, p


def test_point_values_without_ignored_entries_equal_sklearn():
    y, p = _data()
    m = compute_metrics(y, p, FINDINGS, n_bootstrap=0)
    pred = (p >= 0.5).astype(np.float64)
    expected = {
        "auroc_macro": roc_auc_score(y, p, average="macro"),
        "auroc_micro": roc_auc_score(y, p, average="micro"),
        "average_precision_macro": average_precision_score(y, p, average="macro"),
        "average_precision_micro": average_precision_score(y, p, average="micro"),
        "hamming_loss": hamming_loss(y, pred),
        "subset_accuracy": accuracy_score(y, pred),
        "label_ranking_average_precision": label_ranking_average_precision_score(y, p),
    }
    for name, value in expected.items():
        assert m[name]["value"] == pytest.approx(value, abs=1e-9), name
        assert m[name]["ci"] is None
    for k, name in enumerate(FINDINGS):
        entry = m["per_finding"][name]
        assert entry["auroc"]["value"] == pytest.approx(roc_auc_score(y[:, k], p[:, k]), abs=1e-9)
        assert entry["average_precision"]["value"] == pytest.approx(
            average_precision_score(y[:, k], p[:, k]), abs=1e-9
        )
        assert entry["n_positive"] == int(y[:, k].sum())
        assert entry["prevalence"]["value"] == pytest.approx(y[:, k].mean(), abs=1e-12)


def test_ignored_entries_are_masked_out_of_every_metric():
    y, p = _data(seed=1, ignored=0.2)
    m = compute_metrics(y, p, FINDINGS, n_bootstrap=0)
    known = ~np.isnan(y)
    per_auroc, per_ap = [], []
    for k, name in enumerate(FINDINGS):
        t, s = y[known[:, k], k], p[known[:, k], k]
        entry = m["per_finding"][name]
        per_auroc.append(roc_auc_score(t, s))
        per_ap.append(average_precision_score(t, s))
        assert entry["auroc"]["value"] == pytest.approx(per_auroc[-1], abs=1e-9)
        assert entry["average_precision"]["value"] == pytest.approx(per_ap[-1], abs=1e-9)
        assert entry["n_ignored"] == int((~known[:, k]).sum())
        assert entry["n_positive"] + entry["n_negative"] == t.size
        assert m["thresholds"][name] == operating_points(t, s)
        assert entry["operating_points"] == m["thresholds"][name]
    assert m["auroc_macro"]["value"] == pytest.approx(np.mean(per_auroc), abs=1e-9)
    assert m["average_precision_macro"]["value"] == pytest.approx(np.mean(per_ap), abs=1e-9)
    # micro and Hamming: the known entries pooled
    assert m["auroc_micro"]["value"] == pytest.approx(roc_auc_score(y[known], p[known]), abs=1e-9)
    assert m["average_precision_micro"]["value"] == pytest.approx(
        average_precision_score(y[known], p[known]), abs=1e-9
    )
    pred = (p >= 0.5).astype(np.float64)
    assert m["hamming_loss"]["value"] == pytest.approx(
        hamming_loss(y[known], pred[known]), abs=1e-9
    )
    # subset accuracy and LRAP: each image over its own known findings
    rows = [i for i in range(len(y)) if known[i].any()]
    subset = [accuracy_score(y[i, known[i]][None], pred[i, known[i]][None]) for i in rows]
    lrap = [
        label_ranking_average_precision_score(y[i, known[i]][None], p[i, known[i]][None])
        for i in rows
    ]
    assert m["subset_accuracy"]["value"] == pytest.approx(np.mean(subset), abs=1e-9)
    assert m["label_ranking_average_precision"]["value"] == pytest.approx(np.mean(lrap), abs=1e-9)
    assert any("entries are ignored" in note for note in m["notes"])


def test_each_resample_scores_as_sklearn_does_on_the_resampled_images():
    y, p = _data(n=120, seed=2, ignored=0.1)
    engine = _Engine(y, p)
    w = next(_multiplicities(len(y), 2, 7, engine.cells()))
    resampled = engine.resampled(w)
    idx = np.repeat(np.arange(len(y)), w[0].astype(int))
    yr, pr = y[idx], p[idx]
    known = ~np.isnan(yr)
    for k in range(4):
        t, s = yr[known[:, k], k], pr[known[:, k], k]
        assert resampled["auroc"][0, k] == pytest.approx(roc_auc_score(t, s), abs=1e-9)
        assert resampled["average_precision"][0, k] == pytest.approx(
            average_precision_score(t, s), abs=1e-9
        )
    assert resampled["auroc_micro"][0] == pytest.approx(
        roc_auc_score(yr[known], pr[known]), abs=1e-9
    )
    assert resampled["hamming_loss"][0] == pytest.approx(
        hamming_loss(yr[known], (pr >= 0.5)[known]), abs=1e-9
    )
    point = compute_metrics(yr, pr, FINDINGS, n_bootstrap=0)
    for name in ("subset_accuracy", "label_ranking_average_precision", "auroc_macro"):
        assert resampled[name][0] == pytest.approx(point[name]["value"], abs=1e-9), name


def test_findings_share_one_set_of_resampled_images():
    y, p = _data(n=150, seed=3)
    y2 = np.column_stack([y, y[:, 1]])
    p2 = np.column_stack([p, p[:, 1]])
    m = compute_metrics(y2, p2, [*FINDINGS, "mass copy"], n_bootstrap=300, seed=5)
    a, b = m["per_finding"]["mass"], m["per_finding"]["mass copy"]
    for metric in ("prevalence", "auroc", "average_precision", "ece"):
        assert a[metric] == b[metric], metric


def test_a_perfect_finding_has_the_interval_one_to_one():
    y, p = _data(n=100, seed=4)
    p[:, 0] = np.where(y[:, 0] == 1, 0.8 + 0.1 * p[:, 0], 0.1 * p[:, 0])
    m = compute_metrics(y, p, FINDINGS, n_bootstrap=200)
    assert m["per_finding"]["effusion"]["auroc"] == {"value": 1.0, "ci": [1.0, 1.0]}
    assert m["per_finding"]["effusion"]["average_precision"] == {"value": 1.0, "ci": [1.0, 1.0]}
    for name in HEADLINE:
        lo, hi = m[name]["ci"]
        assert lo <= m[name]["value"] + 1e-12 and m[name]["value"] <= hi + 1e-12, name


def test_the_same_seed_gives_the_same_intervals_and_another_seed_others():
    y, p = _data(n=80, seed=6)
    first = compute_metrics(y, p, FINDINGS, n_bootstrap=100, seed=1)
    assert compute_metrics(y, p, FINDINGS, n_bootstrap=100, seed=1) == first
    other = compute_metrics(y, p, FINDINGS, n_bootstrap=100, seed=2)
    assert other["auroc_macro"]["ci"] != first["auroc_macro"]["ci"]
    assert other["auroc_macro"]["value"] == first["auroc_macro"]["value"]


def test_a_finding_that_never_occurs_is_undefined_and_noted():
    y, p = _data(n=60, seed=7)
    y[:, 1] = 0.0  # "mass" never occurs
    y[:, 3] = np.nan  # "edema" is never known
    m = compute_metrics(y, p, FINDINGS, n_bootstrap=50)
    json.dumps(m)  # plain types only
    mass = m["per_finding"]["mass"]
    assert mass["auroc"] == {"value": None, "ci": None}
    assert mass["average_precision"] == {"value": None, "ci": None}
    assert mass["prevalence"]["value"] == 0.0
    assert m["thresholds"]["mass"]["youden"] is None
    assert m["curves"]["mass"]["roc"] is None
    assert format_value_ci(mass["auroc"]) == UNDEFINED
    edema = m["per_finding"]["edema"]
    assert edema["prevalence"]["value"] is None and edema["ece"]["value"] is None
    assert m["curves"]["edema"]["reliability"] is None
    defined = [roc_auc_score(y[:, k], p[:, k]) for k in (0, 2)]
    assert m["auroc_macro"]["value"] == pytest.approx(np.mean(defined), abs=1e-9)
    assert any("'mass' has no positive image" in note for note in m["notes"])
    assert any("'edema' has no labelled image" in note for note in m["notes"])


def test_no_defined_finding_leaves_the_macro_means_undefined():
    y = np.zeros((5, 2))
    p = np.full((5, 2), 0.2)
    m = compute_metrics(y, p, ["a", "b"], n_bootstrap=20)
    assert m["auroc_macro"] == {"value": None, "ci": None}
    assert m["auroc_micro"] == {"value": None, "ci": None}
    assert m["hamming_loss"]["value"] == 0.0 and m["subset_accuracy"]["value"] == 1.0


def test_curves_are_stored_per_finding():
    y, p = _data(n=90, seed=8)
    curves = compute_metrics(y, p, FINDINGS, n_bootstrap=0)["curves"]
    roc = curves["nodule"]["roc"]
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0
    reliability = curves["nodule"]["reliability"]
    assert sum(reliability["count"]) == 90
    assert len(reliability["bin_edges"]) == 16


def test_finding_ece_uses_equal_width_bins_of_the_probability():
    # 10 images at p = 0.8 of which 6 positive; 10 at p = 0.1 of which 1 positive
    y = np.array([[1.0]] * 6 + [[0.0]] * 4 + [[1.0]] + [[0.0]] * 9)
    p = np.array([[0.8]] * 10 + [[0.1]] * 10)
    ece = compute_metrics(y, p, ["a"], n_bootstrap=0)["per_finding"]["a"]["ece"]["value"]
    assert ece == pytest.approx(0.5 * 0.2 + 0.5 * 0.0, abs=1e-12)


def test_bad_input_is_named():
    y, p = _data(n=10)
    with pytest.raises(ConfigError, match="4 columns but 3 finding names"):
        compute_metrics(y, p, FINDINGS[:3])
    with pytest.raises(DataError, match="outside \\[0, 1\\].*not logits"):
        compute_metrics(y, p * 3 - 1, FINDINGS)
    bad = y.copy()
    bad[2, 1] = 2
    with pytest.raises(DataError, match="'mass'.*1 \\(present\\), 0 \\(absent\\) or NaN"):
        compute_metrics(bad, p, FINDINGS)
    with pytest.raises(ConfigError, match="n_bootstrap"):
        compute_metrics(y, p, FINDINGS, n_bootstrap=-1)


def test_subgroup_scores_score_each_group_alone():
    y, p = _data(n=200, seed=9, ignored=0.1)
    group = np.arange(200) % 3 == 0
    no_mass = np.zeros(200, dtype=bool)
    no_mass[np.flatnonzero(y[:, 1] == 0)[:20]] = True
    scores = subgroup_scores(y, p, FINDINGS, [group, ~group, no_mass], n_bootstrap=100, seed=0)
    entries, notes = scores[0]
    alone = compute_metrics(y[group], p[group], FINDINGS, n_bootstrap=100, seed=0)
    for metric in ("auroc_macro", "average_precision_macro", "hamming_loss"):
        assert entries[metric] == alone[metric]
    assert notes == []
    _, notes = scores[2]
    assert "'mass'" in notes[0] and "left out of its macro" in notes[0]
    task = get_task("multilabel")
    via_task = task.subgroup_scores(y, p, FINDINGS, None, [group], n_bootstrap=100, seed=0)
    assert via_task[0] == scores[0]


def test_paired_bootstrap_of_identical_models_is_no_difference():
    y, p = _data(n=120, seed=10)
    result = paired_bootstrap_auroc(y, p, p, FINDINGS, n_bootstrap=200)
    assert result["difference"] == 0.0 and result["p_value"] == 1.0
    assert result["ci"] == [0.0, 0.0]
    assert set(result["per_finding"]) == set(FINDINGS)
    assert result["per_finding"]["mass"]["p_value"] == 1.0


def test_paired_bootstrap_finds_a_better_model():
    y, p = _data(n=200, seed=11, ignored=0.05)
    noise = np.random.default_rng(0).random(p.shape)
    worse = np.clip(0.5 * p + 0.5 * noise, 0, 1)
    result = paired_bootstrap_auroc(y, p, worse, FINDINGS, n_bootstrap=300, seed=3)
    a = compute_metrics(y, p, FINDINGS, n_bootstrap=0)["auroc_macro"]["value"]
    b = compute_metrics(y, worse, FINDINGS, n_bootstrap=0)["auroc_macro"]["value"]
    assert result["auroc_a"] == pytest.approx(a) and result["auroc_b"] == pytest.approx(b)
    assert result["difference"] == pytest.approx(a - b)
    assert result["ci"][0] > 0 and result["p_value"] < 0.05
    for k, name in enumerate(FINDINGS):
        known = ~np.isnan(y[:, k])
        entry = result["per_finding"][name]
        expected = roc_auc_score(y[known, k], p[known, k]) - roc_auc_score(
            y[known, k], worse[known, k]
        )
        assert entry["difference"] == pytest.approx(expected, abs=1e-9)
        assert entry["ci"][0] <= entry["difference"] <= entry["ci"][1]
    assert result == paired_bootstrap_auroc(y, p, worse, FINDINGS, n_bootstrap=300, seed=3)


def test_the_task_returns_these_metrics():
    y, p = _data(n=40, seed=12)
    task = get_task("multilabel")
    assert task.metrics(y, p, FINDINGS, None, n_bootstrap=20) == compute_metrics(
        y, p, FINDINGS, n_bootstrap=20
    )
    assert set(task.headline_metrics) <= set(compute_metrics(y, p, FINDINGS, n_bootstrap=0))
