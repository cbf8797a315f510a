"""Procedural "phantom" slices (body, organs, benign or malignant lesions) with lesion masks.

The embedded default dataset: it needs no download, is deterministic for a seed, has patients,
several slices per patient and per-patient metadata (sex, age, site) for subgroup analysis.

:func:`write_multilabel_phantoms` draws the multi-label variant: the same anatomy with none,
one or several of three findings that look different (a bright smooth ``nodule``, a dark
``cyst`` with a bright wall, a cluster of tiny very bright ``calcification`` specks), each with
its own mask, and a NIH-style manifest (``Finding Labels``).

:func:`write_detection_phantoms` draws the detection variant: the same anatomy with none, one
or several (up to three) separate lesions per slice, each a bright smooth ``nodule`` or a dark
``cyst`` with a bright wall, at least about 6 px across at 64 px, and a box CSV (one row per
box, tight on the lesion's mask) that :func:`medsight.data.sources.load_samples` reads as a
detection table.

:func:`write_phantom_volumes` draws the 3-D variant: NIfTI volumes of a soft ellipsoid body and
organ with noise, half of them with one bright spherical lesion in the organ, a lesion mask
volume per lesion volume, and the same manifest columns (read as a 3-D table).
"""

from __future__ import annotations

import csv
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from medsight.errors import ConfigError

CLASSES: tuple[str, ...] = ("normal", "benign", "malignant")

MANIFEST_COLUMNS: tuple[str, ...] = ("path", "label", "patient_id", "mask", "sex", "age", "site")

#: The classes of the 3-D phantoms: no lesion, or one spherical lesion in the organ.
VOLUME_CLASSES: tuple[str, ...] = ("normal", "lesion")

#: The findings of the multi-label phantoms, in their order.
FINDINGS: tuple[str, ...] = ("nodule", "cyst", "calcification")
#: The multi-label manifest: NIH ChestX-ray14's findings column and one mask per finding.
MULTILABEL_COLUMNS: tuple[str, ...] = (
    "path",
    "patient_id",
    "Finding Labels",
    *(f"{f}_mask_path" for f in FINDINGS),
    "sex",
    "age",
    "site",
)
#: The box classes of the detection phantoms, in their order.
DETECT_CLASSES: tuple[str, ...] = ("nodule", "cyst")
#: The detection manifest: one row per box (a slice without lesions has one row, no corners).
DETECT_COLUMNS: tuple[str, ...] = (
    "path",
    "x1",
    "y1",
    "x2",
    "y2",
    "label",
    "patient_id",
    "split",
    "mask",
    "sex",
    "age",
    "site",
)
# Lesions per slice: 0, 1, 2 or 3, with these odds.
_LESION_COUNTS = (0.25, 0.35, 0.25, 0.15)
# Lesion radius in image units ([-1, 1]); with an aspect of 0.8 or more the narrowest lesion
# is 0.12 * 0.8 * 64 ≈ 6 px across at 64 px.
_DETECT_RADIUS = (0.12, 0.18)
# Image-unit gap kept between lesions (≈ 3 px at 64 px), so each mask region is one lesion.
_DETECT_GAP = 0.1
_DETECT_SPLITS = (("train", 0.7), ("val", 0.15), ("test", 0.15))
_IMAGES = "images"
# How often a finding a patient has shows in one of its slices (a small one can be missed).
_SHOWN_IN_SLICE = 0.9

# Share of images per class, in the order of CLASSES.
_CLASS_SHARE = (0.4, 0.3, 0.3)
_IMAGES_PER_PATIENT = (2, 6)
_MIN_N = 30
_SIZE_RANGE = (32, 512)

# Scanner differences per site: noise level, contrast gain and blur (in pixels at size 64).
_SITES: dict[str, tuple[float, float, float]] = {
    "site_a": (0.035, 1.00, 0.70),
    "site_b": (0.045, 0.90, 0.85),
    "site_c": (0.055, 1.08, 0.60),
}
_SITE_SHARE = (0.45, 0.35, 0.20)

_BACKGROUND = 0.04
_RIM = 0.78


@dataclass(frozen=True, eq=False)
class _Lesion:
    """A patient's lesion shape; slices jitter it. Lengths are in image units ([-1, 1])."""

    r: float  # position: distance from the body centre (fraction of the room there) ...
    phi: float  # ... and direction
    radius: float
    aspect: float  # benign: minor/major axis ratio
    angle: float
    contrast: float  # intensity above soft tissue (like a contrast-enhancing lesion)
    lobes: np.ndarray  # malignant: amplitudes of boundary harmonics 2..5
    lobe_phase: np.ndarray
    spike_angle: np.ndarray  # malignant: spicule directions ...
    spike_len: np.ndarray  # ... and lengths (in radii)
    necrosis: float  # malignant: darker centre, 0 for none


@dataclass(frozen=True, eq=False)
class PatientAnatomy:
    """One synthetic patient: anatomy, the lesion they would show, and their scanner's site.

    Coordinates are normalised to [-1, 1] across the image, so the same patient can be drawn at
    any size. Organ, vessel and lesion positions are relative to the body ellipse (unit disk).
    ``lesion`` is the lesion the patient shows, drawn only in slices labelled benign/malignant.
    """

    body: tuple[float, float, float, float, float]  # centre y, centre x, semi-axis y, x, angle
    organs: np.ndarray  # (k, 6): v, u, semi-axis y, x (body-relative), angle, intensity
    vessels: np.ndarray  # (m, 4): v, u, radius (image units), intensity
    tissue: float  # soft-tissue intensity
    lesion: _Lesion
    site: str

    @classmethod
    def sample(cls, rng: np.random.Generator, site: str | None = None) -> PatientAnatomy:
        """Draw a new patient from ``rng``; ``site`` is drawn too unless given.

        Example:
            >>> rng = np.random.default_rng(0)
            >>> patient = PatientAnatomy.sample(rng, site="site_a")
            >>> image, mask = make_phantom(rng, 64, "benign", patient)
        """
        sites = tuple(_SITES)
        if site is None:
            site = sites[int(rng.choice(len(sites), p=_SITE_SHARE))]
        elif site not in _SITES:
            raise ConfigError(f"site={site!r} is not a phantom site; use one of {sites}")
        body = (
            rng.normal(0.0, 0.03),
            rng.normal(0.0, 0.03),
            rng.uniform(0.58, 0.74),
            rng.uniform(0.72, 0.88),
            rng.normal(0.0, 0.08),
        )
        organs = []
        # Two dark "lungs" left and right, a bright "spine" at the back, a few soft organs.
        for side in (-1.0, 1.0):
            organs.append(
                (
                    rng.uniform(-0.25, -0.05),
                    side * rng.uniform(0.38, 0.5),
                    rng.uniform(0.35, 0.5),
                    rng.uniform(0.22, 0.3),
                    rng.normal(0.0, 0.15),
                    rng.uniform(0.10, 0.18),
                )
            )
        organs.append(
            (rng.uniform(0.62, 0.72), rng.normal(0, 0.03), 0.13, 0.11, 0.0, rng.uniform(0.8, 0.9))
        )
        for _ in range(int(rng.integers(2, 5))):
            r = math.sqrt(rng.uniform(0.0, 0.3))
            phi = rng.uniform(0, 2 * math.pi)
            organs.append(
                (
                    r * math.sin(phi) + 0.1,
                    r * math.cos(phi) * 0.6,
                    rng.uniform(0.12, 0.28),
                    rng.uniform(0.12, 0.3),
                    rng.uniform(0, math.pi),
                    rng.uniform(0.28, 0.52),
                )
            )
        n_vessels = int(rng.integers(2, 6))
        r = np.sqrt(rng.uniform(0.0, 0.55, n_vessels))
        phi = rng.uniform(0, 2 * np.pi, n_vessels)
        vessels = np.stack(
            [
                r * np.sin(phi),
                r * np.cos(phi),
                rng.uniform(0.02, 0.035, n_vessels),
                rng.uniform(0.5, 0.62, n_vessels),
            ],
            axis=1,
        )
        n_spikes = int(rng.integers(5, 11))
        lesion = _Lesion(
            r=math.sqrt(rng.uniform(0.0, 0.8)),
            phi=rng.uniform(0, 2 * math.pi),
            radius=rng.uniform(0.15, 0.22),
            aspect=rng.uniform(0.7, 1.0),
            angle=rng.uniform(0, math.pi),
            contrast=rng.uniform(0.25, 0.37),
            lobes=rng.uniform(0.06, 0.18, 4),
            lobe_phase=rng.uniform(0, 2 * np.pi, 4),
            spike_angle=np.sort(rng.uniform(0, 2 * np.pi, n_spikes)),
            spike_len=rng.uniform(0.7, 1.4, n_spikes),
            necrosis=rng.uniform(0.1, 0.35) if rng.random() < 0.5 else 0.0,
        )
        organs_arr = np.asarray(organs, dtype=np.float64)
        return cls(body, organs_arr, vessels, rng.uniform(0.38, 0.46), lesion, site)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    return c[:, None], c[None, :]


def _ellipse_rho(yy, xx, cy, cx, ay, ax, angle) -> np.ndarray:
    """Normalised elliptic radius: < 1 inside the ellipse."""
    dy, dx = yy - cy, xx - cx
    cos, sin = math.cos(angle), math.sin(angle)
    v = -sin * dx + cos * dy
    u = cos * dx + sin * dy
    return np.sqrt((v / ay) ** 2 + (u / ax) ** 2)


def _to_image(body, v: float, u: float) -> tuple[float, float]:
    """Body-relative (v, u) in the unit disk → image coordinates (y, x)."""
    cy, cx, ay, ax, angle = body
    vy, ux = v * ay, u * ax
    cos, sin = math.cos(angle), math.sin(angle)
    return cy + cos * vy + sin * ux, cx - sin * vy + cos * ux


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return field / (field.std() + 1e-9)


def _lesion(
    rng: np.random.Generator,
    yy: np.ndarray,
    xx: np.ndarray,
    patient: PatientAnatomy,
    body: tuple[float, float, float, float, float],
    label: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One slice's lesion: opacity (0..1), intensity and mask (opacity above one half)."""
    les = patient.lesion
    size = yy.shape[0]
    radius = les.radius * rng.uniform(0.8, 1.15)
    angle = les.angle + rng.normal(0, 0.1)
    lobes = les.lobes * rng.uniform(0.85, 1.15, les.lobes.shape)
    spike_angle = les.spike_angle + rng.normal(0, 0.08, les.spike_angle.shape)
    spike_len = les.spike_len * rng.uniform(0.8, 1.2, les.spike_len.shape)
    if label == "malignant":  # a smaller core, so spicules do not make the lesion much larger
        radius *= 0.8
    # Keep the lesion inside the body (minus the rim): shrink the disk it is placed in. The same
    # margin for both classes, so that position says nothing about the class.
    reach = 1.8 * les.radius
    room = max(0.0, 1.0 - (reach + 0.06) / min(body[2], body[3]))
    r = min(les.r + rng.normal(0, 0.04), 1.0)
    phi = les.phi + rng.normal(0, 0.08)
    ly, lx = _to_image(body, room * abs(r) * math.sin(phi), room * abs(r) * math.cos(phi))

    dy, dx = yy - ly, xx - lx
    theta = np.arctan2(dy, dx) - angle
    rho = np.sqrt(dy**2 + dx**2)
    if label == "benign":
        # Smooth oval, sharp margin, homogeneous.
        aspect = les.aspect
        edge = (
            radius
            * math.sqrt(aspect)
            / np.sqrt(np.cos(theta) ** 2 * aspect**2 + np.sin(theta) ** 2)
        )
        opacity = 1.0 / (1.0 + np.exp(-(edge - rho) / 0.006))
        texture = 0.02 * _smooth_noise(rng, size, 1.0)
        core = np.ones_like(rho)
    else:
        # Lobulated core with radial spicules, ill-defined margin, heterogeneous interior.
        k = np.arange(2, 6)[:, None, None]
        phase = les.lobe_phase[:, None, None]
        edge = radius * (1.0 + (lobes[:, None, None] * np.cos(k * theta + phase)).sum(0))
        diff = np.mod(theta[None] + angle - spike_angle[:, None, None] + np.pi, 2 * np.pi) - np.pi
        width = 0.22
        spikes = spike_len[:, None, None] * np.clip(1.0 - np.abs(diff) / width, 0.0, None)
        spiky_edge = edge + radius * spikes.max(0)
        opacity = 1.0 / (1.0 + np.exp(-(spiky_edge - rho) / 0.012))
        # Spicules fade towards their tips.
        fade = np.clip(1.0 - (rho - edge) / (radius * 2.5), 0.5, 1.0)
        opacity = opacity * np.where(rho > edge, fade, 1.0)
        texture = 0.12 * _smooth_noise(rng, size, 0.8 * size / 64)
        core = 1.0 - les.necrosis * np.exp(-((rho / (0.5 * radius)) ** 2))
    contrast = les.contrast * rng.uniform(0.85, 1.15)
    value = patient.tissue + contrast * core + texture
    return opacity, value, opacity > 0.5


def make_phantom(
    rng: np.random.Generator, size: int, label: str, patient: PatientAnatomy | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one phantom slice and its lesion mask.

    ``patient`` fixes the anatomy (a new one is drawn from ``rng`` when ``None``); each call
    jitters it slightly, like neighbouring slices. Returns ``(image, mask)``: an 8-bit ``size``×
    ``size`` grayscale image and a 0/255 mask of the lesion (all zero for ``"normal"``).

    Example:
        >>> image, mask = make_phantom(np.random.default_rng(0), 64, "malignant")
        >>> image.shape, image.dtype, int(mask.max())
        ((64, 64), dtype('uint8'), 255)
    """
    _check_size(size)
    if label not in CLASSES:
        raise ConfigError(f"label={label!r} is not a phantom class; use one of {CLASSES}")
    if patient is None:
        patient = PatientAnatomy.sample(rng)
    img, body, rho_body, inside, rim_width = _anatomy(rng, size, patient)
    yy, xx = _grid(size)
    mask = np.zeros((size, size), dtype=bool)
    if label != "normal":
        opacity, value, mask = _lesion(rng, yy, xx, patient, body, label)
        interior = rho_body < 1.0 - rim_width
        opacity = opacity * interior
        mask &= interior
        img = img * (1.0 - opacity) + value * opacity
    return _finish(rng, img, patient, rho_body, inside, rim_width), mask.astype(np.uint8) * 255


def _anatomy(
    rng: np.random.Generator, size: int, patient: PatientAnatomy
) -> tuple[np.ndarray, tuple, np.ndarray, np.ndarray, float]:
    """One slice of ``patient`` before any lesion: (intensities, the slice's body ellipse, the
    elliptic radius of the body, inside-body mask, rim width in body radii)."""
    yy, xx = _grid(size)
    cy, cx, ay, ax, angle = patient.body
    body = (
        cy + rng.normal(0, 0.015),
        cx + rng.normal(0, 0.015),
        ay * rng.uniform(0.97, 1.03),
        ax * rng.uniform(0.97, 1.03),
        angle + rng.normal(0, 0.02),
    )
    rho_body = _ellipse_rho(yy, xx, *body)
    inside = rho_body < 1.0
    rim_width = 0.045 / min(body[2], body[3])
    img = np.full((size, size), _BACKGROUND)
    img[inside] = patient.tissue
    for v, u, oy, ox, o_angle, value in patient.organs:
        oy_, ox_ = _to_image(body, v + rng.normal(0, 0.02), u + rng.normal(0, 0.02))
        rho = _ellipse_rho(
            yy,
            xx,
            oy_,
            ox_,
            oy * body[2] * rng.uniform(0.95, 1.05),
            ox * body[3] * rng.uniform(0.95, 1.05),
            o_angle + body[4],
        )
        img[(rho < 1.0) & inside] = value + rng.normal(0, 0.015)
    # Low-frequency tissue texture everywhere inside the body.
    img += inside * 0.035 * _smooth_noise(rng, size, 2.0 * size / 64)
    for v, u, radius, value in patient.vessels:
        vy, vx = _to_image(body, v + rng.normal(0, 0.03), u + rng.normal(0, 0.03))
        rho = np.sqrt((yy - vy) ** 2 + (xx - vx) ** 2) / (radius * rng.uniform(0.85, 1.15))
        img[(rho < 1.0) & inside] = value
    return img, body, rho_body, inside, rim_width


def _finish(
    rng: np.random.Generator,
    img: np.ndarray,
    patient: PatientAnatomy,
    rho_body: np.ndarray,
    inside: np.ndarray,
    rim_width: float,
) -> np.ndarray:
    """The body's rim, then the patient's scanner (blur, noise, gain) → an 8-bit image."""
    size = img.shape[0]
    img[(rho_body >= 1.0 - rim_width) & inside] = _RIM
    noise, gain, blur = _SITES[patient.site]
    img = ndimage.gaussian_filter(img, blur * size / 64 * rng.uniform(0.85, 1.15), mode="nearest")
    img = img + rng.normal(0.0, noise * rng.uniform(0.85, 1.15), img.shape)
    img = (img - _BACKGROUND) * gain * rng.uniform(0.88, 1.12) + _BACKGROUND
    img = img + rng.uniform(-0.04, 0.04)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _check_size(size: int) -> None:
    lo, hi = _SIZE_RANGE
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not lo <= size <= hi:
        raise ConfigError(f"size={size!r} is out of range; use an integer from {lo} to {hi}")


def _check_out(out: Path) -> None:
    """Refuse to write into anything but an empty folder or a previous phantom dataset (of
    either kind)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"out={str(out)!r} is a file; give a folder for the phantom dataset")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    manifest = out / "manifest.csv"
    header = ""
    if manifest.is_file():
        with manifest.open(newline="") as f:
            header = f.readline().strip()
    headers = {",".join(c) for c in (MANIFEST_COLUMNS, MULTILABEL_COLUMNS, DETECT_COLUMNS)}
    if header not in headers or not entries <= {
        *CLASSES,
        *VOLUME_CLASSES,
        _IMAGES,
        "masks",
        "manifest.csv",
    }:
        raise ConfigError(
            f"out={str(out)!r} is a non-empty folder that is not a phantom dataset; "
            "give an empty or new folder"
        )


def _clear(out: Path) -> None:
    """Remove a previous phantom dataset's folders (either kind), so no stale file is left."""
    for name in (*CLASSES, *VOLUME_CLASSES, _IMAGES, "masks"):
        if (out / name).exists():
            shutil.rmtree(out / name)


def _check_arguments(n, size: int, seed) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < _MIN_N:
        raise ConfigError(
            f"n={n!r} is not allowed; use an integer of at least {_MIN_N} "
            "(enough images for three classes and train/val/test splits)"
        )
    _check_size(size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r} is not allowed; use a non-negative integer")


def _patient_sizes(rng: np.random.Generator, n: int) -> list[int]:
    lo, hi = _IMAGES_PER_PATIENT
    sizes, remaining = [], n
    while remaining > 0:
        k = min(int(rng.integers(lo, hi + 1)), remaining)
        if remaining - k == 1:  # never leave a single-image patient behind
            k = k - 1 if k > lo else k + 1
        sizes.append(k)
        remaining -= k
    return sizes


def _patient_labels(rng: np.random.Generator, sizes: list[int], n: int) -> list[str]:
    """One class per patient, keeping image counts near the target shares."""
    target = np.asarray(_CLASS_SHARE) * n
    count = np.zeros(len(CLASSES))
    labels = []
    for k in sizes:
        deficit = target - count + rng.uniform(0.0, 1.5, len(CLASSES))
        c = int(np.argmax(deficit))
        count[c] += k
        labels.append(CLASSES[c])
    return labels


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG")


def _write_manifest(
    path: Path, rows: list[tuple], columns: tuple[str, ...] = MANIFEST_COLUMNS
) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)


def write_phantom_dataset(
    out: str | Path,
    n: int = 1200,
    size: int = 64,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``n`` phantom images, their lesion masks and ``manifest.csv`` under ``out``.

    Layout: ``<class>/<patient>_<slice>.png``, ``masks/<class>/<same name>.png`` and
    ``manifest.csv`` with columns ``path,label,patient_id,mask,sex,age,site`` (paths relative
    to ``out``). The same ``(n, size, seed)`` gives byte-identical files. A previous phantom
    dataset in ``out`` is replaced; any other non-empty folder is refused. ``progress(k)`` is
    called after each patient with the number of images just written.

    Example:
        >>> manifest = write_phantom_dataset("phantom", n=300, size=64, seed=0)
    """
    _check_arguments(n, size, seed)
    out = Path(out)
    _check_out(out)
    _clear(out)
    for label in CLASSES:
        (out / "masks" / label).mkdir(parents=True, exist_ok=True)
        (out / label).mkdir(exist_ok=True)
    manifest = out / "manifest.csv"
    # The header first: an interrupted run still leaves a folder recognised as a phantom dataset.
    _write_manifest(manifest, [])

    rng = np.random.default_rng(seed)
    sizes = _patient_sizes(rng, int(n))
    labels = _patient_labels(rng, sizes, int(n))
    order = rng.permutation(len(sizes))
    rows = []
    for number, i in enumerate(order, start=1):
        label, k = labels[i], sizes[i]
        patient_id = f"P{number:04d}"
        patient = PatientAnatomy.sample(rng)
        sex = "F" if rng.random() < 0.5 else "M"
        age = int(np.clip(np.rint(rng.normal(56, 15)), 20, 90))
        for s in range(1, k + 1):
            image, mask = make_phantom(rng, size, label, patient)
            name = f"{patient_id}_{s:02d}.png"
            _save_png(image, out / label / name)
            _save_png(mask, out / "masks" / label / name)
            row = (f"{label}/{name}", label, patient_id, f"masks/{label}/{name}", sex, age)
            rows.append((*row, patient.site))
        if progress is not None:
            progress(k)
    _write_manifest(manifest, rows)
    return manifest


# --------------------------------------------------------------------------- multi-label


@dataclass(frozen=True, eq=False)
class _Findings:
    """Where one patient's cyst and calcifications are and what they look like; the nodule is
    the patient's benign lesion (:class:`_Lesion`). Each finding sits a third of a turn from the
    others, so they rarely overlap."""

    cyst: tuple[float, float, float, float]  # r, phi, radius, wall width
    calcification: tuple[float, float, np.ndarray]  # r, phi, specks (m, 3): dy, dx, radius


def _sample_findings(rng: np.random.Generator, patient: PatientAnatomy) -> _Findings:
    turn = 2 * math.pi / 3
    cyst = (
        math.sqrt(rng.uniform(0.0, 0.8)),
        patient.lesion.phi + turn + rng.normal(0, 0.3),
        rng.uniform(0.13, 0.17),
        rng.uniform(0.035, 0.045),
    )
    m = int(rng.integers(4, 8))
    spread = rng.uniform(0.08, 0.12)
    specks = np.column_stack(
        [rng.normal(0, spread / 2, (m, 2)).clip(-spread, spread), rng.uniform(0.03, 0.045, m)]
    )
    calcification = (
        math.sqrt(rng.uniform(0.0, 0.8)),
        patient.lesion.phi + 2 * turn + rng.normal(0, 0.3),
        specks,
    )
    return _Findings(cyst, calcification)


def _place(rng, body, r: float, phi: float, reach: float) -> tuple[float, float]:
    """A slice's jittered centre for a finding at (r, phi) in the body, kept ``reach`` inside
    (as :func:`_lesion` places its lesion)."""
    room = max(0.0, 1.0 - (reach + 0.06) / min(body[2], body[3]))
    r = min(abs(r + rng.normal(0, 0.04)), 1.0)
    phi = phi + rng.normal(0, 0.08)
    return _to_image(body, room * r * math.sin(phi), room * r * math.cos(phi))


def _cyst(
    rng, yy, xx, body, tissue: float, spec: tuple
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A round, dark (fluid) cyst with a thin bright wall: opacity, intensity, mask."""
    r, phi, radius, wall = spec
    radius *= rng.uniform(0.9, 1.1)
    cy, cx = _place(rng, body, r, phi, radius)
    rho = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    opacity = 1.0 / (1.0 + np.exp(-(radius - rho) / 0.006))
    value = np.where(rho < radius - wall, tissue - 0.3, tissue + 0.3)
    return opacity, value, rho < radius


def _calcification(rng, yy, xx, body, spec: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cluster of tiny, very bright specks: opacity, intensity, mask (the specks, widened by
    a pixel's worth so that a 64 px mask is not lost to blur)."""
    r, phi, specks = spec
    cy, cx = _place(rng, body, r, phi, 0.15)
    near = np.full(yy.shape, np.inf)
    for dy, dx, radius in specks:
        jy, jx = rng.normal(0, 0.006, 2)
        d = np.sqrt((yy - cy - dy - jy) ** 2 + (xx - cx - dx - jx) ** 2) - radius
        near = np.minimum(near, d)
    opacity = 1.0 / (1.0 + np.exp(near / 0.004))
    return opacity, np.full(yy.shape, 1.05), near < 2.0 / yy.shape[0]


def make_multilabel_phantom(
    rng: np.random.Generator,
    size: int,
    findings: set[str] | frozenset[str],
    patient: PatientAnatomy | None = None,
    sites: _Findings | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Draw one phantom slice showing ``findings`` (a subset of :data:`FINDINGS`).

    Returns ``(image, masks)``: an 8-bit ``size``×``size`` image and a 0/255 mask per finding
    drawn. ``patient`` and ``sites`` (where the patient's findings are) are drawn from ``rng``
    when ``None``.

    Example:
        >>> image, masks = make_multilabel_phantom(np.random.default_rng(0), 64, {"cyst"})
        >>> sorted(masks), int(masks["cyst"].max())
        (['cyst'], 255)
    """
    _check_size(size)
    unknown = set(findings) - set(FINDINGS)
    if unknown:
        raise ConfigError(f"findings {sorted(unknown)} are not phantom findings; use {FINDINGS}")
    if patient is None:
        patient = PatientAnatomy.sample(rng)
    if sites is None:
        sites = _sample_findings(rng, patient)
    img, body, rho_body, inside, rim_width = _anatomy(rng, size, patient)
    yy, xx = _grid(size)
    interior = rho_body < 1.0 - rim_width
    masks = {}
    for name in FINDINGS:  # a fixed order: the same findings draw the same way
        if name not in findings:
            continue
        if name == "nodule":
            opacity, value, mask = _lesion(rng, yy, xx, patient, body, "benign")
        elif name == "cyst":
            opacity, value, mask = _cyst(rng, yy, xx, body, patient.tissue, sites.cyst)
        else:
            opacity, value, mask = _calcification(rng, yy, xx, body, sites.calcification)
        opacity = opacity * interior
        img = img * (1.0 - opacity) + value * opacity
        masks[name] = (mask & interior).astype(np.uint8) * 255
    return _finish(rng, img, patient, rho_body, inside, rim_width), masks


def _patient_findings(rng: np.random.Generator) -> frozenset[str]:
    """Findings that go together, as in patients: one latent burden raises the odds of a
    nodule and of calcifications, and calcifications are likelier beside a nodule (a calcified
    granuloma); cysts are nearly independent of both."""
    burden = rng.normal()
    nodule = rng.random() < _sigmoid(-0.1 + 1.4 * burden)
    calcification = rng.random() < _sigmoid(-1.6 + 0.8 * burden + 1.8 * nodule)
    cyst = rng.random() < _sigmoid(-0.2 + 0.2 * burden)
    return frozenset(name for name, has in zip(FINDINGS, (nodule, cyst, calcification)) if has)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def write_multilabel_phantoms(
    out: str | Path,
    n: int = 1200,
    size: int = 64,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``n`` multi-label phantom images, a mask per finding shown, and ``manifest.csv``.

    Each patient has none, one or several of :data:`FINDINGS` (correlated, about a quarter of
    the images show none); a finding the patient has shows in most of its slices. Layout:
    ``images/<patient>_<slice>.png``, ``masks/<finding>/<same name>.png``; the manifest's
    columns are :data:`MULTILABEL_COLUMNS`: ``Finding Labels`` as NIH ChestX-ray14 writes it
    (``nodule|calcification``, ``No Finding``), so ``load_samples(out)`` reads it as
    multi-label without options, and ``<finding>_mask_path`` (empty when the finding is not
    shown). The same ``(n, size, seed)`` gives byte-identical files; a previous phantom
    dataset in ``out`` is replaced, any other non-empty folder refused.

    Example:
        >>> manifest = write_multilabel_phantoms("findings", n=300, seed=0)
    """
    _check_arguments(n, size, seed)
    out = Path(out)
    _check_out(out)
    _clear(out)
    (out / _IMAGES).mkdir(parents=True)
    for name in FINDINGS:
        (out / "masks" / name).mkdir(parents=True)
    manifest = out / "manifest.csv"
    _write_manifest(manifest, [], MULTILABEL_COLUMNS)

    rng = np.random.default_rng(seed)
    rows = []
    for number, k in enumerate(_patient_sizes(rng, int(n)), start=1):
        patient_id = f"P{number:04d}"
        patient = PatientAnatomy.sample(rng)
        sites = _sample_findings(rng, patient)
        has = _patient_findings(rng)
        sex = "F" if rng.random() < 0.5 else "M"
        age = int(np.clip(np.rint(rng.normal(56, 15)), 20, 90))
        for s in range(1, k + 1):
            # In FINDINGS order, never the set's: a set's order follows string hashing, which
            # differs between processes, and the same seed must draw the same slices.
            shown = {f for f in FINDINGS if f in has and rng.random() < _SHOWN_IN_SLICE}
            image, masks = make_multilabel_phantom(rng, size, shown, patient, sites)
            name = f"{patient_id}_{s:02d}.png"
            _save_png(image, out / _IMAGES / name)
            paths = {}
            for finding, mask in masks.items():
                paths[finding] = f"masks/{finding}/{name}"
                _save_png(mask, out / paths[finding])
            labels = "|".join(f for f in FINDINGS if f in shown) or "No Finding"
            mask_paths = (paths.get(f, "") for f in FINDINGS)
            rows.append(
                (f"{_IMAGES}/{name}", patient_id, labels, *mask_paths, sex, age, patient.site)
            )
        if progress is not None:
            progress(k)
    _write_manifest(manifest, rows, MULTILABEL_COLUMNS)
    return manifest


# --------------------------------------------------------------------------- detection


def _detection_lesion(
    rng: np.random.Generator,
    yy: np.ndarray,
    xx: np.ndarray,
    centre: tuple[float, float],
    radius: float,
    kind: str,
    tissue: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One lesion of the detection phantoms at ``centre``: opacity, intensity and mask. A
    nodule is a bright smooth oval, a cyst a round dark (fluid) centre with a bright wall."""
    cy, cx = centre
    dy, dx = yy - cy, xx - cx
    if kind == "nodule":
        aspect, angle = rng.uniform(0.8, 1.0), rng.uniform(0, math.pi)
        cos, sin = math.cos(angle), math.sin(angle)
        rho = np.sqrt((cos * dx + sin * dy) ** 2 + ((-sin * dx + cos * dy) / aspect) ** 2)
        value = tissue + rng.uniform(0.28, 0.38) + 0.02 * _smooth_noise(rng, yy.shape[0], 1.0)
    else:
        rho = np.sqrt(dy**2 + dx**2)
        wall = rng.uniform(0.03, 0.04)
        value = np.where(rho < radius - wall, tissue - 0.3, tissue + 0.3)
    opacity = 1.0 / (1.0 + np.exp(-(radius - rho) / 0.006))
    return opacity, value, rho < radius


def make_detection_phantom(
    rng: np.random.Generator,
    size: int,
    kinds: list[str],
    patient: PatientAnatomy | None = None,
) -> tuple[np.ndarray, np.ndarray, list[list]]:
    """Draw one phantom slice with a lesion of each of ``kinds`` (names in
    :data:`DETECT_CLASSES`, repeats allowed), placed apart inside the body.

    Returns ``(image, mask, boxes)``: the 8-bit image, a 0/255 mask of all lesions and one
    ``[x1, y1, x2, y2, kind]`` box per lesion, tight on its mask (pixel corners: ``x2`` is one
    past the last column). A lesion that finds no room is left out (and has no box).

    Example:
        >>> image, mask, boxes = make_detection_phantom(np.random.default_rng(0), 64, ["cyst"])
        >>> boxes[0][4], int(mask.max())
        ('cyst', 255)
    """
    _check_size(size)
    unknown = sorted(set(kinds) - set(DETECT_CLASSES))
    if unknown:
        raise ConfigError(f"lesions {unknown} are not phantom lesions; use {DETECT_CLASSES}")
    if patient is None:
        patient = PatientAnatomy.sample(rng)
    img, body, rho_body, inside, rim_width = _anatomy(rng, size, patient)
    yy, xx = _grid(size)
    interior = rho_body < 1.0 - rim_width
    union = np.zeros((size, size), dtype=bool)
    placed: list[tuple[float, float, float]] = []
    boxes = []
    for kind in kinds:
        radius = rng.uniform(*_DETECT_RADIUS)
        room = max(0.0, 1.0 - (radius + 0.06) / min(body[2], body[3]))
        for _ in range(50):
            r, phi = room * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
            cy, cx = _to_image(body, r * math.sin(phi), r * math.cos(phi))
            if all(math.hypot(cy - y, cx - x) > radius + q + _DETECT_GAP for y, x, q in placed):
                break
        else:
            continue
        placed.append((cy, cx, radius))
        opacity, value, mask = _detection_lesion(
            rng, yy, xx, (cy, cx), radius, kind, patient.tissue
        )
        mask &= interior
        if not mask.any():
            continue
        img = img * (1.0 - opacity * interior) + value * opacity * interior
        union |= mask
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes.append([int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1, kind])
    image = _finish(rng, img, patient, rho_body, inside, rim_width)
    return image, union.astype(np.uint8) * 255, boxes


def write_detection_phantoms(
    out: str | Path,
    n: int = 1200,
    size: int = 64,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    splits: bool = False,
) -> Path:
    """Write ``n`` detection phantom slices, their lesion masks and a box CSV under ``out``;
    returns the CSV's path (``out/manifest.csv``).

    Each slice shows 0 to 3 separate lesions (a quarter show none), each a :data:`DETECT_CLASSES`
    kind. Layout: ``images/<patient>_<slice>.png``, ``masks/<same name>.png`` (all the slice's
    lesions); the CSV's columns are :data:`DETECT_COLUMNS`, one row per box in pixel corners
    (``path,x1,y1,x2,y2,label``, tight on the lesion's mask) and one row with empty corners for
    a slice without lesions; ``split`` is filled, by patient (70/15/15), only when ``splits``.
    ``load_samples(out)`` reads it as a detection table. The same arguments give byte-identical
    files; a previous phantom dataset in ``out`` is replaced, any other non-empty folder refused.

    Example:
        >>> csv_path = write_detection_phantoms("lesions", n=300, seed=0)
    """
    _check_arguments(n, size, seed)
    out = Path(out)
    _check_out(out)
    _clear(out)
    (out / _IMAGES).mkdir(parents=True)
    (out / "masks").mkdir()
    manifest = out / "manifest.csv"
    _write_manifest(manifest, [], DETECT_COLUMNS)

    rng = np.random.default_rng(seed)
    sizes = _patient_sizes(rng, int(n))
    patient_splits = _detection_splits(len(sizes)) if splits else [""] * len(sizes)
    rows = []
    for number, k in enumerate(sizes, start=1):
        patient_id = f"P{number:04d}"
        patient = PatientAnatomy.sample(rng)
        sex = "F" if rng.random() < 0.5 else "M"
        age = int(np.clip(np.rint(rng.normal(56, 15)), 20, 90))
        split = patient_splits[number - 1]
        for s in range(1, k + 1):
            count = int(rng.choice(len(_LESION_COUNTS), p=_LESION_COUNTS))
            kinds = [DETECT_CLASSES[int(i)] for i in rng.integers(0, len(DETECT_CLASSES), count)]
            image, mask, boxes = make_detection_phantom(rng, size, kinds, patient)
            name = f"{patient_id}_{s:02d}.png"
            _save_png(image, out / _IMAGES / name)
            _save_png(mask, out / "masks" / name)
            rest = (patient_id, split, f"masks/{name}", sex, age, patient.site)
            path = f"{_IMAGES}/{name}"
            for x1, y1, x2, y2, kind in boxes:
                rows.append((path, x1, y1, x2, y2, kind, *rest))
            if not boxes:
                rows.append((path, "", "", "", "", "", *rest))
        if progress is not None:
            progress(k)
    _write_manifest(manifest, rows, DETECT_COLUMNS)
    return manifest


def _detection_splits(patients: int) -> list[str]:
    """Patients (drawn in random order already) → train/val/test by the 70/15/15 shares."""
    out, start = [], 0
    for name, share in _DETECT_SPLITS:
        stop = patients if name == "test" else start + int(round(share * patients))
        out += [name] * (stop - start)
        start = stop
    return out


# --------------------------------------------------------------------------- 3-D


#: The 3-D manifest: the 2-D one's columns; ``mask`` is empty for a volume without a lesion.
VOLUME_COLUMNS: tuple[str, ...] = MANIFEST_COLUMNS
_VOLUME_SIZE_RANGE = (8, 256)
_VOLUME_MIN_N = 8
#: Field of view of a phantom volume, in mm along each axis (the voxel spacing is FOV / size).
_VOLUME_FOV_MM = 64.0
# Intensities in Hounsfield-like units: air, body (soft tissue), organ, lesion contrast range.
_AIR_HU, _BODY_HU, _ORGAN_HU = -1000.0, 40.0, 100.0
_LESION_CONTRAST_HU = (120.0, 180.0)
# Lesion radius in volume units ([-1, 1] across the volume): 2.4-3.5 voxels at 32³.
_LESION_RADIUS_3D = (0.15, 0.22)


def _soft_inside(rho: np.ndarray, edge: float) -> np.ndarray:
    """1 well inside (``rho`` < 1), 0 well outside, a logistic ramp ``edge`` wide between."""
    return 1.0 / (1.0 + np.exp(np.clip((rho - 1.0) / edge, -50.0, 50.0)))


def make_phantom_volume(
    rng: np.random.Generator, size: int, lesion: bool, site: str = "site_a"
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom volume ``(size, size, size)`` in Hounsfield-like units (int16) and its
    lesion mask (uint8 0/1, all zeros without ``lesion``).

    A soft-edged ellipsoid body (40) holds a soft-edged ellipsoid organ (100); ``lesion`` adds
    one bright sphere (+120 to +180) inside the organ, whose voxels above half its contrast are
    the mask. The site's scanner sets the noise and gain (as in the 2-D phantoms).

    >>> volume, mask = make_phantom_volume(np.random.default_rng(0), 16, lesion=True)
    >>> volume.shape, int(mask.sum()) > 0
    ((16, 16, 16), True)
    """
    axis = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"))
    voxel = 2.0 / size  # one voxel in volume units

    def rho(centre, axes) -> np.ndarray:
        c = np.asarray(centre)[:, None, None, None]
        a = np.asarray(axes)[:, None, None, None]
        return np.sqrt((((grid - c) / a) ** 2).sum(0))

    body_centre = rng.uniform(-0.05, 0.05, 3)
    body_axes = np.array([0.82, 0.68, 0.86]) * rng.uniform(0.92, 1.04, 3)
    organ_centre = body_centre + np.array([0.15, 0.05, 0.0]) + rng.uniform(-0.06, 0.06, 3)
    organ_axes = np.array([0.42, 0.34, 0.46]) * rng.uniform(0.88, 1.1, 3)
    body = _soft_inside(rho(body_centre, body_axes), 0.04)
    organ = _soft_inside(rho(organ_centre, organ_axes), 0.06)
    noise, gain, _ = _SITES[site]
    volume = _AIR_HU + body * (_BODY_HU - _AIR_HU) + organ * (_ORGAN_HU - _BODY_HU) * gain
    mask = np.zeros((size,) * 3, dtype=np.uint8)
    if lesion:
        radius = rng.uniform(*_LESION_RADIUS_3D)
        # a point in the inner half of the organ (direction uniform, depth by cube root)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        centre = organ_centre + direction * organ_axes * 0.5 * rng.uniform() ** (1 / 3)
        distance = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
        core = _soft_inside(distance / radius, 0.5 * voxel / radius)
        volume = volume + core * rng.uniform(*_LESION_CONTRAST_HU) * gain
        mask = (core > 0.5).astype(np.uint8)
        if not mask.any():  # a lesion is never maskless, however coarse the grid
            mask[np.unravel_index(int(np.argmin(distance)), distance.shape)] = 1
    # scanner noise: white noise plus a slow intensity drift across the volume
    drift = (grid * rng.normal(0.0, 6.0, 3)[:, None, None, None]).sum(0)
    volume = volume + drift + rng.normal(0.0, noise * 300.0, volume.shape)
    return np.rint(volume).clip(-1024, 3071).astype(np.int16), mask


def write_phantom_volumes(
    out: str | Path,
    n: int = 120,
    size: int = 32,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``n`` phantom volumes (NIfTI ``.nii.gz``), a lesion mask per lesion volume and
    ``manifest.csv`` under ``out``: the 3-D embedded dataset.

    Layout: ``<class>/<patient>.nii.gz`` (classes :data:`VOLUME_CLASSES`, half of the volumes
    each), ``masks/lesion/<patient>.nii.gz`` (uint8 0/1, same shape and affine) and
    ``manifest.csv`` with columns ``path,label,patient_id,mask,sex,age,site`` (paths relative
    to ``out``; ``mask`` empty for normal volumes); one volume per patient. Volumes are int16
    Hounsfield-like units, ``size``³ voxels over a 64 mm field of view (spacing ``64 / size``
    mm, RAS axes). The same ``(n, size, seed)`` gives byte-identical files. A previous phantom
    dataset in ``out`` is replaced; any other non-empty folder is refused. ``progress(1)`` is
    called after each volume.

    Example:
        >>> manifest = write_phantom_volumes("phantom3d", n=60, size=32)   # doctest: +SKIP
    """
    import nibabel as nib

    _check_volume_arguments(n, size, seed)
    out = Path(out)
    _check_out(out)
    _clear(out)
    for name in VOLUME_CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)
    (out / "masks" / "lesion").mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    _write_manifest(manifest, [])  # the header first, as the 2-D phantoms do

    rng = np.random.default_rng(seed)
    labels = np.array(["normal"] * (n - n // 2) + ["lesion"] * (n // 2))[rng.permutation(n)]
    spacing = _VOLUME_FOV_MM / size
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -_VOLUME_FOV_MM / 2 + spacing / 2  # centred on the world origin
    rows = []
    for number, label in enumerate(labels, start=1):
        patient_id = f"P{number:04d}"
        site = str(rng.choice(list(_SITES), p=_SITE_SHARE))
        sex = "F" if rng.random() < 0.5 else "M"
        age = int(np.clip(np.rint(rng.normal(56, 15)), 20, 90))
        volume, mask = make_phantom_volume(rng, size, label == "lesion", site)
        name = f"{patient_id}.nii.gz"
        nib.save(nib.Nifti1Image(volume, affine), str(out / label / name))
        mask_path = ""
        if label == "lesion":
            mask_path = f"masks/lesion/{name}"
            nib.save(nib.Nifti1Image(mask, affine), str(out / mask_path))
        rows.append((f"{label}/{name}", label, patient_id, mask_path, sex, age, site))
        if progress is not None:
            progress(1)
    _write_manifest(manifest, rows)
    return manifest


def _check_volume_arguments(n, size: int, seed) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < _VOLUME_MIN_N:
        raise ConfigError(
            f"n={n!r} is not allowed; use an integer of at least {_VOLUME_MIN_N} "
            "(enough volumes for two classes and train/val/test splits)"
        )
    lo, hi = _VOLUME_SIZE_RANGE
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not lo <= size <= hi:
        raise ConfigError(f"size={size!r} is out of range; use an integer from {lo} to {hi}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r} is not allowed; use a non-negative integer")
