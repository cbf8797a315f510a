"""The ensemble network: the log of the weighted mean of temperature-scaled member probabilities,
its model.json round trip, and each member's input rebuilt from the ensemble's."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from medsight.errors import ConfigError
from medsight.models import create_model
from medsight.models.ensemble import EnsembleClassifier, _InputAdapter, model_from_config

GRAY = {"channels": 1, "size": [16, 16], "mean": [0.5], "std": [0.5]}
IMAGENET = {
    "channels": 3,
    "size": [12, 12],
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


def _members(*in_chans: int, num_classes: int = 3) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [
        create_model("medcnn_s", num_classes, in_chans=c, attention=a).eval()
        for c, a in zip(in_chans, ("none", "se", "none"))
    ]


def _ensemble(members=None, **kwargs) -> EnsembleClassifier:
    settings = {
        "weights": [3.0, 1.0],
        "temperatures": [1.0, 2.0],
        "preprocess": GRAY,
        "member_preprocess": [GRAY, GRAY],
        **kwargs,
    }
    return EnsembleClassifier(members or _members(1, 1), **settings).eval()


def test_the_output_is_the_log_of_the_weighted_mean_of_tempered_member_probabilities():
    ensemble = _ensemble()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        out = ensemble(x)
        first, second = (member(x) for member in ensemble.members)
    expected = 0.75 * torch.softmax(first / 1.0, -1) + 0.25 * torch.softmax(second / 2.0, -1)
    torch.testing.assert_close(out.exp(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.softmax(out, -1), expected, atol=1e-6, rtol=1e-5)
    assert ensemble.weights.tolist() == pytest.approx([0.75, 0.25])
    assert ensemble.num_classes == 3 and ensemble.in_chans == 1


def test_the_config_rebuilds_the_same_network(tmp_path):
    ensemble = _ensemble(
        members=_members(1, 3),
        preprocess=GRAY,
        member_preprocess=[GRAY, IMAGENET],
    )
    config = json.loads(json.dumps(ensemble.config()))  # what model.json holds
    assert config["name"] == "ensemble" and config["weights"] == pytest.approx([0.75, 0.25])
    rebuilt = model_from_config(config)
    assert isinstance(rebuilt, EnsembleClassifier)
    rebuilt.load_state_dict(ensemble.state_dict())
    rebuilt.eval()
    assert rebuilt.config() == ensemble.config()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), ensemble(x))
    assert not isinstance(model_from_config(config["members"][0]), EnsembleClassifier)
    with pytest.raises(ConfigError, match="lacks 'temperatures'"):
        EnsembleClassifier.from_config({k: v for k, v in config.items() if k != "temperatures"})


def test_members_with_other_input_conventions_get_their_own_input():
    pixels = torch.rand(2, 1, 8, 8)
    source = {"channels": 1, "size": [8, 8], "mean": [0.5], "std": [0.5]}
    target = {
        "channels": 3,
        "size": [8, 8],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    adapter = _InputAdapter(source, target)
    got = adapter((pixels - 0.5) / 0.5)
    mean = torch.tensor(target["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(target["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(got, (pixels.expand(-1, 3, -1, -1) - mean) / std)
    same = _InputAdapter(source, source)
    assert same.identity and torch.equal(same(pixels), pixels)


def test_a_colour_member_of_another_size_gets_the_resized_luma_of_its_input():
    pixels = torch.rand(2, 3, 8, 8)
    source = {"channels": 3, "size": [8, 8], "mean": [0.0], "std": [1.0]}
    target = {"channels": 1, "size": [4, 4], "mean": [0.5], "std": [0.25]}
    got = _InputAdapter(source, target)(pixels)
    luma = (pixels * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    expected = (F.interpolate(luma, size=(4, 4), mode="bilinear", align_corners=False) - 0.5) / 0.25
    assert got.shape == (2, 1, 4, 4)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weights": [1.0], "temperatures": [1.0], "member_preprocess": [GRAY]}, "one weight"),
        ({"weights": [1.0, -1.0]}, "weights must be ≥ 0"),
        ({"weights": [0.0, 0.0]}, "not all 0"),
        ({"temperatures": [1.0, 0.0]}, "temperatures must be positive"),
    ],
)
def test_inconsistent_mixing_settings_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        _ensemble(**change)


def test_members_must_be_two_or_more_and_predict_the_same_classes():
    with pytest.raises(ConfigError, match="at least 2 members"):
        _ensemble(members=_members(1), weights=[1.0], temperatures=[1.0], member_preprocess=[GRAY])
    torch.manual_seed(0)
    two_and_three = [create_model("medcnn_s", k, in_chans=1) for k in (2, 3)]
    with pytest.raises(ConfigError, match="different numbers of classes"):
        _ensemble(members=two_and_three)
