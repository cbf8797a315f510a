"""The multi-label task: findings texts ↔ multi-hot targets, the masked loss, decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsight.data.findings import encode_rows, multi_hot, positives
from medsight.errors import DataError
from medsight.tasks import get_task
from medsight.tasks.multilabel import MaskedBCEWithLogits, positive_weights

FINDINGS = ["effusion", "edema", "mass"]


def test_labels_round_trip_through_text_with_ignored_entries():
    matrix = np.array([[1, 0, np.nan], [0, 0, 0], [1, 1, 1], [np.nan, np.nan, 0]])
    labels = encode_rows(matrix, FINDINGS)
    assert labels == ["effusion|?mass", "no finding", "effusion|edema|mass", "?effusion|?edema"]
    np.testing.assert_array_equal(multi_hot(labels, FINDINGS), matrix.astype(np.float32))
    assert positives(labels, FINDINGS).tolist() == [[1, 0, 0], [0, 0, 0], [1, 1, 1], [0, 0, 0]]
    with pytest.raises(DataError, match=r"finding\(s\) \['nodule'\] are not findings"):
        multi_hot(["nodule|mass"], FINDINGS)


def test_the_masked_loss_leaves_ignored_entries_out_and_weights_positives():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.5, 1.5, 3.0]])
    targets = torch.tensor([[1.0, 0.0, float("nan")], [0.0, float("nan"), 1.0]])
    weight = torch.tensor([2.0, 1.0, 3.0])
    loss = MaskedBCEWithLogits(weight)(logits, targets)
    known = [(0, 0, 1.0), (0, 1, 0.0), (1, 0, 0.0), (1, 2, 1.0)]
    expected = []
    for i, k, t in known:
        p = torch.sigmoid(logits[i, k])
        expected.append(-(weight[k] * t * torch.log(p) + (1 - t) * torch.log(1 - p)))
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)
    # an ignored entry's logit gets no gradient
    logits.requires_grad_(True)
    MaskedBCEWithLogits(weight)(logits, targets).backward()
    assert logits.grad[0, 2] == 0 and logits.grad[1, 1] == 0 and logits.grad[0, 0] != 0


def test_positive_weights_are_negatives_over_positives_capped():
    counts = np.array([[10, 1, 0], [90, 500, 40]])  # positives, negatives
    assert positive_weights(counts).tolist() == pytest.approx([9.0, 50.0, 1.0])


def test_decoding_names_the_findings_above_their_thresholds():
    task = get_task("multilabel")
    probs = np.array([[0.9, 0.2, 0.6], [0.1, 0.2, 0.3]])
    first, second = task.decode(probs, FINDINGS, thresholds=[0.5, 0.5, 0.7])
    assert first["label"] == "effusion" and first["confidence"] == pytest.approx(0.9)
    assert [f["above_threshold"] for f in first["findings"]] == [True, False, False]
    assert second["label"] == "no finding"
    assert task.prediction_schema.model_validate(first).findings[2].threshold == 0.7
    assert task.urgency(probs[0], FINDINGS, None) == pytest.approx(0.9)


def test_validation_scores_average_auroc_over_defined_findings():
    task = get_task("multilabel")
    logits = torch.tensor([[3.0, 0.0, 1.0], [-3.0, 0.0, 2.0], [2.0, 0.0, -1.0], [-2.0, 0.0, -2.0]])
    targets = torch.tensor(
        [[1.0, 0.0, 1.0], [0.0, 0.0, float("nan")], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    )
    scores = task.validation_scores(logits, targets, -1)
    # effusion separates perfectly (1.0); edema has no positive (left out); mass: 1 of 2 pairs
    assert scores["auroc"] == pytest.approx((1.0 + 0.5) / 2)


def test_the_focal_option_is_torchvisions_focal_loss_on_the_known_entries():
    from torchvision.ops import sigmoid_focal_loss

    from medsight.errors import ConfigError

    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.5, 1.5, 3.0]])
    targets = torch.tensor([[1.0, 0.0, float("nan")], [0.0, float("nan"), 1.0]])
    focal = get_task("multilabel").build_loss(np.array([[1, 1, 1], [1, 1, 1]]), 0.0, "focal")
    known = ~torch.isnan(targets)
    each = sigmoid_focal_loss(logits[known], targets[known], reduction="none")
    assert focal(logits, targets).item() == pytest.approx(each.mean().item(), rel=1e-6)
    assert focal(logits, targets).item() < MaskedBCEWithLogits()(logits, targets).item()
    with pytest.raises(ConfigError, match="--loss focal is a loss for several findings"):
        get_task("classify").build_loss(None, 0.0, "focal")
