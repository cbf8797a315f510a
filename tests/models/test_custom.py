"""Custom CNNs: any small input size, attention inside the last two stages, a sensible size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medsight.models import create_model
from medsight.models.attention import (
    ATTENTION_KINDS,
    DifferentialAttention2d,
    lambda_init_schedule,
)
from medsight.models.custom import MedCNN, create_custom


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_medcnn_s_takes_28_to_128_px_with_every_attention_kind(kind):
    model = create_model("medcnn_s", 3, in_chans=1, attention=kind).eval()
    with torch.no_grad():
        for size in (28, 32, 64, 128):
            assert model(torch.randn(1, 1, size, size)).shape == (1, 3)


def test_maps_never_shrink_below_one_pixel():
    net = create_custom("medcnn_s").eval()
    with torch.no_grad():
        assert net.forward_features(torch.randn(1, 1, 28, 28)).shape[-2:] == (4, 4)
        assert net.forward_features(torch.randn(1, 1, 8, 8)).shape[-2:] == (1, 1)
        assert net.forward_features(torch.randn(1, 1, 2, 2)).shape[-2:] == (1, 1)


def test_parameter_counts_are_in_the_stated_range():
    small = _params(create_model("medcnn_s", 2))
    medium = _params(create_model("medcnn_m", 2))
    assert 300_000 <= small <= 1_500_000
    assert medium > 2 * small


@pytest.mark.parametrize("kind", ["se", "cbam", "self", "diff", "sparse"])
def test_attention_closes_each_of_the_last_two_stages(kind):
    net = MedCNN(attention=kind)
    for stage in ("stem", "stage1"):
        assert not hasattr(getattr(net, stage), "attention")
    for stage, width in (("stage2", 128), ("stage3", 256)):
        block = getattr(net, stage).attention
        assert list(getattr(net, stage).named_children())[-1][0] == "attention"
        if kind in ("self", "diff", "sparse"):
            assert block.out.out_features == width


def test_differential_blocks_count_their_depth_from_one():
    net = MedCNN(attention="diff")
    assert isinstance(net.stage2.attention, DifferentialAttention2d)
    assert net.stage2.attention.lambda_init == pytest.approx(lambda_init_schedule(1))
    assert net.stage3.attention.lambda_init == pytest.approx(lambda_init_schedule(2))


def test_custom_attention_is_inside_and_the_outer_slot_is_identity():
    model = create_model("medcnn_s", 2, attention="cbam")
    assert isinstance(model.attention, torch.nn.Identity)
    assert model.attention_kind == "cbam"
    assert model.cam_layer() is model.backbone.stage3
    # Freezing the last stage freezes its attention block too.
    model.freeze_stages(4)
    assert not any(p.requires_grad for p in model.backbone.stage3.attention.parameters())


def test_medcnn_s_learns_a_toy_task_quickly():
    # Bright disc vs bright ring at 28 px: a few steps must separate them.
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    r = ((yy - 13.5) ** 2 + (xx - 13.5) ** 2).sqrt()
    disc, ring = (r < 7).float(), ((r > 5) & (r < 9)).float()
    x = torch.stack([disc, ring] * 8)[:, None] + 0.3 * torch.randn(16, 1, 28, 28)
    y = torch.tensor([0, 1] * 8)
    model = create_model("medcnn_s", 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
