"""Deterministic preprocessing: a decoded image → the model's input tensor, recorded as data.

:class:`Preprocess` is what ``preprocess.json`` holds in a run directory. It is a small
pipeline in MONAI's spirit — convert channels, resize, normalise — whose every step is named by
a field, so prediction rebuilds exactly the tensor training saw from the file alone.
Random augmentation is not part of it: it belongs to training and is never replayed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medsight.data.imaging import DecodedImage
from medsight.errors import ConfigError, ImageDecodeError

# ITU-R BT.601 luma: how colour photographs of grayscale films are usually turned back to gray.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Preprocess:
    """Turn a :class:`DecodedImage` (float32 ``(C, H, W)`` in ``[0, 1]``) into a model input.

    ``channels`` is what the model takes: grayscale images are replicated to 3 channels for
    backbones pretrained on colour (``gray_to_rgb = "replicate"``), colour images are reduced to
    luma for 1-channel models. ``size`` is ``(height, width)``; images are resized with
    antialiased bilinear interpolation (aspect ratio not kept: medical sets are near-square).
    ``window`` is a DICOM/NIfTI ``(centre, width)`` applied at decoding. ``volume_slice`` is
    ``(axis, index)`` (``index`` None: the middle slice) when the run was trained on slices of
    3-D volumes: prediction takes the same slice of a volume. Without it a 3-D volume is refused
    (:meth:`prepare`): its middle slice is not what the run learnt from.

    >>> prep = Preprocess(size=(64, 64), channels=1, mean=(0.5,), std=(0.5,))
    >>> prep(decode("chest.png")).shape       # doctest: +SKIP
    (1, 64, 64)
    """

    size: tuple[int, int] = (64, 64)
    channels: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    gray_to_rgb: str = "replicate"
    window: tuple[float, float] | None = None
    volume_slice: tuple[int, int | None] | None = None
    version: int = field(default=1)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ConfigError(f"size must be (height, width) in pixels, got {self.size}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                raise ConfigError(
                    f"{name} needs 1 or {self.channels} values for {self.channels} channels, "
                    f"got {len(values)}"
                )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std values must be positive, got {self.std}")
        if self.gray_to_rgb != "replicate":
            raise ConfigError(f"gray_to_rgb must be 'replicate', got {self.gray_to_rgb!r}")

    def __call__(self, image: DecodedImage | np.ndarray) -> np.ndarray:
        """The normalised float32 ``(channels, *size)`` array for one image."""
        return self.normalize(torch.from_numpy(self.prepare(image))).numpy()

    def prepare(self, image: DecodedImage | np.ndarray) -> np.ndarray:
        """Channels converted and resized, values still in ``[0, 1]`` (what augmentation sees)."""
        if isinstance(image, DecodedImage):
            self.check_volume_slice(image)
        pixels = image.pixels if isinstance(image, DecodedImage) else np.asarray(image)
        pixels = self.convert_channels(pixels)
        tensor = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None]
        if tuple(tensor.shape[-2:]) != tuple(self.size):
            tensor = F.interpolate(
                tensor, size=tuple(self.size), mode="bilinear", align_corners=False, antialias=True
            )
        return tensor[0].numpy()

    def decode_options(self) -> dict:
        """How this run's files are decoded (:func:`~medsight.data.imaging.decode` keywords):
        its window and the slice it takes of a volume, the same in training and at prediction."""
        return {"window": self.window, "nifti_slice": self.volume_slice}

    def check_volume_slice(self, image: DecodedImage) -> None:
        """Refuse a slice a reader took on its own from a 3-D volume (no slice addressed) when
        the run was trained on 2-D images: say so in one line, with the ways out."""
        volume = image.meta.get("sliced_from")
        if volume is None or self.volume_slice is not None:
            return
        raise ImageDecodeError(
            image.source,
            f"is a 3-D volume ({'×'.join(map(str, volume))} voxels), but this run was trained on "
            "2-D images: give it a 2-D image, or train a 3-D run on volumes (medsight train "
            "reads NIfTI files and DICOM series whole)",
        )

    def normalize(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel, for a ``(C, H, W)`` or ``(B, C, H, W)`` tensor."""
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=tensor.dtype).view(shape)
        std = torch.tensor(self.std, dtype=tensor.dtype).view(shape)
        return (tensor - mean) / std

    def convert_channels(self, pixels: np.ndarray) -> np.ndarray:
        """Match the model's channel count: replicate gray, or take the luma of colour."""
        have = pixels.shape[0]
        if have == self.channels:
            return pixels
        if have == 1 and self.channels == 3:
            return np.repeat(pixels, 3, axis=0)
        if have == 3 and self.channels == 1:
            return np.tensordot(_LUMA, pixels, axes=1)[None].astype(np.float32)
        raise ConfigError(f"cannot turn a {have}-channel image into {self.channels} channels")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"preprocess: unknown field(s) {unknown}; is the run newer?")
        for key in ("size", "mean", "std", "window", "volume_slice"):
            if known.get(key) is not None:
                known[key] = tuple(known[key])
        return cls(**known)

    def save(self, path: str | Path) -> None:
        """Write ``preprocess.json``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Preprocess:
        """Read ``preprocess.json``."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def load_preprocess(source: str | Path | dict):
    """A run's ``preprocess.json`` (a path or its dict) as :class:`Preprocess` (2-D) or
    :class:`~medsight.data.volumes.VolumePreprocess` (``"dims": 3``)."""
    data = source if isinstance(source, dict) else json.loads(Path(source).read_text())
    if data.get("dims", 2) == 3:
        from medsight.data.volumes import VolumePreprocess

        return VolumePreprocess.from_dict(data)
    return Preprocess.from_dict({k: v for k, v in data.items() if k != "dims"})


#: Augmentation presets by modality. Chest X-rays are never flipped left-right by default
#: (laterality carries meaning: heart on the left); dermatoscopy and histology have no
#: canonical orientation, so every flip and right-angle rotation is valid there.
AUGMENT_PRESETS = ("auto", "xray", "ct", "mri", "derm", "histo", "none")


def augmentation(
    preset: str, channels: int = 1, strength: float = 1.0
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A random transform for ``(C, H, W)`` tensors in ``[0, 1]`` (before normalisation).

    ``auto`` is the light, orientation-preserving affine jitter that suits any modality.
    ``strength`` scales the continuous jitter (rotation, shift, zoom, colour): 0 turns
    augmentation off, 2 doubles it; flips and right-angle turns are kept whenever it is > 0.
    """
    from torchvision.transforms import v2

    if not _augments(preset, strength):
        return None
    s = float(strength)
    light = v2.RandomAffine(
        degrees=10 * s, translate=(0.05 * s, 0.05 * s), scale=(1 - 0.08 * s, 1 + 0.08 * s)
    )
    steps: list = []
    if preset in ("auto", "xray"):
        steps = [light]
    elif preset in ("ct", "mri"):
        steps = [v2.RandomHorizontalFlip(), light]
    else:  # derm, histo
        steps = [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            _RandomRot90(),
            v2.RandomAffine(degrees=15 * s, scale=(1 - 0.1 * s, 1 + 0.1 * s)),
        ]
        if channels == 3:
            jitter = min(0.2 * s, 0.9)
            steps.append(
                v2.ColorJitter(
                    brightness=jitter, contrast=jitter, saturation=jitter, hue=min(0.02 * s, 0.5)
                )
            )
    steps.append(_Clamp01())
    return v2.Compose(steps)


def _augments(preset: str, strength: float) -> bool:
    """Whether ``preset`` at ``strength`` augments at all; refuses unknown presets and
    strengths outside 0–3."""
    if preset not in AUGMENT_PRESETS:
        raise ConfigError(f"augment must be one of {', '.join(AUGMENT_PRESETS)}, got {preset!r}")
    if not 0 <= strength <= 3:
        raise ConfigError(f"augmentation strength must be between 0 and 3, got {strength}")
    return preset != "none" and strength != 0


def volume_augmentation(
    preset: str, strength: float = 1.0
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A random MONAI transform for ``(C, X, Y, Z)`` volumes in ``[0, 1]`` (before
    normalisation), never replayed at prediction.

    Every preset gets a light random affine (rotation up to 10° × ``strength`` about each axis,
    scale ± 8 %, shift ± 5 %) and intensity jitter (scale and shift ± 10 %); ``ct`` and ``mri``
    flip left-right (axis X in RAS) as the 2-D presets do, ``auto`` flips on no axis
    (laterality can matter), ``derm``/``histo`` (no canonical orientation) flip on every axis.
    """
    if not _augments(preset, strength):
        return None
    import monai.transforms as mt

    s = float(strength)
    steps: list = []
    if preset in ("ct", "mri"):
        steps.append(mt.RandFlip(prob=0.5, spatial_axis=0))
    elif preset in ("derm", "histo"):
        steps += [mt.RandFlip(prob=0.5, spatial_axis=a) for a in (0, 1, 2)]
    angle = np.deg2rad(10 * s)
    steps.append(
        mt.RandAffine(
            prob=0.8,
            rotate_range=(angle, angle, angle),
            scale_range=(0.08 * s,) * 3,
            translate_range=None,
            padding_mode="zeros",
            mode="bilinear",
        )
    )
    steps.append(mt.RandScaleIntensity(factors=0.1 * s, prob=0.5))
    steps.append(mt.RandShiftIntensity(offsets=0.1 * s, prob=0.5))
    return _VolumeAugment(mt.Compose(steps), shift=0.05 * s)


class _VolumeAugment:
    """MONAI's random transforms on a plain tensor, seeded from torch's generator (so the
    trainer's per-epoch seeds make them repeatable), clamped to ``[0, 1]``."""

    def __init__(self, transform, shift: float):
        self.transform = transform
        self.shift = shift

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self.transform.set_random_state(seed=seed)
        out = torch.as_tensor(self.transform(x))
        if self.shift > 0:  # a whole-voxel shift: cheap, and keeps the volume sharp
            rng = np.random.default_rng(seed)
            moves = [int(round(rng.uniform(-self.shift, self.shift) * n)) for n in out.shape[1:]]
            out = torch.roll(out, shifts=moves, dims=(1, 2, 3))
        return out.float().clamp_(0.0, 1.0)


class BoxAugment:
    """Augmentation that moves a detection target's boxes with the image: called as
    ``augment(image, target)`` on a ``(C, H, W)`` tensor in ``[0, 1]`` and its ``(M, 5)``
    normalised ``[x1, y1, x2, y2, class]`` rows (class −1: padding); returns both, boxes pushed
    out of the image dropped (the rows stay ``M``, re-padded)."""

    #: Datasets hand this augmentation the target too.
    takes_targets = True

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image: torch.Tensor, target: torch.Tensor):
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        height, width = image.shape[-2:]
        real = target[:, 4] >= 0
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = tv_tensors.BoundingBoxes(
            target[real, :4] * scale, format="XYXY", canvas_size=(height, width)
        )
        labels = target[real, 4]
        image, boxes, labels = self.transform(tv_tensors.Image(image), boxes, labels)
        kept = v2.SanitizeBoundingBoxes(min_size=1.0)({"boxes": boxes, "labels": labels})
        boxes, labels = kept["boxes"], kept["labels"]  # dropped together
        out = torch.zeros_like(target)
        out[:, 4] = -1
        out[: len(boxes), :4] = boxes.as_subclass(torch.Tensor) / scale
        out[: len(boxes), 4] = labels
        return image.as_subclass(torch.Tensor).clamp_(0.0, 1.0), out


def box_augmentation(preset: str, channels: int = 1, strength: float = 1.0) -> BoxAugment | None:
    """:func:`augmentation`'s presets for detection: the same flip rules per modality (X-rays
    never flipped left-right), scale and shift with the boxes moved alike, no free rotation
    (a rotated box's enclosing box is looser than the lesion); right-angle turns where every
    orientation is valid (dermatoscopy, histology)."""
    from torchvision.transforms import v2

    if not _augments(preset, strength):
        return None
    s = float(strength)
    affine = v2.RandomAffine(
        degrees=0, translate=(0.08 * s, 0.08 * s), scale=(1 - 0.15 * s, 1 + 0.15 * s)
    )
    steps: list = []
    if preset in ("ct", "mri", "derm", "histo"):
        steps.append(v2.RandomHorizontalFlip())
    if preset in ("derm", "histo"):
        steps.append(v2.RandomVerticalFlip())
        steps.append(v2.RandomChoice([v2.RandomRotation((a, a)) for a in (0, 90, 180, 270)]))
    steps.append(affine)
    if preset in ("derm", "histo") and channels == 3:
        jitter = min(0.2 * s, 0.9)
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    return BoxAugment(v2.Compose(steps))


class _RandomRot90(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rot90(x, int(torch.randint(0, 4, ()).item()), dims=(-2, -1))


class _Clamp01(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_(0.0, 1.0)
