"""Boxes, regions, IoU, pointing game and energy with known answers; scoring a run's masks."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from medsight.errors import DataError
from medsight.explain import (
    box_from_map,
    box_iou,
    energy_in_mask,
    mask_box,
    pointing_game,
    region_from_map,
    score_localisation,
)
from medsight.stats import bootstrap_ci


def test_region_is_the_largest_component_above_half_the_maximum():
    heat = np.zeros((10, 10))
    heat[1:4, 1:4] = 1.0  # 9 px, the peak
    heat[6:10, 5:10] = 0.6  # 20 px, above half: the largest component
    heat[0, 9] = 0.4  # below half
    region = region_from_map(heat)
    assert region.sum() == 20 and region[6:10, 5:10].all()
    assert box_from_map(heat) == (5, 6, 10, 10)
    assert box_from_map(heat, threshold=0.8) == (1, 1, 4, 4)
    assert not region_from_map(np.ones((4, 4))).any() and box_from_map(np.ones((4, 4))) is None


def test_diagonal_neighbours_are_one_component():
    heat = np.zeros((5, 5))
    heat[0, 0] = heat[1, 1] = heat[2, 2] = 1.0
    assert region_from_map(heat).sum() == 3


def test_mask_box_and_iou_arithmetic():
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:7] = True
    assert mask_box(mask) == (3, 2, 7, 5)
    assert mask_box(np.zeros((3, 3))) is None
    assert box_iou((0, 0, 4, 4), (0, 0, 4, 4)) == 1.0
    assert box_iou((0, 0, 4, 4), (4, 0, 8, 4)) == 0.0  # touching edges share no pixel
    assert box_iou((0, 0, 4, 4), (2, 0, 6, 4)) == pytest.approx(8 / 24)
    assert box_iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(4 / 16)
    assert box_iou(None, (0, 0, 1, 1)) == 0.0


def test_pointing_game_on_a_synthetic_peak():
    yy, xx = np.mgrid[:32, :32]
    heat = np.exp(-((yy - 10) ** 2 + (xx - 20) ** 2) / 20.0)
    lesion = (yy - 11) ** 2 + (xx - 19) ** 2 < 16
    elsewhere = (yy - 25) ** 2 + (xx - 5) ** 2 < 16
    assert pointing_game(heat, lesion)
    assert not pointing_game(heat, elsewhere)
    assert not pointing_game(np.zeros((32, 32)), lesion)  # a flat map points nowhere
    # A mask at the original image size is resized to the map.
    big = np.kron(lesion, np.ones((4, 4), bool))
    assert pointing_game(heat, big)


def test_energy_in_mask():
    heat = np.ones((4, 4))
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    assert energy_in_mask(heat, mask) == pytest.approx(0.25)
    heat[:2, :2] = 3.0
    assert energy_in_mask(heat, mask) == pytest.approx(12 / 24)
    assert energy_in_mask(np.zeros((4, 4)), mask) == 0.0


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    values = [0, 1, 1, 0, 1, 1, 1, 0, 1, 1]
    a, b = bootstrap_ci(values, seed=3), bootstrap_ci(values, seed=3)
    assert a == b and a["value"] == pytest.approx(0.7)
    assert a["ci"][0] <= 0.7 <= a["ci"][1]
    assert bootstrap_ci([]) == {"value": None, "ci": None}


def test_score_localisation_scores_lesions_and_counts_missing_masks(tiny_run, mask_data):
    with pytest.warns(UserWarning, match="1 image"):
        result = score_localisation(
            tiny_run, mask_data, methods=["gradcam", "attention"], split=None, faithfulness=2
        )
    assert result["n_images"] == 4  # the lesion images; the normal ones are not "missing"
    assert result["n_missing_masks"] == 1
    assert result["lesion_classes"] == ["lesion"]
    assert set(result["methods"]) == {"gradcam", "attention"}
    for entry in result["methods"].values():
        for key in ("pointing_game", "box_iou", "energy_in_mask"):
            assert 0.0 <= entry[key]["value"] <= 1.0
            assert entry[key]["ci"] is None or len(entry[key]["ci"]) == 2
    assert set(result["faithfulness"]["gradcam"]) >= {"deletion_auc", "insertion_auc"}
    assert "spearman" in result["sanity"]["attention"]
    written = json.loads((tiny_run / "localisation.json").read_text())
    assert written["methods"].keys() == result["methods"].keys()
    with pytest.warns(UserWarning):
        limited = score_localisation(
            tiny_run,
            mask_data,
            methods=["eigencam"],
            split=None,
            limit=2,
            faithfulness=0,
            write=False,
        )
    assert limited["n_images"] == 2 and "faithfulness" not in limited


def test_score_localisation_needs_a_mask_column(tiny_run, tmp_path, helpers):
    data = helpers.make_class_folders(tmp_path / "plain", {"normal": 2, "lesion": 2})
    with pytest.raises(DataError, match="no 'mask' column.*medsight data synth"):
        score_localisation(tiny_run, data, methods=["gradcam"])


def test_a_layer_search_keeps_each_methods_best_layer_that_passes_the_sanity_check(
    tiny_run, mask_data, monkeypatch
):
    from medsight.explain import faithfulness as FA

    stage2 = "backbone.stage2"
    real = FA.sanity_summary

    def stage2_fails(explainer, *args, **kwargs):  # as if stage 2's maps ignored the weights
        summary = real(explainer, *args, **kwargs)
        if explainer.layer == stage2:
            summary["spearman"] = {"value": 0.95, "ci": [0.9, 1.0]}
            summary["passes"] = FA.passes_sanity(summary)
        return summary

    monkeypatch.setattr(FA, "sanity_summary", stage2_fails)
    with pytest.warns(UserWarning):
        result = score_localisation(
            tiny_run, mask_data, methods=["gradcam"], split=None, faithfulness=2,
            search_layers=True, write=False,
        )  # fmt: skip
    entry = result["methods"]["gradcam"]
    fused = "backbone.stage1,backbone.stage2,backbone.stage3"
    assert set(entry["layers_tried"]) == {"backbone.stage3", stage2, fused}
    assert entry["layers_tried"][stage2]["sanity"]["passes"] is False
    assert entry["layer"] != stage2  # never the kept layer, however well it points
    assert result["sanity"]["gradcam"]["passes"] is not False
    tried = {k: v for k, v in entry["layers_tried"].items() if k != stage2}
    best = max(tried.values(), key=lambda v: (v["pointing_game"]["value"],
                                              v["energy_in_mask"]["value"]))  # fmt: skip
    assert entry["pointing_game"] == best["pointing_game"]


def test_masks_of_another_size_are_resized_with_a_warning_or_refused_when_the_aspect_differs(
    tiny_run, mask_data
):
    from PIL import Image

    root = mask_data.parent
    first = root / "masks" / "lesion_0.png"
    mask = np.asarray(Image.open(first))
    Image.fromarray(mask.repeat(2, axis=0).repeat(2, axis=1)).save(first)  # 32×32 for 16×16
    with pytest.warns(UserWarning, match="1 mask.*resized"):
        result = score_localisation(
            tiny_run, mask_data, methods=["gradcam"], split=None, faithfulness=0, write=False
        )
    assert result["n_resized_masks"] == 1 and result["n_images"] == 4
    Image.fromarray(mask.repeat(2, axis=1)).save(first)  # 32 wide, 16 high
    refused = r"lesion_0.png is 32×16 pixels but the image is 16×16"
    with pytest.raises(DataError, match=refused), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score_localisation(tiny_run, mask_data, methods=["gradcam"], split=None, write=False)


def test_an_empty_mask_is_counted_and_not_scored(tiny_run, mask_data):
    from PIL import Image

    first = mask_data.parent / "masks" / "lesion_0.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(first)
    with pytest.warns(UserWarning):
        result = score_localisation(
            tiny_run, mask_data, methods=["gradcam"], split=None, faithfulness=0, write=False
        )
    assert result["n_empty_masks"] == 1 and result["n_images"] == 3
