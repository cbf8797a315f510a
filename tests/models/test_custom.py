"""Custom CNNs: any small input size, attention inside the last two stages, a sensible size;
the lean member costs a fraction of medcnn_s and plugs into the same stage machinery."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medsight.explain import Explainer
from medsight.models import classifier_from_config, create_model, get_spec
from medsight.models.attention import (
    ATTENTION_KINDS,
    DifferentialAttention2d,
    lambda_init_schedule,
)
from medsight.models.custom import STAGE_NAMES, ChannelsLastConv2d, MedCNN, create_custom


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _toy_task() -> tuple[torch.Tensor, torch.Tensor]:
    # Bright disc vs bright ring at 28 px: a few steps must separate them.
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    r = ((yy - 13.5) ** 2 + (xx - 13.5) ** 2).sqrt()
    disc, ring = (r < 7).float(), ((r > 5) & (r < 9)).float()
    x = torch.stack([disc, ring] * 8)[:, None] + 0.3 * torch.randn(16, 1, 28, 28)
    return x, torch.tensor([0, 1] * 8)


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


@pytest.mark.parametrize(
    ("name", "lr", "steps"), [("medcnn_s", 1e-3, 12), ("medcnn_lite", 3e-3, 15)]
)
def test_custom_cnn_learns_a_toy_task_quickly(name, lr, steps):
    x, y = _toy_task()
    model = create_model(name, 2)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def _macs(model: nn.Module, size: int = 64) -> int:
    """Multiply-accumulates of one forward pass on one 1-channel image (counted, not timed)."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 1, size, size))
    return counter.get_total_flops() // 2


# --------------------------------------------------------------------------- medcnn_lite


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_medcnn_lite_takes_28_64_and_128_px_with_every_attention_kind(kind):
    model = create_model("medcnn_lite", 3, in_chans=1, attention=kind)
    model.eval()
    with torch.no_grad():
        for size in (28, 64, 128):
            assert model(torch.randn(2, 1, size, size)).shape == (2, 3)
    model.train()  # and it trains: every parameter of the backbone gets a gradient
    F.cross_entropy(model(torch.randn(2, 1, 28, 28)), torch.tensor([0, 2])).backward()
    for name, param in model.backbone.named_parameters():
        assert param.grad is not None, name


def test_medcnn_lite_pools_in_its_stem_only_from_48_px_and_keeps_a_map():
    net = create_custom("medcnn_lite").eval()
    with torch.no_grad():
        for size, side in ((2, 1), (8, 1), (16, 2), (28, 4), (32, 4), (48, 3), (64, 4), (128, 8)):
            assert net.forward_features(torch.randn(1, 1, size, size)).shape[-2:] == (side, side)


def test_medcnn_lite_runs_channels_last_after_its_first_conv_only():
    net = create_custom("medcnn_lite").eval()
    with torch.no_grad():
        fmap = net.forward_features(torch.randn(2, 1, 64, 64))
    assert fmap.is_contiguous(memory_format=torch.channels_last)
    assert sum(isinstance(m, ChannelsLastConv2d) for m in net.modules()) == 1
    assert all(t.is_contiguous() for t in net.state_dict().values())


@pytest.mark.parametrize("arch", ["medcnn_s", "medcnn_m"])
def test_earlier_custom_cnns_keep_their_layers(arch):
    # Runs trained with them must still load: same modules, no pool in the stem, plain convs.
    net = create_custom(arch)
    assert [name for name, _ in net.stem.named_children()] == ["conv1", "conv2"]
    assert not any(isinstance(m, ChannelsLastConv2d) for m in net.modules())


def test_medcnn_lite_has_the_four_custom_stages():
    model = create_model("medcnn_lite", 2, attention="self")
    assert model.stage_names() == list(STAGE_NAMES)
    assert [name for name, _ in model.backbone.named_children()] == list(STAGE_NAMES)
    assert model.num_features == 256


@pytest.mark.parametrize("k", range(len(STAGE_NAMES) + 1))
def test_medcnn_lite_freeze_stages_freezes_exactly_the_first_k(k):
    model = create_model("medcnn_lite", 2, attention="cbam")
    model.freeze_stages(k)
    model.train()
    frozen = set(STAGE_NAMES[:k])
    for name, param in model.backbone.named_parameters():
        assert param.requires_grad == (name.split(".")[0] not in frozen), name
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.training == (name.split(".")[0] not in frozen), name
    assert all(p.requires_grad for p in model.head.parameters())


@pytest.mark.parametrize("kind", ["se", "cbam", "self", "diff", "sparse"])
def test_medcnn_lite_attention_closes_each_of_the_last_two_stages(kind):
    net = create_custom("medcnn_lite", attention=kind)
    for stage in ("stem", "stage1"):
        assert not hasattr(getattr(net, stage), "attention")
    for stage, width in (("stage2", 128), ("stage3", 256)):
        assert list(getattr(net, stage).named_children())[-1][0] == "attention"
        if kind in ("self", "diff", "sparse"):
            assert getattr(net, stage).attention.out.out_features == width
    if kind == "diff":
        assert net.stage2.attention.lambda_init == pytest.approx(lambda_init_schedule(1))
        assert net.stage3.attention.lambda_init == pytest.approx(lambda_init_schedule(2))


def test_medcnn_lite_cam_layers_resolve_and_map_a_28_px_image():
    model = create_model("medcnn_lite", 2, in_chans=1, attention="diff").eval()
    assert model.cam_layer() is model.backbone.stage3
    image = np.random.default_rng(0).normal(size=(1, 1, 28, 28)).astype(np.float32)
    with Explainer(model, "gradcam") as explainer:  # fused over the stages after the stem
        assert explainer.layer == "backbone.stage1,backbone.stage2,backbone.stage3"
        heatmap = explainer.explain(image)
    assert Explainer(model, "gradcam++").layer == "backbone.stage3"
    assert heatmap.shape == (28, 28) and heatmap.max() == pytest.approx(1.0)
    assert Explainer(model, "attention").layer == "head.pool"  # the attention-pooling head
    averaged = create_model("medcnn_lite", 2, in_chans=1, attention="diff", pool="avg")
    assert Explainer(averaged, "attention").layer == "backbone.stage3.attention"


def test_medcnn_lite_costs_under_a_third_of_medcnn_s_at_64_px():
    lite = _macs(create_model("medcnn_lite", 3))
    small = _macs(create_model("medcnn_s", 3))
    assert small == pytest.approx(209e6, rel=0.01)
    assert lite < small / 3


def test_medcnn_lite_description_states_its_cost_and_size():
    description = get_spec("medcnn_lite").description
    macs = re.search(r"(\d+) M multiply-accumulates at 64 px", description)
    params = re.search(r"([\d.]+) M parameters", description)
    assert macs and params, description
    model = create_model("medcnn_lite", 2)
    assert int(macs.group(1)) == round(_macs(model) / 1e6)
    assert float(params.group(1)) == round(_params(model) / 1e6, 2)


def test_medcnn_lite_model_json_round_trip_gives_identical_outputs(tmp_path):
    model = create_model("medcnn_lite", 3, in_chans=1, attention="diff", drop_rate=0.2)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 0:  # token blocks start as identities; make them count
                p.fill_(0.5)
        model.train()
        model(torch.randn(8, 1, 64, 64))  # BatchNorm running statistics move off their init
    save_file(model.state_dict(), tmp_path / "model.safetensors")  # needs contiguous weights
    rebuilt = classifier_from_config(json.loads(json.dumps(model.config())))
    rebuilt.load_state_dict(load_file(tmp_path / "model.safetensors"))
    model.eval()
    rebuilt.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
