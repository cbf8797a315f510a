"""Preprocessing (what preprocess.json holds) and the training augmentation presets: exact
tensors, the channel policy, the JSON round trip, and which presets may flip or turn an image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from medsight.data.imaging import DecodedImage
from medsight.data.transforms import AUGMENT_PRESETS, Preprocess, augmentation
from medsight.errors import ConfigError

# --------------------------------------------------------------------------- Preprocess


def test_preprocess_normalises_known_values_without_resizing():
    image = DecodedImage(np.array([[[0.0, 0.5], [1.0, 0.25]]] * 1, dtype=np.float32), "x")
    out = Preprocess(size=(2, 2), channels=1, mean=(0.5,), std=(0.25,))(image)
    np.testing.assert_allclose(out[0], [[-2.0, 0.0], [2.0, -1.0]])


def test_gray_is_replicated_for_rgb_models_and_colour_reduced_to_luma():
    gray = np.full((1, 8, 8), 0.4, dtype=np.float32)
    rgb_out = Preprocess(size=(8, 8), channels=3, mean=(0.0,), std=(1.0,))(gray)
    assert rgb_out.shape == (3, 8, 8) and np.allclose(rgb_out, 0.4)
    colour = np.stack([np.full((8, 8), v, np.float32) for v in (1.0, 0.0, 0.0)])
    gray_out = Preprocess(size=(8, 8), channels=1, mean=(0.0,), std=(1.0,))(colour)
    assert gray_out.shape == (1, 8, 8) and np.allclose(gray_out, 0.299)


def test_resize_keeps_a_constant_image_constant():
    out = Preprocess(size=(16, 24), mean=(0.0,), std=(1.0,))(np.full((1, 40, 40), 0.7, np.float32))
    assert out.shape == (1, 16, 24) and np.allclose(out, 0.7, atol=1e-6)


def test_preprocess_round_trips_through_json(tmp_path):
    prep = Preprocess(size=(32, 32), channels=3, mean=(0.485, 0.456, 0.406), std=(0.2, 0.2, 0.2))
    prep.save(tmp_path / "preprocess.json")
    assert Preprocess.load(tmp_path / "preprocess.json") == prep


def test_preprocess_refuses_inconsistent_settings():
    with pytest.raises(ConfigError, match="mean needs 1 or 3 values"):
        Preprocess(channels=3, mean=(0.1, 0.2))
    with pytest.raises(ConfigError, match="channels must be 1 or 3"):
        Preprocess(channels=2)
    with pytest.raises(ConfigError, match="unknown field"):
        Preprocess.from_dict({"size": [8, 8], "colour": "sepia"})


def test_the_output_is_float32_channels_by_size_whatever_the_input():
    prep = Preprocess(size=(12, 20), channels=3, mean=(0.0,), std=(1.0,))
    rng = np.random.default_rng(0)
    for pixels in (rng.random((1, 30, 17)), rng.random((3, 8, 8)), rng.random((1, 12, 20))):
        out = prep(pixels.astype(np.float32))
        assert out.shape == (3, 12, 20) and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0  # mean 0, std 1: pixels stay in [0, 1]
    ready = prep.prepare(rng.random((1, 40, 40)).astype(np.float32))
    assert ready.shape == (3, 12, 20) and ready.min() >= 0.0 and ready.max() <= 1.0


def test_a_decoded_image_and_its_pixel_array_give_the_same_tensor():
    pixels = np.random.default_rng(1).random((1, 9, 9)).astype(np.float32)
    prep = Preprocess(size=(5, 5))
    np.testing.assert_array_equal(prep(DecodedImage(pixels, "x")), prep(pixels))


def test_grayscale_is_replicated_into_three_identical_channels():
    gray = np.random.default_rng(2).random((1, 6, 6)).astype(np.float32)
    out = Preprocess(size=(6, 6), channels=3, mean=(0.0,), std=(1.0,))(gray)
    assert out.shape == (3, 6, 6)
    for channel in out:
        np.testing.assert_array_equal(channel, gray[0])


def test_per_channel_normalisation_matches_hand_computed_values():
    pixels = np.stack([np.full((2, 2), v, np.float32) for v in (0.2, 0.5, 0.9)])
    imagenet = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    out = Preprocess(size=(2, 2), channels=3, **imagenet)(pixels)
    # (0.2 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (0.9 - 0.406) / 0.225
    for channel, value in zip(out, [-1.2445415, 0.1964286, 2.1955556]):
        np.testing.assert_allclose(channel, value, rtol=1e-6)


def test_colour_becomes_its_bt601_luma_for_one_channel_models():
    rgb = np.stack([np.full((4, 4), v, np.float32) for v in (0.2, 0.6, 1.0)])
    out = Preprocess(size=(4, 4), channels=1, mean=(0.5,), std=(0.5,))(rgb)
    luma = 0.299 * 0.2 + 0.587 * 0.6 + 0.114 * 1.0  # 0.5264
    np.testing.assert_allclose(out, (luma - 0.5) / 0.5, rtol=1e-5)


def test_the_json_file_holds_every_field_and_restores_a_window(tmp_path):
    prep = Preprocess(size=(24, 32), window=(40.0, 400.0))
    prep.save(tmp_path / "preprocess.json")
    stored = json.loads((tmp_path / "preprocess.json").read_text())
    assert stored == {
        "size": [24, 32],
        "channels": 1,
        "mean": [0.5],
        "std": [0.5],
        "gray_to_rgb": "replicate",
        "window": [40.0, 400.0],
        "volume_slice": None,
        "version": 1,
    }
    loaded = Preprocess.load(tmp_path / "preprocess.json")
    assert loaded == prep and isinstance(loaded.size, tuple) and loaded.window == (40.0, 400.0)
    sliced = Preprocess(size=(24, 32), volume_slice=(1, None))
    sliced.save(tmp_path / "sliced.json")
    assert Preprocess.load(tmp_path / "sliced.json").volume_slice == (1, None)


def test_bad_sizes_stds_and_channel_policies_are_refused():
    with pytest.raises(ConfigError, match="size must be"):
        Preprocess(size=(0, 8))
    with pytest.raises(ConfigError, match="std values must be positive"):
        Preprocess(std=(0.0,))
    with pytest.raises(ConfigError, match="gray_to_rgb must be 'replicate'"):
        Preprocess(gray_to_rgb="zeros")
    with pytest.raises(ConfigError, match="cannot turn a 2-channel image into 1"):
        Preprocess(size=(4, 4))(np.zeros((2, 4, 4), np.float32))


# --------------------------------------------------------------------------- augmentation


def test_xray_preset_never_flips_but_derm_does():
    torch.manual_seed(0)
    image = torch.zeros(1, 16, 16)
    image[:, :, :4] = 1.0  # a bright band on the left
    xray = augmentation("xray")
    assert all(xray(image.clone())[:, :, :3].mean() > 0.5 for _ in range(20))
    derm = augmentation("derm", channels=3)
    colour = image.repeat(3, 1, 1)
    moved = [derm(colour.clone())[:, :, :3].mean() < 0.5 for _ in range(30)]
    assert any(moved)
    assert augmentation("none") is None
    with pytest.raises(ConfigError, match="augment must be one of"):
        augmentation("sepia")


def _steps(transform) -> list[str]:
    return [type(step).__name__ for step in transform.transforms]


MIRRORS = {"RandomHorizontalFlip", "RandomVerticalFlip", "_RandomRot90"}


@pytest.mark.parametrize("strength", [0.5, 1.0, 3.0])
def test_xray_and_auto_never_mirror_or_turn_at_any_strength(strength):
    for preset in ("xray", "auto"):
        assert not MIRRORS & set(_steps(augmentation(preset, strength=strength)))


def test_ct_and_mri_flip_left_right_only_and_derm_histo_use_every_orientation():
    for preset in ("ct", "mri"):
        steps = set(_steps(augmentation(preset)))
        assert "RandomHorizontalFlip" in steps
        assert not {"RandomVerticalFlip", "_RandomRot90"} & steps
    for preset in ("derm", "histo"):
        assert set(_steps(augmentation(preset))) >= MIRRORS
    assert "ColorJitter" in _steps(augmentation("derm", channels=3))
    assert "ColorJitter" not in _steps(augmentation("derm", channels=1))


def test_augmented_images_stay_in_the_unit_range_and_shape():
    torch.manual_seed(0)
    image = torch.rand(3, 16, 16)
    for preset in AUGMENT_PRESETS:
        transform = augmentation(preset, channels=3, strength=3.0)
        if transform is None:
            continue
        out = transform(image.clone())
        assert out.shape == image.shape and out.min() >= 0.0 and out.max() <= 1.0


def test_strength_zero_turns_augmentation_off_and_bad_strengths_are_refused():
    assert augmentation("derm", strength=0) is None
    assert isinstance(augmentation("xray", strength=2), v2.Compose)
    for bad in (-0.1, 3.5):
        with pytest.raises(ConfigError, match="strength must be between 0 and 3"):
            augmentation("xray", strength=bad)
