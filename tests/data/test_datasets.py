"""Preprocessing and the torch Dataset: exact tensors, channel policy, labels, caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsight.data.datasets import ImageDataset
from medsight.data.imaging import DecodedImage
from medsight.data.sources import load_samples
from medsight.data.transforms import Preprocess
from medsight.errors import ConfigError, DataError


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


def test_dataset_yields_tensors_and_class_indices(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "d", {"a": 2, "b": 1})
    table = load_samples(root)
    dataset = ImageDataset(table, Preprocess(size=(8, 8)))
    assert dataset.classes_ == ["a", "b"]
    x, y = dataset[2]
    assert isinstance(x, torch.Tensor) and x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert y == 1
    assert dataset.class_counts().tolist() == [2, 1]


def test_dataset_caches_small_images_and_augments_after_the_cache(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "d", {"a": 1, "b": 1})
    flips = []

    def flip(t):
        flips.append(1)
        return torch.flip(t, dims=[-1])

    dataset = ImageDataset(load_samples(root), Preprocess(size=(16, 16)), augment=flip)
    first, _ = dataset[0]
    (root / "a" / "a_0.png").unlink()  # served from the cache from now on
    again, _ = dataset[0]
    assert torch.equal(first, again) and len(flips) == 2


def test_dataset_without_cache_decodes_every_time(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "d", {"a": 1, "b": 1})
    dataset = ImageDataset(load_samples(root), Preprocess(size=(16, 16)), cache_max_side=0)
    assert not dataset.caches
    dataset[0]
    (root / "a" / "a_0.png").unlink()
    with pytest.raises(DataError):
        dataset[0]
    assert ImageDataset(load_samples(root), Preprocess(size=(16, 16))).caches


def test_dataset_refuses_labels_outside_the_run_classes(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "d", {"a": 1, "c": 1})
    with pytest.raises(DataError, match=r"label\(s\) \['c'\] are not among the classes"):
        ImageDataset(load_samples(root), Preprocess(size=(8, 8)), classes=["a", "b"])
