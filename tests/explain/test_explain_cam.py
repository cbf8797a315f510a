"""Explainer: map shape and range, maps that find the region a model reads, layers, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from medsight.errors import ConfigError, DataError
from medsight.explain import METHODS, Explainer, candidate_layers, overlay
from medsight.models import create_model
from medsight.models.attention import AttentionPool2d

SIZE = 32
#: The only region RegionNet's lesion logit reads: rows 4–11, columns 18–25.
REGION = (slice(4, 12), slice(18, 26))


class Gate(nn.Module):
    """Multiply the feature map by a learnt spatial weight."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return x * self.weight


class RegionNet(nn.Module):
    """Hand-built: logit 1 is the mean brightness of REGION (a gate is zero elsewhere)."""

    in_chans = 1
    num_classes = 2

    def __init__(self):
        super().__init__()
        self.pre = nn.Identity()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        weight = torch.zeros(1, 1, SIZE, SIZE)
        weight[0, 0][REGION] = 1.0
        self.gate = Gate(weight)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.features[0].weight.fill_(1 / 9)
            self.features[0].bias.zero_()
            self.fc.weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(self.gate(self.features(self.pre(x)))).flatten(1))


def region_image() -> np.ndarray:
    """Dim noise, a bright blob inside REGION and a brighter distractor outside it."""
    rng = np.random.default_rng(0)
    image = rng.uniform(0.0, 0.2, (1, 1, SIZE, SIZE)).astype(np.float32)
    image[0, 0, 6:10, 20:24] = 0.8
    image[0, 0, 20:28, 4:12] = 1.0
    return image


def in_region(heatmap: np.ndarray) -> bool:
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return REGION[0].start <= y < REGION[0].stop and REGION[1].start <= x < REGION[1].stop


@pytest.fixture(scope="module")
def attention_model():
    # Untrained weights: with seed 0 Grad-CAM's map of one image is all zero (a ReLU of a
    # negative sum), which says nothing about the method; seed 1 gives every method a map.
    torch.manual_seed(1)
    return create_model("medcnn_s", 3, in_chans=1, attention="diff").eval()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_map_at_input_size_in_unit_range(attention_model, method):
    x = np.random.default_rng(1).normal(size=(2, 1, 16, 16)).astype(np.float32)
    with Explainer(attention_model, method) as explainer:
        one = explainer.explain(x[:1])
        both = explainer.explain_batch(x, [0, 2])
    assert one.shape == (16, 16) and one.dtype == np.float32
    assert both.shape == (2, 16, 16)
    for heatmap in (one, *both):
        assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0
        assert heatmap.max() == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "ig"])
def test_map_maximum_lies_in_the_only_region_the_logit_reads(method):
    model = RegionNet()
    layer = None if method == "ig" else "gate"
    heatmap = Explainer(model, method, layer).explain(region_image(), target=1)
    assert in_region(heatmap), np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)


def test_ig_gives_no_weight_to_a_distractor_the_model_never_reads():
    heatmap = Explainer(RegionNet(), "ig").explain(region_image(), target=1)
    assert heatmap[22:26, 6:10].max() < 0.05


def test_default_layers_follow_the_architecture(attention_model):
    plain = create_model("medcnn_s", 2, in_chans=1)
    # Grad-CAM fuses the last three stages after the stem; the others keep the last stage.
    assert Explainer(plain, "gradcam").layer == "backbone.stage1,backbone.stage2,backbone.stage3"
    assert Explainer(plain, "gradcam++").layer == "backbone.stage3"
    assert Explainer(attention_model, "attention").layer == "head.pool"
    averaged = create_model("medcnn_s", 2, in_chans=1, attention="diff", pool="avg")
    assert Explainer(averaged, "attention").layer == "backbone.stage3.attention"
    assert Explainer(attention_model, "ig").layer == "input"
    resnet = create_model("resnet18", 2, in_chans=1, attention="self")
    assert Explainer(resnet, "gradcam").layer == "backbone.layer2,backbone.layer3,backbone.layer4"
    assert Explainer(resnet, "layercam").layer == "attention"
    # Stages named by block ranges fuse at their last block.
    mobilenet = create_model("mobilenet_v2", 2, in_chans=1, pretrained=False)
    assert mobilenet.stage_names()[2] == "features.4-6"
    fused = "backbone.features.6,backbone.features.13,backbone.features.18"
    assert Explainer(mobilenet, "gradcam").layer == fused
    assert Explainer(resnet, "attention").layer == "attention"
    assert "backbone.layer4" in candidate_layers(resnet)
    assert Explainer(resnet, "gradcam", layer="backbone.layer3").layer == "backbone.layer3"


class PooledNet(nn.Module):
    """Hand-built: the features are the image; an attention pool whose query looks for
    brightness decides the logits, so its weights must sit on the bright square."""

    in_chans = 1
    num_classes = 2

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(1, 4, 1)
        self.pool = AttentionPool2d(4, kind="diff", heads=1, pos_encoding=False)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]).view(4, 1, 1, 1))
            self.features.bias.copy_(torch.tensor([0.0, 0.5, 0.5, 0.5]))  # LayerNorm: contrast
            self.pool.k.weight.copy_(torch.eye(4))
            self.pool.query.zero_()
            self.pool.query[0, 0, 0] = 20.0

    def forward(self, x):
        return self.fc(self.pool(self.features(x)))


def test_attention_reads_the_pooling_weights_which_peak_on_the_evidence():
    image = np.full((1, 1, SIZE, SIZE), 0.1, np.float32)
    image[0, 0][REGION] = 1.0
    explainer = Explainer(PooledNet(), "attention")
    assert explainer.layer == "pool"
    heatmap = explainer.explain(image)
    inside = np.zeros((SIZE, SIZE), bool)
    inside[REGION] = True
    assert heatmap[inside].min() > heatmap[~inside].max()


def test_a_run_from_before_attention_pooling_explains_with_its_last_block(tmp_path, mask_data):
    from tests.conftest import write_run

    torch.manual_seed(0)
    model = create_model("medcnn_s", 2, in_chans=1, attention="diff", pool="avg")
    run = write_run(tmp_path / "old", mask_data, attention="diff", model=model)
    config = json.loads((run / "model.json").read_text())
    del config["pool"]  # what runs written before attention pooling hold
    (run / "model.json").write_text(json.dumps(config))
    explainer = Explainer.from_run(run, method="attention")
    assert explainer.layer == "backbone.stage3.attention"
    assert explainer.explain(np.zeros((1, 1, 16, 16), np.float32)).shape == (16, 16)
    new = Explainer.from_run(write_run(tmp_path / "new", mask_data, attention="diff"), "attention")
    assert new.layer == "head.pool"


def test_attention_on_a_model_without_attention_says_which_models_have_it():
    model = create_model("medcnn_s", 2, in_chans=1, attention="cbam")
    with pytest.raises(ConfigError, match=r"attention 'cbam'.*self, diff, sparse.*gradcam"):
        Explainer(model, "attention")


def test_unknown_layer_lists_the_candidates():
    model = create_model("medcnn_s", 2, in_chans=1)
    with pytest.raises(ConfigError, match=r"'backbone.stage7'.*backbone.stage2, backbone.stage3"):
        Explainer(model, "gradcam", layer="backbone.stage7")
    with pytest.raises(ConfigError, match="not a token-attention block"):
        Explainer(create_model("medcnn_s", 2, attention="diff"), "attention", "backbone.stem")
    with pytest.raises(ConfigError, match="does not apply to ig"):
        Explainer(model, "ig", layer="backbone.stage3")


def test_bad_method_target_and_input_are_refused_with_the_fix():
    model = create_model("medcnn_s", 2, in_chans=1)
    with pytest.raises(ConfigError, match="choose one of: gradcam"):
        Explainer(model, "saliency")
    explainer = Explainer(model, "gradcam", classes=["normal", "lesion"])
    x = np.zeros((1, 1, 16, 16), np.float32)
    with pytest.raises(DataError, match=r"shaped \(1, 1, H, W\).*shape \(1, 16, 16\)"):
        explainer.explain(x[0])
    with pytest.raises(DataError, match="3 channel"):
        explainer.explain(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(ConfigError, match="'tumour' is not one of the run's classes: normal"):
        explainer.explain(x, target="tumour")
    with pytest.raises(ConfigError, match="out of range"):
        explainer.explain(x, target=2)
    assert explainer.explain(x, target="lesion").shape == (16, 16)


def test_method_aliases_are_accepted():
    model = create_model("medcnn_s", 2, in_chans=1)
    assert Explainer(model, "Grad-CAM++").method == "gradcam++"


def test_auto_uses_the_best_method_recorded_in_the_run(tiny_run):
    assert Explainer.from_run(tiny_run).method == "gradcam"
    scores = {
        "gradcam": {"pointing_game": {"value": 0.5}},
        "attention": {"pointing_game": {"value": 0.9}},
    }
    (tiny_run / "localisation.json").write_text(json.dumps({"methods": scores}))
    explainer = Explainer.from_run(tiny_run, method="auto")
    assert (explainer.method, explainer.layer) == ("attention", "head.pool")
    assert explainer.classes == ["normal", "lesion"]
    heatmap = explainer.explain(np.zeros((1, 1, 16, 16), np.float32))
    assert heatmap.shape == (16, 16)
    # A CAM method scored on another layer (--layer) comes back with that layer.
    scores["gradcam++"] = {"pointing_game": {"value": 0.95}, "layer": "backbone.stage2"}
    (tiny_run / "localisation.json").write_text(json.dumps({"methods": scores}))
    explainer = Explainer.from_run(tiny_run)
    assert (explainer.method, explainer.layer) == ("gradcam++", "backbone.stage2")


def test_overlay_blends_at_the_display_size_and_writes_the_label():
    display = np.linspace(0, 1, 40 * 50, dtype=np.float32).reshape(40, 50)
    heatmap = np.zeros((8, 8), np.float32)
    heatmap[2, 6] = 1.0
    plain = overlay(display, heatmap)
    assert plain.mode == "RGB" and plain.size == (50, 40)
    labelled = np.asarray(overlay(display, heatmap, label="lesion 0.93"))
    assert (labelled != np.asarray(plain)).any()
    rgb = overlay(np.zeros((12, 12, 3), np.uint8), np.ones((12, 12)))
    assert np.asarray(rgb).mean() > 0  # the hot map shows on black
    with pytest.raises(DataError, match="2-D heat-map"):
        overlay(display, np.zeros((2, 2, 2)))


def test_explain_works_inside_inference_mode_as_a_server_may_call_it():
    explainer = Explainer(RegionNet(), "gradcam", "gate")
    with torch.inference_mode():
        heatmap = explainer.explain(region_image(), target=1)
    assert in_region(heatmap)


def test_a_map_that_fails_the_sanity_check_is_never_the_default(tiny_run):
    from medsight.explain.cam import choose_best
    from medsight.explain.faithfulness import SANITY_MAX_RHO, passes_sanity

    def rho(value):
        return {"spearman": {"value": value, "ci": None}}

    assert SANITY_MAX_RHO == 0.5
    assert [passes_sanity(rho(v)) for v in (0.49, 0.5, 0.89)] == [True, False, False]
    assert passes_sanity(None) is None and passes_sanity(rho(None)) is None

    methods = {
        "ig": {"pointing_game": {"value": 0.99}},  # points best, survives random weights
        "gradcam++": {"pointing_game": {"value": 0.85}, "layer": "backbone.stage2"},
        "gradcam": {"pointing_game": {"value": 0.80}},
    }
    sanity = {"ig": rho(0.89), "gradcam++": rho(0.16), "gradcam": rho(-0.16)}
    assert choose_best(methods, sanity) == "gradcam++"
    assert choose_best(methods, {}) == "ig"  # not checked: nothing to hold against it
    failing = {m: rho(0.9) for m in methods}
    assert choose_best(methods, failing) == "ig"  # all fail: the best of all, marked failing

    (tiny_run / "localisation.json").write_text(json.dumps({"methods": methods, "sanity": sanity}))
    explainer = Explainer.from_run(tiny_run)
    assert (explainer.method, explainer.layer) == ("gradcam++", "backbone.stage2")


def test_the_report_marks_the_methods_that_fail_the_sanity_check(tiny_run):
    from medsight.evaluation.report import _explanation_table

    scores = {
        "methods": {
            "ig": {"pointing_game": {"value": 0.99, "ci": [0.97, 1.0]}, "layer": "input"},
            "gradcam": {"pointing_game": {"value": 0.8, "ci": [0.7, 0.9]}, "layer": "s3"},
        },
        "sanity": {
            "ig": {"spearman": {"value": 0.89, "ci": [0.88, 0.9]}},
            "gradcam": {"spearman": {"value": -0.1, "ci": [-0.2, 0.0]}},
        },
        "best_method": "gradcam",
    }
    rows = {row["method"]: row for row in _explanation_table(scores)}
    assert rows["ig"]["fails_sanity"] and not rows["ig"]["best"]
    assert rows["gradcam"]["best"] and not rows["gradcam"]["fails_sanity"]


def _region_manifest(root, n: int = 6):
    """Images with a dim blob inside REGION (the lesion, masked) and a brighter distractor
    outside it; the lesion's mask, and the distractor's mask for the second question."""
    from tests.conftest import write_png

    rng = np.random.default_rng(3)
    lines = ["path,label,patient_id,mask,distractor"]
    for i in range(n):
        pixels = rng.integers(0, 50, (SIZE, SIZE)).astype(np.uint8)
        lesion, distractor = np.zeros_like(pixels), np.zeros_like(pixels)
        y, x = 5 + i % 3, 19 + i % 4
        pixels[y : y + 4, x : x + 4], lesion[y : y + 4, x : x + 4] = 200, 255
        pixels[20:28, 4:12], distractor[20:28, 4:12] = 255, 255
        write_png(root / f"img{i}.png", pixels)
        write_png(root / f"lesion{i}.png", lesion)
        write_png(root / f"distractor{i}.png", distractor)
        lines.append(f"img{i}.png,lesion,P{i},lesion{i}.png,distractor{i}.png")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def test_auto_chooses_the_map_that_finds_a_hand_built_models_evidence(tmp_path, monkeypatch):
    from medsight.explain import faithfulness as FA
    from medsight.explain.localisation import score_localisation
    from medsight.runs import Run
    from tests.conftest import write_run

    data = _region_manifest(tmp_path / "data")
    run = write_run(tmp_path / "run", data, classes=("normal", "lesion"), size=SIZE)
    monkeypatch.setattr(Run, "load_model", lambda self, *a, **k: RegionNet())
    scored = score_localisation(
        run, data, methods=["gradcam", "eigencam", "ig"], layer="gate", split=None,
        faithfulness=4, write=True,
    )  # fmt: skip
    points = {m: e["pointing_game"]["value"] for m, e in scored["methods"].items()}
    # The model reads only REGION: a faithful map points at the lesion there, not at the
    # brighter distractor.
    assert points["gradcam"] == 1.0
    assert scored["best_method"] in {m for m, v in points.items() if v == 1.0}
    auto = Explainer.from_run(run, method="auto")
    assert (auto.method, auto.layer) == (scored["best_method"], "gate")
    x = (region_image() - 0.5) / 0.5
    assert in_region(auto.explain(x, target="lesion"))

    # Scored against the distractor instead, Grad-CAM on the first convolution (before the
    # gate: a blurred copy of the image's brightness) "points" better than Integrated
    # Gradients; a map that survives randomised weights must still not become the default.
    (data.parent / "swapped.csv").write_text(
        data.read_text().replace("mask,distractor", "lesion_mask,mask")
    )
    real = FA.sanity_summary

    def brightness_maps_fail(explainer, *args, **kwargs):
        summary = real(explainer, *args, **kwargs)
        if explainer.layer == "features.0":
            summary["spearman"] = {"value": 0.9, "ci": [0.85, 0.95]}
            summary["passes"] = FA.passes_sanity(summary)
        return summary

    monkeypatch.setattr(FA, "sanity_summary", brightness_maps_fail)
    swapped = score_localisation(
        run, data.parent / "swapped.csv", methods=["gradcam", "ig"], split=None,
        faithfulness=4, write=False,
    )  # fmt: skip
    methods = swapped["methods"]
    assert methods["gradcam"]["layer"] == "features.0"
    assert methods["gradcam"]["pointing_game"]["value"] > methods["ig"]["pointing_game"]["value"]
    assert swapped["sanity"]["gradcam"]["passes"] is False
    assert swapped["best_method"] == "ig"


def test_a_layer_without_a_spatial_map_is_refused_with_the_layers_that_have_one():
    model = create_model("medcnn_s", 2, in_chans=1, attention="diff")
    with pytest.raises(ConfigError) as caught:
        Explainer(model, "gradcam", layer="head")
    message = str(caught.value)
    assert "'head'" in message and "no spatial map for a 64×64 input" in message
    assert "backbone.stage2 (16×16)" in message and "backbone.stage3 (8×8)" in message
    # The run's own input size decides the map sizes shown.
    from medsight.data.transforms import Preprocess

    with pytest.raises(ConfigError, match=r"backbone.stage3 \(4×4\)"):
        Explainer(model, "gradcam++", layer="head.fc", preprocess=Preprocess(size=(32, 32)))
    assert Explainer(model, "gradcam", layer="backbone.stage2").layer == "backbone.stage2"
