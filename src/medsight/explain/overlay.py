"""Heat-map overlays: a saliency map drawn over the image it explains, with an optional label.

The colour map is perceptually uniform (``inferno``) and the heat is blended with an opacity
that grows with the heat, so cold regions show the anatomy untouched instead of a blue wash.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medsight.errors import DataError

__all__ = ["COLORMAP", "MAX_ALPHA", "display_image", "overlay", "overlay_volume"]

COLORMAP = "inferno"
#: Opacity of the hottest pixels; 0.6 keeps the anatomy under the hot spot readable.
MAX_ALPHA = 0.6


def _as_rgb_uint8(display: np.ndarray) -> np.ndarray:
    array = np.asarray(display)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) as medsight decodes images
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise DataError(
            f"overlay needs a (H, W) or (H, W, 3) image, got shape {array.shape};"
            " pass the image as decoded (grayscale or RGB)"
        )
    if array.dtype != np.uint8:
        values = np.nan_to_num(array.astype(np.float32))
        if values.max(initial=0.0) > 1.0:  # 0..255 or raw intensities: scale to the range
            lo, hi = float(values.min()), float(values.max())
            values = (values - lo) / max(hi - lo, 1e-12)
        array = (np.clip(values, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return array


def display_image(pixels: np.ndarray, min_side: int = 256) -> np.ndarray:
    """A decoded image ``(C, H, W)`` in [0, 1] → uint8 ``(H', W', 3)``, enlarged (nearest
    neighbour) so its shorter side is at least ``min_side``: small scans stay pixel-true and the
    label written on the overlay stays readable."""
    rgb = _as_rgb_uint8(pixels)
    h, w = rgb.shape[:2]
    factor = max(1, int(np.ceil(min_side / max(1, min(h, w)))))
    if factor == 1:
        return rgb
    return np.asarray(
        Image.fromarray(rgb).resize((w * factor, h * factor), Image.Resampling.NEAREST)
    )


def overlay(display: np.ndarray, heatmap: np.ndarray, label: str | None = None) -> Image.Image:
    """Blend ``heatmap`` (``(h, w)``, values in [0, 1]) over ``display`` and return an RGB image.

    ``display`` is uint8 or float (``(H, W)`` or ``(H, W, 3)``; floats are read as [0, 1], or
    scaled from their range when larger); the heat-map is resized (bilinear) to it. ``label``
    (e.g. ``"malignant 0.93"``) is written in the top-left corner on a dark band.

    Example:
        >>> image = overlay(np.zeros((64, 64)), np.eye(8), label="benign 0.81")
        >>> image.size, image.mode
        ((64, 64), 'RGB')
    """
    from matplotlib import colormaps

    base = _as_rgb_uint8(display)
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32))
    if heat.ndim == 3 and heat.shape[0] == 1:
        heat = heat[0]
    if heat.ndim != 2:
        raise DataError(f"overlay needs a 2-D heat-map, got shape {heat.shape}")
    h, w = base.shape[:2]
    if heat.shape != (h, w):
        heat = np.asarray(Image.fromarray(heat, mode="F").resize((w, h), Image.Resampling.BILINEAR))
    heat = np.clip(heat, 0.0, 1.0)
    colour = colormaps[COLORMAP](heat)[..., :3] * 255.0
    alpha = (MAX_ALPHA * heat)[..., None]
    blended = base.astype(np.float32) * (1.0 - alpha) + colour * alpha
    image = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    if label:
        _write_label(image, str(label))
    return image


def orthogonal_planes(volume: np.ndarray, at: tuple[int, int, int]) -> list[np.ndarray]:
    """The axial, coronal and sagittal planes of an ``(X, Y, Z)`` array through voxel ``at``,
    as displayed (RAS volumes: anterior and superior up, the patient's left on the right)."""
    x, y, z = at
    return [
        np.flipud(volume[:, :, z].T),  # axial: X across, Y up
        np.flipud(volume[:, y, :].T),  # coronal: X across, Z up
        np.flipud(volume[x, :, :].T),  # sagittal: Y across, Z up
    ]


def overlay_volume(
    volume: np.ndarray, heatmap: np.ndarray, label: str | None = None, side: int = 256
) -> Image.Image:
    """A 3-D heat-map over its volume on the three orthogonal planes through the map's
    maximum (axial, coronal, sagittal, left to right), each enlarged to ``side`` pixels.

    ``volume`` is ``(X, Y, Z)`` (or ``(C, X, Y, Z)``, first channel shown) in ``[0, 1]`` on
    the map's grid (the run's preprocessed volume); ``heatmap`` is ``(X, Y, Z)``. ``label`` is
    written on the first plane; each plane is named in its lower-left corner."""
    array = np.asarray(volume, dtype=np.float32)
    if array.ndim == 4:
        array = array[0]
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32))
    if heat.ndim != 3 or array.ndim != 3:
        raise DataError(
            f"overlay_volume needs an (X, Y, Z) volume and map, got {array.shape} and {heat.shape}"
        )
    if heat.shape != array.shape:
        from scipy import ndimage

        heat = ndimage.zoom(heat, [a / h for a, h in zip(array.shape, heat.shape)], order=1)
    at = np.unravel_index(int(np.argmax(heat)), heat.shape)
    tiles = []
    for name, plane, hot in zip(
        ("axial", "coronal", "sagittal"), orthogonal_planes(array, at), orthogonal_planes(heat, at)
    ):
        h, w = plane.shape
        scale = side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        display = np.asarray(
            Image.fromarray((np.clip(plane, 0, 1) * 255).astype(np.uint8)).resize(
                size, Image.Resampling.NEAREST
            )
        )
        tile = overlay(display, hot)
        _write_corner(tile, name)
        tiles.append(tile)
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), side))
    left = 0
    for tile in tiles:
        sheet.paste(tile, (left, (side - tile.height) // 2))
        left += tile.width + 4
    if label:
        _write_label(sheet, str(label))
    return sheet


def _write_corner(image: Image.Image, text: str) -> None:
    size = max(9, min(16, image.height // 18))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(image, "RGBA")
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    y = image.height - (bottom - top) - 6
    draw.rectangle((0, y - 3, right - left + 6, image.height), fill=(0, 0, 0, 150))
    draw.text((3 - left, y - top), text, fill=(255, 255, 255, 255), font=font)


def _write_label(image: Image.Image, text: str) -> None:
    size = max(9, min(22, image.height // 14))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(image, "RGBA")
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, size // 4)
    draw.rectangle((0, 0, right - left + 2 * pad, bottom - top + 2 * pad), fill=(0, 0, 0, 170))
    draw.text((pad - left, pad - top), text, fill=(255, 255, 255, 255), font=font)
