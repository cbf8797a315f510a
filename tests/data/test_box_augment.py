"""Boxes move with the image under detection augmentation (``transforms.box_augmentation``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsight.data.transforms import BoxAugment, box_augmentation
from medsight.errors import ConfigError


def _square_image(x1, y1, x2, y2, size=64) -> torch.Tensor:
    image = torch.zeros(1, size, size)
    image[0, y1:y2, x1:x2] = 1.0
    return image


def _target(boxes, m=3) -> torch.Tensor:
    target = torch.zeros(m, 5)
    target[:, 4] = -1
    for i, box in enumerate(boxes):
        target[i] = torch.tensor(box, dtype=torch.float32)
    return target


def _bright_extent(image: torch.Tensor, size=64) -> np.ndarray:
    """Normalised corners of the pixels above 0.5 (where the square went)."""
    ys, xs = np.nonzero(image[0].numpy() > 0.5)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / size


def test_a_horizontal_flip_mirrors_the_box_exactly():
    from torchvision.transforms import v2

    flip = BoxAugment(v2.RandomHorizontalFlip(p=1.0))
    image = _square_image(8, 16, 24, 40)
    out, target = flip(image, _target([(8 / 64, 16 / 64, 24 / 64, 40 / 64, 1)]))
    assert target[0].tolist() == pytest.approx([40 / 64, 16 / 64, 56 / 64, 40 / 64, 1])
    assert _bright_extent(out) == pytest.approx(target[0, :4].numpy())
    assert target[1:, 4].tolist() == [-1, -1]  # padding stays padding


@pytest.mark.parametrize("seed", range(6))
def test_scale_and_shift_move_the_box_with_the_lesion(seed):
    torch.manual_seed(seed)
    augment = box_augmentation("auto", channels=1, strength=2.0)
    image = _square_image(20, 24, 36, 44)
    out, target = augment(image, _target([(20 / 64, 24 / 64, 36 / 64, 44 / 64, 0)]))
    assert target[0, 4] == 0
    # bilinear edges blur by about a pixel: the box follows the square to within 2 px
    assert _bright_extent(out) == pytest.approx(target[0, :4].numpy(), abs=2 / 64)


def test_xray_preset_never_flips_left_right():
    augment = box_augmentation("xray", channels=1, strength=0.0 + 1e-9)
    for seed in range(20):
        torch.manual_seed(seed)
        _, target = augment(
            _square_image(4, 4, 12, 12), _target([(4 / 64, 4 / 64, 12 / 64, 12 / 64, 0)])
        )
        assert target[0, 0] < 0.3  # still on the left: no mirror image of the lesion


def test_a_box_pushed_out_of_the_image_is_dropped_and_the_rows_repadded():
    from torchvision.transforms import v2

    shift = BoxAugment(v2.RandomAffine(degrees=0, translate=(0.5, 0.0)))
    torch.manual_seed(0)
    dropped = 0
    for _ in range(30):
        _, target = shift(
            _square_image(0, 20, 6, 30),
            _target([(0, 20 / 64, 6 / 64, 30 / 64, 0), (0.4, 0.4, 0.6, 0.6, 1)]),
        )
        assert target.shape == (3, 5)
        real = target[:, 4] >= 0
        assert bool(real[: int(real.sum())].all())  # real rows first, then padding
        assert ((target[real, :4] >= 0) & (target[real, :4] <= 1)).all()
        dropped += int(real.sum()) < 2
    assert dropped > 0


def test_bad_presets_are_refused_by_name():
    with pytest.raises(ConfigError, match="augment must be one of"):
        box_augmentation("sideways")
    assert box_augmentation("none") is None
