"""--model auto: the network the default recipe picks from the data, and why."""

from __future__ import annotations

import json

import pytest

from medsight.errors import ConfigError
from medsight.training.recipe import (
    LEAN_CNN,
    PRETRAINED_CNN,
    PRETRAINED_MIN_IMAGES,
    PRETRAINED_MIN_SIDE,
    choose_model,
)


@pytest.mark.parametrize(
    ("side", "n_train", "name"),
    [
        (28, 3_882, LEAN_CNN),  # PneumoniaMNIST
        (64, 41_000, LEAN_CNN),  # Medical MNIST: low resolution, however many
        (64, 840, LEAN_CNN),  # the phantom set
        (PRETRAINED_MIN_SIDE + 1, PRETRAINED_MIN_IMAGES - 1, LEAN_CNN),  # detailed but few
        (PRETRAINED_MIN_SIDE + 1, PRETRAINED_MIN_IMAGES, PRETRAINED_CNN),
        (512, 4_800, PRETRAINED_CNN),  # a brain MRI set
    ],
)
def test_auto_picks_by_image_side_and_count(side, n_train, name):
    choice = choose_model(native_side=side, n_train=n_train)
    assert choice.name == name
    assert choice.pretrained == (name == PRETRAINED_CNN)
    assert choice.reason


def test_the_pretrained_backbone_runs_at_128_px_on_a_cpu_and_224_on_a_gpu():
    assert choose_model(native_side=512, n_train=5000).image_size == 128
    assert choose_model(native_side=512, n_train=5000, gpu=True).image_size == 224
    assert choose_model(native_side=150, n_train=5000, gpu=True).image_size == 150  # no upsampling
    assert choose_model(native_side=512, n_train=5000, image_size=160).image_size == 160


def test_explicit_wishes_for_imagenet_features_choose_the_pretrained_backbone():
    for kwargs in ({"pretrained": True}, {"mode": "finetune"}, {"mode": "features"}):
        choice = choose_model(native_side=28, n_train=500, **kwargs)
        assert choice.name == PRETRAINED_CNN and choice.pretrained
        assert choice.image_size == 32  # ImageNet CNNs need at least 32 px


def test_without_installed_weights_large_sets_fall_back_and_explicit_wishes_are_refused():
    choice = choose_model(native_side=512, n_train=5000, pretrained_available=False)
    assert choice.name == LEAN_CNN and "not installed" in choice.reason
    with pytest.raises(ConfigError, match="requirements-weights.txt"):
        choose_model(native_side=64, n_train=500, pretrained=True, pretrained_available=False)


def test_weights_of_a_run_keep_its_architecture_and_a_bare_file_needs_a_name(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.json").write_text(json.dumps({"name": "medcnn_m"}))
    assert choose_model(native_side=64, n_train=10, weights=str(tmp_path / "run")).name == (
        "medcnn_m"
    )
    with pytest.raises(ConfigError, match="add --model NAME"):
        choose_model(native_side=64, n_train=10, weights=str(tmp_path / "w.safetensors"))


def test_the_default_recipe_names_its_network_in_the_run_and_says_why(tmp_path):
    from tests.conftest import make_two_class_manifest

    from medsight.config import DataConfig, TrainConfig
    from medsight.events import Note
    from medsight.runs import Run
    from medsight.training.trainer import train

    data = make_two_class_manifest(tmp_path / "data", 10, 2, 16)
    config = TrainConfig(data=DataConfig(path=str(data)), out=str(tmp_path / "run"))
    config = config.with_overrides({"optim.epochs": 1})
    assert config.model.name == "auto"
    seen = []
    run = train(config, events=seen.append, show_progress=False)
    assert Run.load(run.path).config.model.name == LEAN_CNN  # config.yaml reproduces the run
    assert run.model_config["name"] == LEAN_CNN
    notes = [e.text for e in seen if isinstance(e, Note)]
    assert any(f"--model auto chose {LEAN_CNN}" in n and "px" in n for n in notes), notes
