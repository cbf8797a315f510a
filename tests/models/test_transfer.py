"""Transfer learning: freezing stages (BatchNorm included), parameter groups, the head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsight.errors import ConfigError
from medsight.models import create_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def resnet():
    return create_model("resnet18", 2)


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_trainable_parameters_drop_with_every_frozen_stage(resnet):
    counts = []
    for k in range(len(resnet.stage_names()) + 1):
        resnet.freeze_stages(k)
        assert resnet.frozen_stages() == k
        counts.append(_trainable(resnet))
    assert all(a > b for a, b in zip(counts, counts[1:]))
    assert counts[0] == sum(p.numel() for p in resnet.parameters())
    assert counts[-1] == sum(p.numel() for p in resnet.head.parameters())
    resnet.freeze_stages(0)
    assert _trainable(resnet) == counts[0]


def test_frozen_batchnorm_stays_in_eval_after_train(resnet):
    resnet.freeze_stages(2)  # stem and layer1
    resnet.train()
    assert not resnet.backbone.bn1.training
    assert not resnet.backbone.layer1[0].bn1.training
    assert resnet.backbone.layer2[0].bn1.training
    assert resnet.head.training
    before = resnet.backbone.layer1[0].bn1.running_mean.clone()
    resnet(torch.randn(4, 1, 32, 32) * 3 + 1)
    assert torch.equal(resnet.backbone.layer1[0].bn1.running_mean, before)
    resnet.eval()
    assert not resnet.backbone.layer2[0].bn1.training
    resnet.freeze_stages(0)
    resnet.train()
    assert resnet.backbone.bn1.training


@pytest.mark.parametrize("k", [-1, 6, 1.5, True])
def test_freeze_out_of_range_names_the_allowed_range(resnet, k):
    with pytest.raises(ConfigError, match="choose 0 to 5"):
        resnet.freeze_stages(k)


def test_param_groups_use_two_learning_rates_and_skip_frozen(resnet):
    resnet.freeze_stages(3)
    groups = resnet.param_groups(lr=1e-3, backbone_lr=1e-4, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert by_name["backbone"]["lr"] == by_name["backbone_no_decay"]["lr"] == 1e-4
    assert by_name["head"]["lr"] == by_name["head_no_decay"]["lr"] == 1e-3
    assert by_name["backbone"]["weight_decay"] == by_name["head"]["weight_decay"] == 0.05
    assert by_name["backbone_no_decay"]["weight_decay"] == by_name["head_no_decay"]["weight_decay"]
    assert by_name["head_no_decay"]["weight_decay"] == 0.0
    grouped = [p for g in groups for p in g["params"]]
    assert len({id(p) for p in grouped}) == len(grouped)
    assert all(p.requires_grad for p in grouped)
    assert sum(p.numel() for p in grouped) == _trainable(resnet)
    assert all(p.ndim <= 1 for g in groups if g["name"].endswith("no_decay") for p in g["params"])
    assert resnet.head.fc.weight in by_name["head"]["params"]
    assert resnet.head.fc.bias in by_name["head_no_decay"]["params"]
    torch.optim.AdamW(groups)  # the groups are valid optimizer input
    resnet.freeze_stages(0)


def test_param_groups_put_the_attention_block_with_the_head():
    model = create_model("resnet10t", 2, attention="cbam")
    groups = model.param_groups(lr=1e-3, backbone_lr=0.0)
    head_params = {id(p) for g in groups if g["name"].startswith("head") for p in g["params"]}
    assert all(id(p) in head_params for p in model.attention.parameters())


def test_freezing_everything_leaves_only_the_head_and_attention_learning():
    model = create_model("resnet10t", 2, attention="se")
    model.freeze_stages(len(model.stage_names()))
    model.train()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"attention", "head"}
    assert not any(m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))


def test_head_is_pool_dropout_linear():
    model = create_model("resnet10t", 5, drop_rate=0.25)
    assert isinstance(model.head.pool, nn.AdaptiveAvgPool2d)
    assert model.head.drop.p == 0.25
    assert (model.head.fc.in_features, model.head.fc.out_features) == (model.num_features, 5)
