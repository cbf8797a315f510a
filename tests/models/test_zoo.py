"""The zoo: names resolve to specs, create_model builds working classifiers, configs round-trip."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from medsight.errors import ConfigError
from medsight.models import (
    MedsightClassifier,
    ModelSpec,
    classifier_from_config,
    create_model,
    get_spec,
    list_models,
    model_table,
)
from medsight.models.attention import ATTENTION_KINDS, AttentionPool2d

REQUIRED = [
    "vgg16",
    "vgg19",
    "resnet18",
    "resnet50",
    "resnetv2_50",
    "densenet121",
    "inception_v3",
    "xception",
    "mobilenetv3_large_100",
    "mobilenetv3_small_100",
    "efficientnet_b0",
    "tf_efficientnet_lite0",
    "tf_efficientnet_lite1",
    "tf_efficientnet_lite2",
    "mobilenet_v2",
    "medcnn_s",
    "medcnn_m",
    "medcnn_lite",
]

# Small, representative: timm ResNet, torchvision, timm EfficientNet-Lite, custom, passthrough.
REPRESENTATIVE = ["resnet18", "mobilenet_v2", "tf_efficientnet_lite0", "medcnn_s", "resnet10t"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registry_holds_every_required_model():
    assert set(REQUIRED) <= set(list_models())


@pytest.mark.parametrize("name", REQUIRED)
def test_every_registered_name_resolves_to_a_spec(name):
    spec = get_spec(name)
    assert isinstance(spec, ModelSpec)
    assert spec.name == name
    assert spec.family in {"timm", "torchvision", "custom"}
    assert len(spec.mean) == 3 and len(spec.std) == 3 and spec.default_size > 0
    if spec.family == "timm":
        assert timm.is_model(spec.arch)
        # The registry's metadata matches what timm says the default weights expect.
        cfg = timm.models.get_pretrained_cfg(spec.arch)
        assert spec.default_size == cfg.input_size[-1]
        assert spec.mean == pytest.approx(cfg.mean) and spec.std == pytest.approx(cfg.std)


def test_xception_maps_to_timms_xception():
    assert get_spec("xception").arch in timm.list_models("*xception*")


def test_list_models_filters_with_wildcards():
    assert list_models("medcnn_*") == ["medcnn_lite", "medcnn_m", "medcnn_s"]
    assert list_models("medcnn3d*") == ["medcnn3d_m", "medcnn3d_s"]
    assert list_models("nothing*") == []
    assert list_models() == sorted(list_models())


def test_unregistered_timm_name_passes_through_with_timm_metadata():
    spec = get_spec("resnet10t")
    assert (spec.family, spec.arch, spec.default_size) == ("timm", "resnet10t", 176)
    assert spec.offline_weights is False


def test_tagged_name_selects_timm_weights_metadata():
    spec = get_spec("resnet50.a1_in1k")
    assert spec.arch == "resnet50.a1_in1k" and spec.family == "timm"


def test_unknown_weight_tag_lists_the_tags():
    with pytest.raises(ConfigError, match="a1_in1k"):
        get_spec("resnet50.nonsense")


def test_unknown_name_suggests_close_names():
    with pytest.raises(ConfigError) as err:
        get_spec("resnt18")
    message = str(err.value)
    assert "unknown model 'resnt18'" in message
    assert "did you mean resnet18" in message
    assert "`medsight models`" in message


@pytest.mark.parametrize("name", REPRESENTATIVE)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_create_model_gives_logits_and_forward_splits_exactly(name, in_chans):
    model = create_model(name, 3, in_chans=in_chans).eval()
    assert isinstance(model, MedsightClassifier)
    x = torch.randn(2, in_chans, 32, 32)
    with torch.no_grad():
        logits = model(x)
        fmap = model.forward_features(x)
        split = model.forward_head(fmap)
    assert logits.shape == (2, 3)
    assert fmap.dim() == 4 and fmap.shape[1] == model.num_features
    assert torch.equal(logits, split)
    assert model.pretrained_source is None


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_attention_sits_on_the_backbone_feature_map(kind):
    model = create_model("resnet10t", 2, attention=kind).eval()
    x = torch.randn(1, 1, 48, 48)
    with torch.no_grad():
        assert model(x).shape == (1, 2)
    assert model.attention_kind == kind
    if kind == "none":
        assert isinstance(model.attention, torch.nn.Identity)
        assert model.cam_layer() is model.backbone.layer4
    else:
        assert model.cam_layer() is model.attention


def test_cam_layer_output_is_the_feature_map():
    model = create_model("resnet18", 2).eval()
    seen = []
    handle = model.cam_layer().register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        fmap = model.forward_features(x)
    handle.remove()
    assert torch.equal(seen[-1], fmap)
    assert model.cam_layer_name() == "backbone.layer4"


def test_stage_names_of_representative_models():
    assert create_model("resnet18", 2).stage_names() == [
        "stem",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    ]
    assert create_model("mobilenet_v2", 2).stage_names() == [
        "stem",
        "features.2-3",
        "features.4-6",
        "features.7-13",
        "features.14-18",
    ]
    assert create_model("medcnn_s", 2).stage_names() == ["stem", "stage1", "stage2", "stage3"]


def test_every_backbone_parameter_belongs_to_exactly_one_stage():
    model = create_model("tf_efficientnet_lite0", 2)
    staged = [p for i in range(len(model.stage_names())) for p in model.stage_parameters(i)]
    assert sorted(staged) == sorted(n for n, _ in model.backbone.named_parameters())


def test_unused_timm_head_layers_are_dropped():
    # MobileNetV3's conv_head runs after pooling in timm; medsight pools the last map itself.
    model = create_model("mobilenetv3_small_100", 2)
    assert isinstance(model.backbone.conv_head, torch.nn.Identity)
    x = torch.randn(2, 1, 32, 32)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2, "in_chans": 0}, "in_chans"),
        ({"num_classes": 2, "attention": "fancy"}, "attention"),
        ({"num_classes": 2, "drop_rate": 1.0}, "drop_rate"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create_model("medcnn_s", **kwargs)


def test_custom_model_has_no_pretrained_weights():
    with pytest.raises(ConfigError, match="from scratch"):
        create_model("medcnn_s", 2, pretrained=True)


@pytest.mark.parametrize(
    "name, kwargs",
    [("resnet10t", {"attention": "se", "in_chans": 1, "drop_rate": 0.3}),
     ("medcnn_s", {"attention": "diff", "in_chans": 3})],
)  # fmt: skip
def test_config_round_trip_rebuilds_the_same_model(name, kwargs):
    model = create_model(name, 4, **kwargs)
    with torch.no_grad():  # token blocks start as identities; make them count
        for p in model.parameters():
            if p.ndim == 0:
                p.fill_(0.5)
    config = json.loads(json.dumps(model.config()))
    assert config == {
        "name": name,
        "num_classes": 4,
        "in_chans": kwargs["in_chans"],
        "attention": kwargs["attention"],
        "pool": "attention" if name == "medcnn_s" else "avg",
        "drop_rate": kwargs.get("drop_rate", 0.0),
        "default_size": get_spec(name).default_size,
    }
    rebuilt = classifier_from_config(config)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, kwargs["in_chans"], 40, 40)
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


@pytest.mark.parametrize(
    "name, attention, pool",
    [("medcnn_s", "diff", "attention"), ("medcnn_s", "self", "attention"),
     ("medcnn_lite", "sparse", "attention"), ("medcnn_s", "cbam", "avg"),
     ("medcnn_s", "none", "avg"), ("resnet10t", "diff", "avg")],
)  # fmt: skip
def test_custom_cnns_with_token_attention_pool_by_attention_by_default(name, attention, pool):
    model = create_model(name, 2, attention=attention)
    assert model.pool_kind == model.config()["pool"] == pool
    assert isinstance(model.head.pool, AttentionPool2d) == (pool == "attention")


def test_pool_can_be_chosen_and_needs_token_attention():
    assert create_model("medcnn_s", 2, attention="diff", pool="avg").pool_kind == "avg"
    assert create_model("resnet10t", 2, attention="self", pool="attention").pool_kind == (
        "attention"
    )
    with pytest.raises(ConfigError, match=r"pool='attention' needs token attention.*'cbam'"):
        create_model("medcnn_s", 2, attention="cbam", pool="attention")
    with pytest.raises(ConfigError, match=r"pool='max'.*auto, avg, attention"):
        create_model("medcnn_s", 2, attention="diff", pool="max")


def test_a_model_json_without_pool_rebuilds_the_average_pooled_model_it_was_trained_as():
    # Runs written before attention pooling recorded no ``pool``; they pooled by averaging.
    old = create_model("medcnn_s", 2, attention="diff", pool="avg")
    config = old.config()
    del config["pool"]
    rebuilt = classifier_from_config(config)
    assert rebuilt.pool_kind == "avg"
    rebuilt.load_state_dict(old.state_dict())  # strict: the same parameters, no pool weights
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(old.eval()(x), rebuilt.eval()(x))


def test_from_config_never_loads_pretrained_weights():
    rebuilt = classifier_from_config({"name": "mobilenet_v2", "num_classes": 2})
    assert rebuilt.pretrained_source is None


def test_from_config_rejects_incomplete_config():
    with pytest.raises(ConfigError, match="num_classes"):
        classifier_from_config({"name": "resnet18"})


def test_model_table_lists_every_registered_model_without_allocating():
    rows = {row["name"]: row for row in model_table()}
    assert set(rows) == set(list_models())
    for row in rows.values():
        assert row["params"] > 0 and row["stages"][0] == "stem"
        assert isinstance(row["offline_weights"], bool)
    assert rows["resnet18"]["stages"] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert rows["resnet18"]["params"] == 11_177_538  # 11.18 M backbone + a 2-class head
    assert 300_000 <= rows["medcnn_s"]["params"] <= 1_500_000
    assert rows["medcnn_m"]["params"] > rows["medcnn_s"]["params"]
    assert rows["medcnn_lite"]["stages"] == rows["medcnn_s"]["stages"]
