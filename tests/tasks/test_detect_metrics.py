"""Detection metrics on hand-made boxes with answers worked out by hand: lesion matching, FROC
points, COCO AP, image-level AUROC, the IoU of matches and the bootstrap intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsight.errors import ConfigError, DataError
from medsight.tasks import detect_metrics as dm
from medsight.tasks.detect_metrics import (
    coco_map,
    detection_metrics,
    froc,
    image_auroc,
    image_scores,
    match_detections,
    median_iou,
    operating_points,
    validation_scores,
)

# A lesion box and boxes that overlap it by a known IoU.
BOX = [0.1, 0.1, 0.5, 0.5]  # 0.4 × 0.4
IOU_075 = [0.1, 0.1, 0.5, 0.4]  # 0.4 × 0.3 inside it: IoU 0.75
IOU_060 = [0.1, 0.1, 0.5, 0.34]  # 0.4 × 0.24 inside it: IoU 0.6
IOU_025 = [0.1, 0.1, 0.5, 0.2]  # 0.4 × 0.1 inside it: IoU 0.25 (a miss)
ELSEWHERE = [0.6, 0.6, 0.9, 0.9]  # overlaps nothing


def arrays(images: list[tuple[list, list]], m: int = 3, d: int = 5):
    """``(gt (N, m, 5), pred (N, d, 6))`` from per-image lists of ``(box, class)`` and
    ``(box, score, class)``, padded as the contract says."""
    gt = np.zeros((len(images), m, 5))
    gt[..., 4] = -1
    pred = np.zeros((len(images), d, 6))
    pred[..., 5] = -1
    for i, (lesions, detections) in enumerate(images):
        for j, (box, cls) in enumerate(lesions):
            gt[i, j] = [*box, cls]
        for j, (box, score, cls) in enumerate(sorted(detections, key=lambda t: -t[1])):
            pred[i, j] = [*box, score, cls]
    return gt, pred


def four_images():
    """4 images, one lesion each (class 0); detections by score: 0.9 hit, 0.8 FP, 0.7 FP,
    0.6 hit, 0.5 hit, 0.4 FP. The FROC's points (FP / image, sensitivity):
    (0, 0) (0, .25) (.25, .25) (.5, .25) (.5, .5) (.5, .75) (.75, .75)."""
    return arrays(
        [
            ([(BOX, 0)], [(BOX, 0.9, 0)]),
            ([(BOX, 0)], [(ELSEWHERE, 0.8, 0), (IOU_075, 0.6, 0)]),
            ([(BOX, 0)], [(ELSEWHERE, 0.7, 0)]),
            ([(BOX, 0)], [(IOU_060, 0.5, 0), (ELSEWHERE, 0.4, 0)]),
        ]
    )


# --------------------------------------------------------------------------- matching


def test_matching_flags_hits_false_positives_and_found_lesions():
    gt, pred = four_images()
    m = match_detections(gt, pred)
    assert m.n_images == 4 and m.n_lesions == 4
    assert m.det_score.tolist() == [0.9, 0.8, 0.6, 0.7, 0.5, 0.4]  # image order, then score
    assert m.hit.tolist() == [True, False, True, False, True, False]
    assert m.found.tolist() == [True, True, False, True]
    np.testing.assert_allclose(m.lesion_iou[m.found], [1.0, 0.75, 0.6])
    assert np.isnan(m.det_iou[~m.hit]).all()


def test_a_detection_of_the_wrong_class_is_a_false_positive():
    gt, pred = arrays([([(BOX, 0)], [(BOX, 0.95, 1), (IOU_075, 0.5, 0)])])
    m = match_detections(gt, pred)
    assert m.hit.tolist() == [False, True]  # the class-1 box on the class-0 lesion: FP
    assert m.lesion_iou.tolist() == pytest.approx([0.75])
    curve = froc(gt, pred, [1.0], n_bootstrap=0)["curve"]
    assert curve["fps_per_image"] == [0.0, 1.0, 1.0] and curve["sensitivity"] == [0.0, 0.0, 1.0]


def test_a_second_box_on_a_found_lesion_is_a_false_positive():
    gt, pred = arrays([([(BOX, 0)], [(BOX, 0.9, 0), (IOU_075, 0.8, 0)])])
    m = match_detections(gt, pred)
    assert m.hit.tolist() == [True, False]
    result = froc(gt, pred, [0.5, 1.0], n_bootstrap=0)
    assert result["curve"]["fps_per_image"] == [0.0, 0.0, 1.0]


def test_each_detection_takes_the_lesion_it_overlaps_most():
    other = [0.1, 0.1, 0.5, 0.45]  # a second lesion overlapping the first
    gt, pred = arrays([([(BOX, 0), (other, 0)], [(other, 0.9, 0), (BOX, 0.8, 0)])])
    m = match_detections(gt, pred)
    assert m.hit.tolist() == [True, True]
    assert m.det_lesion.tolist() == [1, 0]


def test_too_little_overlap_misses_and_the_threshold_is_a_parameter():
    gt, pred = arrays([([(BOX, 0)], [(IOU_025, 0.9, 0)])])
    assert match_detections(gt, pred).hit.tolist() == [False]
    assert match_detections(gt, pred, iou_threshold=0.2).hit.tolist() == [True]


def test_padding_rows_are_ignored_wherever_they_sit():
    gt, pred = four_images()
    wide_gt = np.concatenate([np.tile([0, 0, 0, 0, -1.0], (4, 2, 1)), gt], axis=1)
    wide_pred = np.concatenate([pred, np.tile([0, 0, 0, 0, 0, -1.0], (4, 7, 1))], axis=1)
    a = froc(gt, pred, n_bootstrap=0)
    b = froc(wide_gt, wide_pred, n_bootstrap=0)
    assert a["sensitivity"] == b["sensitivity"] and a["curve"] == b["curve"]
    assert coco_map(gt, pred, ["lesion"], n_bootstrap=0)["map50"] == pytest.approx(
        coco_map(wide_gt, wide_pred, ["lesion"], n_bootstrap=0)["map50"]
    )


# --------------------------------------------------------------------------- FROC


def test_froc_sensitivities_at_the_seven_rates():
    gt, pred = four_images()
    result = froc(gt, pred, n_bootstrap=0)
    assert result["fps_per_image"] == [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    values = [e["value"] for e in result["sensitivity"]]
    # 1/8: on the flat stretch (0, .25)-(.25, .25); 1/2: the best at 0.5 FP / image;
    # beyond 0.75 FP / image the curve's last sensitivity is held.
    assert values == pytest.approx([0.25, 0.25, 0.75, 0.75, 0.75, 0.75, 0.75])
    assert result["score"]["value"] == pytest.approx((0.25 + 0.25 + 0.75 * 5) / 7)
    assert result["curve"]["fps_per_image"] == [0, 0, 0.25, 0.5, 0.5, 0.5, 0.75]
    assert result["curve"]["sensitivity"] == [0, 0.25, 0.25, 0.25, 0.5, 0.75, 0.75]
    assert result["curve"]["threshold"] == [None, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    assert result["n_lesions"] == 4 and result["n_images"] == 4


def test_froc_interpolates_linearly_between_operating_points():
    # tied scores make one operating point: (0, .5) then (.5, 1) in a single step
    gt, pred = arrays(
        [
            ([(BOX, 0)], [(BOX, 0.9, 0)]),
            ([(BOX, 0)], [(ELSEWHERE, 0.8, 0), (IOU_075, 0.8, 0)]),
        ]
    )
    result = froc(gt, pred, [0.25, 0.5], n_bootstrap=0)
    assert [e["value"] for e in result["sensitivity"]] == pytest.approx([0.75, 1.0])


def test_images_without_lesions_add_false_positives_and_images():
    gt, pred = four_images()
    extra_gt, extra_pred = arrays([([], [(ELSEWHERE, 0.95, 0)]), ([], [])])
    gt, pred = np.concatenate([gt, extra_gt]), np.concatenate([pred, extra_pred])
    result = froc(gt, pred, n_bootstrap=0)
    assert result["n_images"] == 6 and result["n_lesions"] == 4
    # the 0.95 FP comes first: (1/6, 0), then the four images' points over 6 images
    assert result["curve"]["fps_per_image"][:3] == pytest.approx([0, 1 / 6, 1 / 6])
    assert result["curve"]["sensitivity"][:3] == [0, 0, 0.25]
    assert result["curve"]["fps_per_image"][-1] == pytest.approx(4 / 6)


def test_operating_points_keep_the_most_detections_within_each_rate():
    gt, pred = four_images()
    points = {p["fps_per_image_target"]: p for p in operating_points(gt, pred)}
    assert points[0.125] == {
        "fps_per_image_target": 0.125,
        "threshold": 0.9,
        "fps_per_image": 0.0,
        "sensitivity": 0.25,
        "precision": 1.0,
        "n_detections": 1,
    }
    assert points[0.25]["threshold"] == 0.8 and points[0.25]["precision"] == 0.5
    assert points[0.5]["threshold"] == 0.5 and points[0.5]["sensitivity"] == 0.75
    assert points[0.5]["precision"] == pytest.approx(3 / 5)
    assert points[1.0]["threshold"] == 0.4 and points[1.0]["n_detections"] == 6


def test_no_lesion_at_all_leaves_the_froc_undefined():
    gt, pred = arrays([([], [(BOX, 0.9, 0)])])
    result = froc(gt, pred, n_bootstrap=10)
    assert result["score"] == {"value": None, "ci": None} and result["curve"] is None


# --------------------------------------------------------------------------- COCO AP


def test_perfect_boxes_score_map_one():
    gt, pred = arrays(
        [
            ([(BOX, 0), (ELSEWHERE, 1)], [(BOX, 0.9, 0), (ELSEWHERE, 0.8, 1)]),
            ([(IOU_075, 1)], [(IOU_075, 0.7, 1)]),
            ([], []),
        ]
    )
    result = coco_map(gt, pred, ["a", "b"], n_bootstrap=0)
    assert result["map50"]["value"] == pytest.approx(1.0)
    assert result["map"]["value"] == pytest.approx(1.0)
    assert result["per_class"]["b"]["ap50"]["value"] == pytest.approx(1.0)


def test_ap_follows_coco_101_point_interpolation():
    # 2 lesions; by score: hit, FP, hit. Interpolated precision: 1 up to recall 0.5,
    # 2/3 above it; over COCO's 101 recall points AP50 = (51 + 50 · 2/3) / 101.
    gt, pred = arrays(
        [
            ([(BOX, 0)], [(BOX, 0.9, 0), (ELSEWHERE, 0.8, 0)]),
            ([(BOX, 0)], [(BOX, 0.7, 0)]),
        ]
    )
    result = coco_map(gt, pred, ["lesion"], n_bootstrap=0)
    assert result["map50"]["value"] == pytest.approx((51 + 100 / 3) / 101, abs=1e-6)
    curve = result["pr_curves"]["lesion"]
    assert curve["recall"][50] == 0.5 and curve["precision"][50] == pytest.approx(1.0)
    assert curve["precision"][51] == pytest.approx(2 / 3)


def test_ap_of_half_the_lesions_found_and_a_class_without_boxes():
    # one of two lesions found, nothing else: precision 1 up to recall 0.5, 0 beyond.
    # Class "b" has detections but no true box: no AP, left out of the mean.
    gt, pred = arrays([([(BOX, 0)], [(BOX, 0.9, 0)]), ([(BOX, 0)], [(ELSEWHERE, 0.9, 1)])])
    result = coco_map(gt, pred, ["a", "b"], n_bootstrap=0)
    assert result["map50"]["value"] == pytest.approx(51 / 101, abs=1e-6)
    assert result["per_class"]["b"]["ap50"] == {"value": None, "ci": None}
    assert result["per_class"]["b"]["ap"] == {"value": None, "ci": None}
    assert result["pr_curves"]["b"] is None


def test_map_over_iou_thresholds_counts_a_075_box_at_six_of_ten():
    # IoU 0.75 is a hit at thresholds 0.5 … 0.75 (6 of COCO's 10), a miss above
    gt, pred = arrays([([(BOX, 0)], [(IOU_075, 0.9, 0)])])
    result = coco_map(gt, pred, ["lesion"], n_bootstrap=0)
    assert result["map50"]["value"] == pytest.approx(1.0)
    assert result["map"]["value"] == pytest.approx(0.6)


def test_bootstrap_accumulation_reproduces_torchmetrics():
    rng = np.random.default_rng(3)
    images = []
    for _ in range(12):
        corners, classes = rng.uniform(0, 0.6, 2), rng.integers(0, 2, 2)
        lesions = [([x, x, x + 0.3, x + 0.3], int(c)) for x, c in zip(corners, classes)]
        detections = [
            ([b[0] + rng.normal(0, 0.03), b[1], b[2], b[3]], float(rng.uniform()), c)
            for b, c in lesions
        ] + [(ELSEWHERE, float(rng.uniform(0, 0.5)), int(rng.integers(0, 2)))]
        images.append((lesions, detections))
    gt, pred = arrays(images)
    tm = dm._torchmetrics_map(gt, pred, 2)
    own = dm._ap_from_precision(dm._CocoEval(gt, pred, 2).precision())
    assert own["map"] == pytest.approx(tm["map"], abs=1e-6)
    assert own["map50"] == pytest.approx(tm["map50"], abs=1e-6)
    np.testing.assert_allclose(own["ap"], tm["ap_per_class"], atol=1e-6)


# --------------------------------------------------------------------------- image level, IoU


def test_image_scores_are_each_class_top_box():
    gt, pred = arrays([([], [(BOX, 0.9, 0), (BOX, 0.4, 1), (BOX, 0.3, 0)]), ([], [])])
    assert image_scores(pred, 3).tolist() == [[0.9, 0.4, 0.0], [0.0, 0.0, 0.0]]


def test_image_auroc_ranks_images_by_their_top_box():
    gt, pred = arrays(
        [
            ([(BOX, 0)], [(BOX, 0.9, 0)]),
            ([(BOX, 0)], [(BOX, 0.3, 0)]),
            ([], [(BOX, 0.5, 0)]),
            ([], []),
        ]
    )
    result = image_auroc(gt, pred, ["lesion"], n_bootstrap=0)
    # positives 0.9, 0.3 against negatives 0.5, 0: 3 of 4 pairs ordered
    assert result["auroc_macro"]["value"] == pytest.approx(0.75)
    assert result["per_class"]["lesion"]["value"] == pytest.approx(0.75)


def test_median_iou_of_matched_boxes():
    gt, pred = four_images()
    assert median_iou(gt, pred, n_bootstrap=0) == {"value": pytest.approx(0.75), "ci": None}


# --------------------------------------------------------------------------- bootstrap


def test_intervals_contain_the_point_values():
    gt, pred = four_images()
    result = detection_metrics(gt, pred, ["lesion"], n_bootstrap=200, seed=1)
    for key in ("map50", "map", "sensitivity_at_1fp", "froc_score", "median_iou"):
        lo, hi = result[key]["ci"]
        assert lo <= result[key]["value"] <= hi, key
    band = result["froc"]["band"]
    assert len(band["lower"]) == len(band["fps_per_image"]) == len(band["upper"])


def test_intervals_collapse_on_identical_images():
    gt, pred = arrays([([(BOX, 0)], [(IOU_075, 0.9, 0), (ELSEWHERE, 0.5, 0)])] * 5)
    result = detection_metrics(gt, pred, ["lesion"], n_bootstrap=50)
    for key in ("map50", "map", "sensitivity_at_1fp", "median_iou"):
        value = result[key]["value"]
        assert result[key]["ci"] == pytest.approx([value, value]), key


def test_bootstrap_is_seeded():
    gt, pred = four_images()
    a = froc(gt, pred, n_bootstrap=100, seed=4)
    assert a == froc(gt, pred, n_bootstrap=100, seed=4)


# --------------------------------------------------------------------------- the metric set


def test_detection_metrics_is_the_metrics_json_body():
    gt, pred = four_images()
    extra_gt, extra_pred = arrays([([(ELSEWHERE, 1)], [(ELSEWHERE, 0.6, 1)]), ([], [])])
    gt, pred = np.concatenate([gt, extra_gt]), np.concatenate([pred, extra_pred])
    result = detection_metrics(gt, pred, ["nodule", "mass"], n_bootstrap=20)
    json.dumps(result)  # plain types only
    for key in dm.HEADLINE:
        assert set(result[key]) == {"value", "ci"}, key
    assert (result["n_images"], result["n_lesions"], result["n"]) == (6, 5, 6)
    assert result["classes"] == ["nodule", "mass"]
    assert result["per_class"]["mass"]["n_lesions"] == 1
    assert result["per_class"]["nodule"]["sensitivity"] == 0.75
    assert set(result["per_class"]["nodule"]) >= {"ap", "ap50", "auroc", "n_images"}
    assert result["curves"]["pr"]["mass"]["precision"][0] == pytest.approx(1.0)
    assert len(result["operating_points"]) == 7
    assert result["bootstrap"] == {"n": 20, "n_map": 20, "seed": 0, "confidence": 0.95}
    assert result["sensitivity_at_1fp"]["value"] == result["froc"]["sensitivity"][3]["value"]


def test_no_bootstrap_gives_no_intervals():
    gt, pred = four_images()
    result = detection_metrics(gt, pred, ["lesion"], n_bootstrap=0)
    assert all(result[key]["ci"] is None for key in dm.HEADLINE)
    assert result["froc"]["band"] is None and result["bootstrap"]["n_map"] == 0


def test_validation_scores_are_cheap_point_values():
    gt, pred = four_images()
    scores = validation_scores(gt, pred)
    assert set(scores) == {"map", "map50", "sensitivity_at_1fp"}
    assert scores["sensitivity_at_1fp"] == pytest.approx(0.75)
    assert scores["map50"] == pytest.approx(
        coco_map(gt, pred, ["lesion"], n_bootstrap=0)["map50"]["value"]
    )
    empty_gt, empty_pred = arrays([([], [])])
    assert validation_scores(empty_gt, empty_pred) == {
        "map": None,
        "map50": None,
        "sensitivity_at_1fp": None,
    }


def test_bad_inputs_are_refused_by_name():
    gt, pred = four_images()
    with pytest.raises(DataError, match="covers 4 images but predictions 3"):
        match_detections(gt, pred[:3])
    with pytest.raises(DataError, match=r"shape \(4, 3\)"):
        match_detections(gt[..., 0], pred)
    bad = pred.copy()
    bad[0, 0, 4] = 1.5
    with pytest.raises(DataError, match=r"predictions\[0, 0\] has score 1.5"):
        match_detections(gt, bad)
    bad = pred.copy()
    bad[0, 0, 5] = 1
    with pytest.raises(DataError, match="class index 1 but only 1 classes"):
        detection_metrics(gt, bad, ["lesion"], n_bootstrap=0)
    with pytest.raises(ConfigError, match="n_bootstrap"):
        froc(gt, pred, n_bootstrap=-1)
