"""Deletion/insertion AUCs and the Adebayo model-randomisation check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsight.explain import Explainer, deletion_insertion, randomised_copy, sanity_check
from medsight.explain.faithfulness import rank_correlation
from tests.explain.test_explain_cam import REGION, SIZE, RegionNet, region_image


def region_map(inside: bool) -> np.ndarray:
    heat = np.zeros((SIZE, SIZE), np.float32) if inside else np.ones((SIZE, SIZE), np.float32)
    heat[REGION] = 1.0 if inside else 0.0
    return heat


def test_a_map_on_the_evidence_deletes_faster_and_inserts_faster_than_its_opposite():
    model = RegionNet()
    x = region_image()
    good = deletion_insertion(model, x, region_map(True), 1)
    bad = deletion_insertion(model, x, region_map(False), 1)
    assert good["deletion_auc"] < bad["deletion_auc"]
    assert good["insertion_auc"] > bad["insertion_auc"]
    for value in (*good.values(), *bad.values()):
        assert 0.0 <= value <= 1.0


def test_randomised_copy_redraws_every_weight_and_leaves_the_model_alone():
    model = RegionNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = randomised_copy(model, seed=1)
    for name, value in twin.state_dict().items():
        assert not torch.equal(value, before[name]), name
        assert torch.equal(model.state_dict()[name], before[name])
    again = randomised_copy(model, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), again.parameters()))


@pytest.mark.parametrize("method", ["gradcam", "ig"])
def test_maps_of_the_trained_model_differ_from_a_randomised_one(method):
    explainer = Explainer(RegionNet(), method, None if method == "ig" else "gate")
    x = np.concatenate([region_image(), region_image()[:, :, ::-1].copy()])
    rho = sanity_check(explainer, x, [1, 1], seed=0)
    assert all(r is not None and r < 0.5 for r in rho), rho


def test_the_check_catches_a_map_that_ignores_the_model():
    # Eigen-CAM on the untouched input only shows the image: the same map for any weights.
    explainer = Explainer(RegionNet(), "eigencam", "pre")
    rho = sanity_check(explainer, region_image(), [1])
    assert rho[0] == pytest.approx(1.0)


def test_rank_correlation_of_flat_maps_is_undefined():
    assert rank_correlation(np.ones((3, 3)), np.eye(3)) is None
    assert rank_correlation(np.eye(3), np.eye(3)) == pytest.approx(1.0)
