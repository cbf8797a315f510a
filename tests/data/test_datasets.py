"""The torch Dataset: tensors, class indices, labels, caching (preprocessing: test_transforms)."""

from __future__ import annotations

import pytest
import torch

from medsight.data.datasets import ImageDataset
from medsight.data.sources import load_samples
from medsight.data.transforms import Preprocess
from medsight.errors import DataError


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
