"""Volumes (CT, MRI, MedMNIST3D) read into one channel-first array with their geometry, and the
MONAI pipeline that turns them into a 3-D model's input, recorded as data.

:func:`read_volume` decodes a NIfTI file, a DICOM series (``dicomseries://<folder>#<UID>``) or a
MedMNIST3D ``.npz`` entry into a :class:`Volume`: float32 ``(C, X, Y, Z)`` with its affine
(RAS world coordinates), voxel spacing and orientation codes. :class:`VolumePreprocess` is what a
3-D run's ``preprocess.json`` holds: a list of MONAI transforms in MONAI Bundle config syntax
(``Orientationd``, ``Spacingd``, ``ScaleIntensityRanged``, ``ResizeWithPadOrCropd``...) applied to
``{"image": MetaTensor}``, then ``(x - mean) / std``. The same list drives training, prediction
and an exported MONAI Bundle (which prepends ``LoadImaged`` + ``EnsureChannelFirstd``).

>>> volume = read_volume("ct.nii.gz")                                  # doctest: +SKIP
>>> prep = VolumePreprocess.build(size=(64, 64, 64), intensity="ct-soft-tissue")
>>> prep(volume).shape                                                 # doctest: +SKIP
(1, 64, 64, 64)
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsight.data import imaging
from medsight.errors import ConfigError, DataError, ImageDecodeError

__all__ = [
    "INTENSITY_PRESETS",
    "MAX_VOXELS",
    "Volume",
    "VolumePreprocess",
    "dicom_series_source",
    "find_dicom_series",
    "is_volume_source",
    "read_volume",
    "read_volume_bytes",
    "series_files",
    "volume_thumbnail",
]

DICOM_SERIES_SCHEME = "dicomseries://"

#: Intensity scaling by preset: CT windows as Hounsfield ranges ``(a_min, a_max)`` mapped to
#: [0, 1] and clipped (soft tissue W400/L40, lung W1500/L-600, bone W2000/L500, brain W80/L40);
#: ``percentile`` scales the 0.5-99.5th percentiles of each volume (MR and unknown modalities);
#: ``uint8`` divides by 255 (MedMNIST3D's 0/255 shape masks); ``minmax`` each volume's range.
INTENSITY_PRESETS: dict[str, tuple[float, float] | None] = {
    "ct-soft-tissue": (-160.0, 240.0),
    "ct-lung": (-1350.0, 150.0),
    "ct-bone": (-500.0, 1500.0),
    "ct-brain": (0.0, 80.0),
    "percentile": None,
    "uint8": None,
    "minmax": None,
}

#: A volume resampled to more voxels than this is refused (with a coarser spacing suggested):
#: 256³ × 4, a 1 GiB float32 array.
MAX_VOXELS = 256**3 * 4

#: Slice gaps differing from the median by more than this fraction are a missing slice.
_GAP_TOLERANCE = 0.2
#: Direction cosines differing by more than this are a different orientation.
_ORIENTATION_TOLERANCE = 1e-3
#: A slice stack leaning from the slice normal by more than this many degrees is tilted.
_TILT_DEGREES = 0.5


@dataclass
class Volume:
    """A decoded volume: ``array`` float32 ``(C, X, Y, Z)``; ``affine`` (4, 4) voxel → RAS mm;
    ``spacing`` in mm along X, Y, Z; ``orientation`` its axis codes (``"RAS"``, ``"LPS"``...);
    ``meta`` how it was read (``format``, ``source``, ``modality``, ``volumes``...)."""

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    orientation: str
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The spatial shape ``(X, Y, Z)``."""
        return tuple(int(s) for s in self.array.shape[1:4])

    @property
    def size(self) -> tuple[int, int, int]:
        """The spatial shape (as a decoded image's ``size`` is its ``(height, width)``)."""
        return self.shape

    @property
    def source(self) -> str:
        return str(self.meta.get("source", "volume"))


# --------------------------------------------------------------------------- sources


def dicom_series_source(folder: str | Path, series_uid: str) -> str:
    """Address of the DICOM series ``series_uid`` whose slices lie under ``folder``."""
    return f"{DICOM_SERIES_SCHEME}{Path(folder).resolve()}#{series_uid}"


def is_volume_source(source: str) -> bool:
    """Whether ``source`` names a whole volume: a DICOM series address, a NIfTI file, or a
    MedMNIST3D npz entry (judged from the array's rank, which reads the npz)."""
    if source.startswith(DICOM_SERIES_SCHEME):
        return True
    if source.startswith("npz://"):
        path, _, where = source[len("npz://") :].rpartition("!")
        images = imaging.npz_images(path, where.partition("/")[0])
        return _npz_is_3d(images.shape)
    return "://" not in source and imaging.has_extension(source, imaging.NIFTI_EXTENSIONS)


def _npz_is_3d(shape: tuple[int, ...]) -> bool:
    """A MedMNIST array ``(N, D, H, W)`` of volumes, not ``(N, H, W, 3)`` colour images."""
    return len(shape) == 4 and shape[-1] not in (1, 3, 4)


def read_volume(
    source: str,
    *,
    volume: int | None = None,
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS,
) -> Volume:
    """Decode ``source`` (NIfTI path, ``dicomseries://`` address, MedMNIST3D npz entry) into a
    :class:`Volume`. Values are as stored (Hounsfield units for CT: DICOM rescale applied).

    ``volume`` picks the volume of a 4-D NIfTI (default: the first, said in a warning).
    A 2-D image is refused in one line (a 3-D run takes volumes). A DICOM series with missing
    or duplicated slices or mixed orientations is refused naming the fault; one acquired with
    a gantry tilt is read with its sheared affine and ``meta["gantry_tilt"]`` (degrees), for
    :func:`untilt` or :meth:`VolumePreprocess.prepare` to correct or refuse.
    """
    if source.startswith(DICOM_SERIES_SCHEME):
        return _read_dicom_series(source, max_pixels=max_pixels)
    if source.startswith("npz://"):
        return _read_npz(source)
    name = imaging.source_name(source)
    if "://" not in source and imaging.has_extension(name, imaging.NIFTI_EXTENSIONS):
        return _read_nifti(source, volume=volume, max_pixels=max_pixels)
    if "://" not in source and Path(source).is_dir():
        found = find_dicom_series(source)
        if len(found) == 1:
            return _read_dicom_series(found[0], max_pixels=max_pixels)
        raise ImageDecodeError(
            source,
            f"a folder holding {len(found)} DICOM series; give one as "
            "dicomseries://<folder>#<SeriesInstanceUID> (medsight data check lists them)",
        )
    raise ImageDecodeError(
        source,
        "is a 2-D image, but this run takes 3-D volumes (NIfTI .nii/.nii.gz, a DICOM series "
        "folder, or a MedMNIST3D .npz); predict it with a 2-D run",
    )


def _read_npz(source: str) -> Volume:
    path, _, where = source[len("npz://") :].rpartition("!")
    split, _, index = where.partition("/")
    if not Path(path).exists():
        raise ImageDecodeError(source, "npz file not found")
    images = imaging.npz_images(path, split)
    if not _npz_is_3d(images.shape):
        raise ImageDecodeError(
            source,
            f"is a 2-D image ({'x'.join(map(str, images.shape[1:]))}), but this run takes 3-D "
            "volumes; predict it with a 2-D run",
        )
    raw = images[int(index)]
    if not np.issubdtype(raw.dtype, np.integer) and not np.isfinite(raw).all():
        raise ImageDecodeError(source, "voxel values hold NaN or infinity")
    array = raw.astype(np.float32)[None]
    meta = {"format": "npz", "source": source, "dtype": str(raw.dtype)}
    return Volume(array, np.eye(4), (1.0, 1.0, 1.0), "RAS", meta)


# --------------------------------------------------------------------------- NIfTI


def read_volume_bytes(
    data: bytes,
    *,
    name: str = "upload",
    volume: int | None = None,
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS,
) -> Volume:
    """A volume from an in-memory file (an upload): a NIfTI (``.nii`` or ``.nii.gz``), or a
    ``.zip`` holding one DICOM series (its members inflated with the same caps as any zip).
    Anything else is refused in one line."""
    import io
    import tempfile
    import zipfile

    kind = imaging.sniff(data[:512])
    if kind in ("nifti", "gzip"):
        try:
            image = imaging._nifti_from_stream(io.BytesIO(data).read, name, max_pixels=max_pixels)
        except ImageDecodeError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ImageDecodeError(name, f"not a readable NIfTI file ({exc})") from None
        return _nifti_volume(image, name, volume=volume)
    if data[:4] == b"PK\x03\x04":
        with tempfile.TemporaryDirectory(prefix="medsight-series-") as folder:
            try:
                archive = zipfile.ZipFile(io.BytesIO(data))
            except zipfile.BadZipFile:
                raise ImageDecodeError(name, "not a readable .zip file") from None
            budget = imaging.max_inflated_bytes(max_pixels) * imaging.VOLUME_FACTOR
            total = 0
            for index, info in enumerate(i for i in archive.infolist() if not i.is_dir()):
                total += info.file_size
                if total > budget:
                    raise ImageDecodeError(
                        name, f"the .zip inflates to more than {budget:,} bytes; refused"
                    )
                member = imaging.read_member(archive, info, name, max_pixels=max_pixels)
                (Path(folder) / f"slice_{index:05d}.dcm").write_bytes(member)
            found = find_dicom_series(folder)
            if len(found) != 1:
                raise ImageDecodeError(
                    name,
                    f"a .zip upload holds one DICOM series; this one holds {len(found)}",
                )
            read = _read_dicom_series(found[0], max_pixels=max_pixels)
            read.meta["source"] = name
            return read
    if kind in ("raster", "dicom"):
        raise ImageDecodeError(
            name,
            "is a 2-D image, but this run takes 3-D volumes (a .nii/.nii.gz file, or a .zip of "
            "one DICOM series); predict it with a 2-D run",
        )
    raise ImageDecodeError(name, "content is not a NIfTI volume or a .zip of a DICOM series")


def _read_nifti(source: str, *, volume: int | None, max_pixels: int) -> Volume:
    image = imaging.load_nifti(source, max_pixels=max_pixels)
    return _nifti_volume(image, source, volume=volume)


def _nifti_volume(image, source: str, *, volume: int | None) -> Volume:
    import nibabel as nib

    data = np.asanyarray(image.dataobj)
    meta: dict[str, Any] = {
        "format": "nifti",
        "source": source,
        "shape": [int(s) for s in data.shape],
    }
    if data.ndim == 5 and data.shape[3] == 1:  # (X, Y, Z, 1, C) vector images: channels kept
        data = data[:, :, :, 0, :]
    elif data.ndim == 4:
        count = int(data.shape[3])
        meta["volumes"] = count
        chosen = 0 if volume is None else int(volume)
        if not 0 <= chosen < count:
            raise ImageDecodeError(source, f"volume {chosen} is outside 0..{count - 1} (--volume)")
        if volume is None and count > 1:
            warnings.warn(
                f"{source}: a 4-D NIfTI of {count} volumes; using the first (choose with "
                "--volume N)",
                UserWarning,
                stacklevel=3,
            )
        data = data[..., chosen]
        meta["volume"] = chosen
    if data.ndim == 2 or (data.ndim == 3 and min(data.shape) == 1):
        raise ImageDecodeError(
            source,
            f"is a 2-D image ({'x'.join(map(str, data.shape))}), but this run takes 3-D "
            "volumes; predict it with a 2-D run",
        )
    if data.ndim != 3:
        raise ImageDecodeError(source, f"NIfTI data of shape {meta['shape']} is not a volume")
    array = np.asarray(data, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ImageDecodeError(source, "voxel values hold NaN or infinity")
    affine = np.asarray(image.affine, dtype=np.float64)
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    orientation = "".join(nib.orientations.aff2axcodes(affine))
    return Volume(array[None], affine, spacing, orientation, meta)


# --------------------------------------------------------------------------- DICOM series


def find_dicom_series(root: str | Path) -> list[str]:
    """``dicomseries://`` addresses of every series under ``root`` (headers only), each named by
    the deepest folder holding all its slices, in a stable order."""
    files: dict[str, list[Path]] = {}
    for path, uid in _series_uids(Path(root)):
        if uid:
            files.setdefault(uid, []).append(path)
    found = []
    for uid, paths in files.items():
        folder = Path(os.path.commonpath([str(p.parent) for p in paths]))
        found.append(dicom_series_source(folder, uid))
    return sorted(found)


def _maybe_dicom(path: Path) -> bool:
    return imaging.has_extension(path.name, imaging.DICOM_EXTENSIONS) or (
        "." not in path.name and imaging.is_dicom_file(path)
    )


def _series_uids(root: Path):
    """``(path, SeriesInstanceUID)`` of every DICOM file under ``root`` (headers only, hidden
    files and folders skipped, in path order; files that are not DICOM left out)."""
    for path, ds in dicom_files(root, tags=("SeriesInstanceUID",)):
        yield path, str(ds.get("SeriesInstanceUID", "") or "")


def dicom_files(root: str | Path, tags=("SeriesInstanceUID", "ImagePositionPatient")):
    """``(path, header)`` of every DICOM file under ``root``, reading only ``tags`` (hidden
    files and folders skipped, in path order; files that are not DICOM left out)."""
    import pydicom

    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or not _maybe_dicom(path):
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(tags))
            except Exception:  # noqa: BLE001 - not DICOM: other files in the tree
                continue
            yield path, ds


def series_files(source: str) -> list[Path]:
    """The files of the series ``source`` names (headers read, in path order)."""
    folder, _, uid = source[len(DICOM_SERIES_SCHEME) :].rpartition("#")
    return [path for path, found in _series_uids(Path(folder)) if found == uid]


def _series_files(source: str) -> tuple[Path, str, list]:
    import pydicom

    folder, _, uid = source[len(DICOM_SERIES_SCHEME) :].rpartition("#")
    root = Path(folder)
    if not root.is_dir():
        raise ImageDecodeError(source, "the series folder does not exist")
    # headers first: only this series' files are read whole (pixel data included)
    slices = [pydicom.dcmread(path) for path, found in _series_uids(root) if found == uid]
    if not slices:
        raise ImageDecodeError(source, f"no slices of series {uid} under {root}")
    return root, uid, slices


def _read_dicom_series(source: str, *, max_pixels: int) -> Volume:
    """Slices sorted along the slice normal by ImagePositionPatient; spacing from the positions
    (not SliceThickness); faults of the stack named."""
    _, uid, slices = _series_files(source)
    if len(slices) == 1 and int(slices[0].get("NumberOfFrames", 1) or 1) > 1:
        raise ImageDecodeError(source, "a multi-frame DICOM; give it as a file, not a series")
    if len(slices) < 2:
        raise ImageDecodeError(source, "a series of one slice is not a volume")
    orientations = []
    for ds in slices:
        iop = ds.get("ImageOrientationPatient")
        ipp = ds.get("ImagePositionPatient")
        if iop is None or ipp is None:
            raise ImageDecodeError(
                source,
                "slices lack ImagePositionPatient/ImageOrientationPatient, so they cannot be "
                "stacked in space; convert the series to NIfTI (e.g. dcm2niix)",
            )
        orientations.append(np.array([float(v) for v in iop]))
    first = orientations[0]
    if any(np.abs(o - first).max() > _ORIENTATION_TOLERANCE for o in orientations):
        distinct = len({tuple(np.round(o, 3)) for o in orientations})
        raise ImageDecodeError(
            source,
            f"mixed orientations: its slices have {distinct} different ImageOrientationPatient "
            "values (a localiser mixed in?); keep one orientation per series",
        )
    row, col = first[:3], first[3:]
    normal = np.cross(row, col)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    positions, along = positions[order], along[order]
    steps = np.diff(along)
    duplicated = int((np.abs(steps) < 1e-3).sum())
    if duplicated:
        raise ImageDecodeError(
            source,
            f"duplicated slices: {duplicated} slice position(s) appear twice along the normal; "
            "remove the repeated files (a series exported twice?)",
        )
    step = float(np.median(steps))
    gaps = np.abs(steps - step) > _GAP_TOLERANCE * step
    if gaps.any():
        missing = int(np.round(steps[gaps] / step - 1).clip(min=0).sum())
        at = float(along[int(np.argmax(gaps))])
        raise ImageDecodeError(
            source,
            f"missing slices: about {max(missing, 1)} slice(s) absent (gap after position "
            f"{at:.1f} mm, slice step {step:.2f} mm); the series is incomplete, re-export it",
        )
    stack_direction = positions[-1] - positions[0]
    lean = float(
        np.degrees(
            np.arccos(
                np.clip(abs(stack_direction @ normal) / np.linalg.norm(stack_direction), 0, 1)
            )
        )
    )
    rows, cols = int(slices[0].Rows), int(slices[0].Columns)
    if rows * cols * len(slices) > max_pixels * imaging.VOLUME_FACTOR:
        raise ImageDecodeError(
            source,
            f"{cols}x{rows}x{len(slices)} voxels is above the limit of "
            f"{max_pixels * imaging.VOLUME_FACTOR:,}; raise --max-pixels if it is genuine",
        )
    planes = []
    for ds in slices:
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise ImageDecodeError(
                source, "slices of different sizes in one series; keep one size per series"
            )
        pixels = ds.pixel_array.astype(np.float32)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        planes.append(pixels * slope + intercept)
    # pixel_array is (rows, columns) = (j, i); the volume's X runs along the rows' direction.
    array = np.stack([p.T for p in planes], axis=-1)[None]
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
    slice_vector = stack_direction / (len(slices) - 1)
    lps = np.eye(4)
    lps[:3, 0] = row * col_spacing
    lps[:3, 1] = col * row_spacing
    lps[:3, 2] = slice_vector
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS world → RAS
    import nibabel as nib

    spacing = (col_spacing, row_spacing, float(np.linalg.norm(slice_vector)))
    meta = {
        "format": "dicom-series",
        "source": source,
        "series_uid": uid,
        "slices": len(slices),
        "modality": str(slices[0].get("Modality", "") or ""),
    }
    if lean > _TILT_DEGREES:  # the affine is sheared: a run refuses or corrects it (untilt)
        meta["gantry_tilt"] = round(lean, 2)
    orientation = "".join(nib.orientations.aff2axcodes(affine))
    return Volume(np.ascontiguousarray(array, dtype=np.float32), affine, spacing, orientation, meta)


def tilt_error(volume: Volume) -> ImageDecodeError:
    """The one line that names a gantry-tilted series and the two ways on."""
    return ImageDecodeError(
        volume.source,
        f"gantry tilt: the slices are stacked {volume.meta['gantry_tilt']:.1f}° off their "
        "normal; train with --tilt correct to resample such series onto an orthogonal grid "
        "(or resample it first, e.g. with dcm2niix)",
    )


def untilt(volume: Volume) -> Volume:
    """A gantry-tilted series resampled (trilinear) onto an orthogonal grid: the slice axis
    along the slices' normal at the spacing between slice planes, rows and columns as they
    were, the grid widened to hold every voxel of the sheared stack (new voxels: the volume's
    minimum, air for CT). A volume without tilt is returned as it is."""
    if "gantry_tilt" not in volume.meta:
        return volume
    from scipy import ndimage

    sheared = volume.affine
    row, col = sheared[:3, 0], sheared[:3, 1]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    step = float(sheared[:3, 2] @ normal)  # signed distance between slice planes
    square = sheared.copy()
    square[:3, 2] = normal * step
    # Where the sheared stack's corners fall on the orthogonal grid: the new grid spans them.
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in volume.shape], indexing="ij"))
    corners = np.vstack([corners.reshape(3, -1), np.ones((1, 8))])
    on_square = np.linalg.solve(square, sheared @ corners)[:3]
    low, high = np.floor(on_square.min(axis=1)), np.ceil(on_square.max(axis=1))
    shape = tuple(int(n) for n in high - low + 1)
    target = square.copy()
    target[:3, 3] = (square @ np.append(low, 1.0))[:3]
    to_source = np.linalg.solve(sheared, target)  # target voxel → source voxel
    fill = float(volume.array.min())
    channels = [
        ndimage.affine_transform(
            plane,
            to_source[:3, :3],
            offset=to_source[:3, 3],
            output_shape=shape,
            order=1,
            cval=fill,
        )
        for plane in volume.array
    ]
    spacing = (*volume.spacing[:2], abs(step))
    meta = {**volume.meta, "tilt_corrected": volume.meta["gantry_tilt"]}
    del meta["gantry_tilt"]
    return Volume(
        np.ascontiguousarray(np.stack(channels), dtype=np.float32),
        target,
        spacing,
        volume.orientation,
        meta,
    )


# --------------------------------------------------------------------------- preprocessing


def _intensity_step(preset: str) -> dict:
    if preset not in INTENSITY_PRESETS:
        raise ConfigError(
            f"intensity={preset!r} is not known; choose one of: {', '.join(INTENSITY_PRESETS)}"
        )
    window = INTENSITY_PRESETS[preset]
    if window is not None:
        a_min, a_max = window
        return {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": a_min,
                "a_max": a_max, "b_min": 0.0, "b_max": 1.0, "clip": True}  # fmt: skip
    if preset == "uint8":
        return {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0.0,
                "a_max": 255.0, "b_min": 0.0, "b_max": 1.0, "clip": True}  # fmt: skip
    if preset == "minmax":
        return {"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0}
    return {"_target_": "ScaleIntensityRangePercentilesd", "keys": "image", "lower": 0.5,
            "upper": 99.5, "b_min": 0.0, "b_max": 1.0, "clip": True}  # fmt: skip


#: Below this a voxel can only be a Hounsfield unit (air is -1000): MR and PET values are not
#: negative, so a NIfTI file without a modality that reaches it is CT.
_AIR_HU = -900.0


def intensity_for(volume: Volume) -> str:
    """The intensity preset a volume suggests: ``uint8`` for 8-bit MedMNIST3D masks,
    ``ct-soft-tissue`` for CT (a CT series, or a volume whose values reach air's Hounsfield
    units), ``percentile`` otherwise (MR, NIfTI of unknown modality)."""
    if volume.meta.get("dtype") == "uint8":
        return "uint8"
    modality = str(volume.meta.get("modality", "")).upper()
    if modality == "CT" or (not modality and float(np.min(volume.array)) <= _AIR_HU):
        return "ct-soft-tissue"
    return "percentile"


@dataclass(frozen=True)
class VolumePreprocess:
    """A volume → a 3-D model's input: MONAI ``transforms`` (Bundle config syntax, applied to
    ``{"image": MetaTensor(array, affine)}``) then ``(x - mean) / std`` per channel.

    Same duck interface as the 2-D :class:`~medsight.data.transforms.Preprocess`: ``prepare``
    gives ``(C, X, Y, Z)`` in ``[0, 1]`` (what augmentation sees), ``normalize`` and
    ``__call__``; ``size`` has 3 ints; ``window`` is None; saved with ``"dims": 3``. Build one
    with :meth:`build`.

    With ``slices`` K (2.5-D, for 2-D networks), the input is K adjacent axial slices around
    the middle of the prepared volume, as channels: ``prepare`` gives ``(K, H, W)`` (rows
    anterior to posterior, columns as displayed), ``size`` is ``(H, W)`` and the resize keeps
    the volume's own number of slices.

    >>> prep = VolumePreprocess.build(size=(28, 28, 28), intensity="uint8")
    >>> [t["_target_"] for t in prep.transforms]
    ['Orientationd', 'ScaleIntensityRanged', 'Resized']
    """

    size: tuple[int, int, int] = (28, 28, 28)
    channels: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    transforms: tuple[dict, ...] = ()
    spacing: tuple[float, float, float] | None = None
    intensity: str = "percentile"
    #: 2.5-D: this many adjacent axial slices become the channels of a 2-D input (None: 3-D).
    slices: int | None = None
    #: A gantry-tilted DICOM series: ``refuse`` it by name, or ``correct`` it (:func:`untilt`).
    tilt: str = "refuse"
    dims: int = 3
    version: int = 1

    #: 2-D Preprocess's DICOM window: volumes are windowed by ``intensity`` instead.
    window = None

    def __post_init__(self) -> None:
        if self.slices is not None:
            if self.slices < 1 or self.slices % 2 == 0:
                raise ConfigError(f"slices must be an odd number (1, 3, 5...), got {self.slices}")
            if self.channels != self.slices:
                raise ConfigError(f"{self.slices} slices make {self.slices} channels")
            if len(self.size) != 2 or min(self.size) < 1:
                raise ConfigError(f"with slices, size is (height, width), got {self.size}")
        elif len(self.size) != 3 or min(self.size) < 1:
            raise ConfigError(f"size must be 3 voxel counts (X, Y, Z), got {self.size}")
        if self.dims != 3:
            raise ConfigError(f"a VolumePreprocess has dims 3, got {self.dims}")
        if self.tilt not in ("refuse", "correct"):
            raise ConfigError(f"tilt must be 'refuse' or 'correct', got {self.tilt!r}")
        if self.channels < 1:
            raise ConfigError(f"channels must be 1 or more, got {self.channels}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, self.channels):
                raise ConfigError(f"{name} needs 1 or {self.channels} values")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std values must be positive, got {self.std}")
        for step in self.transforms:
            if not isinstance(step, dict) or step.get("_target_") not in _TRANSFORMS:
                raise ConfigError(
                    f"preprocess transform {step!r} is not one medsight applies; known: "
                    f"{', '.join(sorted(_TRANSFORMS))}"
                )

    @classmethod
    def build(
        cls,
        size: tuple[int, int, int] | int = 28,
        *,
        intensity: str = "percentile",
        spacing: tuple[float, float, float] | None = None,
        channels: int = 1,
        mean: tuple[float, ...] = (0.5,),
        std: tuple[float, ...] = (0.5,),
        slices: int | None = None,
        tilt: str = "refuse",
    ) -> VolumePreprocess:
        """The standard pipeline: RAS orientation, resampling to ``spacing`` mm (then pad/crop
        to ``size``; without ``spacing``, a trilinear resize to ``size``), ``intensity``
        scaling (:data:`INTENSITY_PRESETS`). ``slices`` K: the 2.5-D input of K axial slices
        (``size`` then is the square side, or ``(H, W)``; ``channels`` becomes K). ``tilt``:
        what a gantry-tilted series gets, ``refuse`` or ``correct``."""
        if slices is not None:
            side = (int(size),) * 2 if isinstance(size, int) else tuple(int(s) for s in size)[:2]
            prep = cls.build((side[1], side[0], 1), intensity=intensity, spacing=spacing)
            steps = [dict(t) for t in prep.transforms]
            steps[-1]["spatial_size"] = [side[1], side[0], -1]  # every slice kept
            return cls(
                size=side,
                channels=slices,
                mean=tuple(mean),
                std=tuple(std),
                transforms=tuple(steps),
                spacing=prep.spacing,
                intensity=intensity,
                slices=slices,
                tilt=tilt,
            )
        size = (int(size),) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
        steps: list[dict] = [{"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"}]
        if spacing is not None:
            spacing = tuple(float(s) for s in spacing)
            if len(spacing) != 3 or min(spacing) <= 0:
                raise ConfigError(f"spacing must be 3 positive mm values, got {spacing}")
            steps.append({"_target_": "Spacingd", "keys": "image", "pixdim": list(spacing),
                          "mode": "bilinear"})  # fmt: skip
        steps.append(_intensity_step(intensity))
        if spacing is not None:  # physical scale kept: pad or crop around the centre
            steps.append({"_target_": "ResizeWithPadOrCropd", "keys": "image",
                          "spatial_size": list(size)})  # fmt: skip
        else:
            steps.append({"_target_": "Resized", "keys": "image", "spatial_size": list(size),
                          "mode": "trilinear"})  # fmt: skip
        return cls(
            size=size,
            channels=channels,
            mean=tuple(mean),
            std=tuple(std),
            transforms=tuple(steps),
            spacing=spacing,
            intensity=intensity,
            tilt=tilt,
        )

    def __call__(self, volume: Volume) -> np.ndarray:
        """The normalised float32 ``(channels, *size)`` array for one volume."""
        return self.normalize(torch.from_numpy(self.prepare(volume))).numpy()

    def prepare(self, volume: Volume) -> np.ndarray:
        """The transforms applied: float32 ``(channels, *size)``, values about ``[0, 1]``."""
        if not isinstance(volume, Volume):
            raise ImageDecodeError(
                str(getattr(volume, "source", "image")),
                "is a 2-D image, but this run takes 3-D volumes; predict it with a 2-D run",
            )
        if "gantry_tilt" in volume.meta:
            if self.tilt != "correct":
                raise tilt_error(volume)
            volume = untilt(volume)
        self._check_size(volume)
        from monai.data import MetaTensor

        data = {
            "image": MetaTensor(
                torch.from_numpy(volume.array), affine=torch.from_numpy(volume.affine)
            )
        }
        for step in self._pipeline():
            data = step(data)
        out = torch.as_tensor(data["image"]).float()
        if self.slices is not None:
            out = self._slab(out[0])
        elif out.shape[0] != self.channels:
            if out.shape[0] == 1:
                out = out.expand(self.channels, *out.shape[1:])
            else:
                raise ImageDecodeError(
                    volume.source,
                    f"has {out.shape[0]} channels; this run takes {self.channels}",
                )
        if tuple(out.shape[1:]) != tuple(self.size):
            raise ImageDecodeError(
                volume.source, f"preprocessing gave {tuple(out.shape[1:])}, not {self.size}"
            )
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)

    def normalize(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel, for ``(C, X, Y, Z)`` or ``(B, C, X, Y, Z)`` tensors
        (with ``slices``: ``(C, H, W)`` or ``(B, C, H, W)``)."""
        shape = (-1, 1, 1) if self.slices is not None else (-1, 1, 1, 1)
        mean = torch.tensor(self.mean, dtype=tensor.dtype).view(shape)
        std = torch.tensor(self.std, dtype=tensor.dtype).view(shape)
        return (tensor - mean) / std

    def _slab(self, volume: torch.Tensor) -> torch.Tensor:
        """``slices`` adjacent axial planes around the middle of ``(X, Y, Z)``, as ``(K, H, W)``
        displayed (rows: Y from anterior down, columns: X); planes beyond the ends repeat."""
        z = volume.shape[-1]
        half = self.slices // 2
        index = torch.arange(z // 2 - half, z // 2 + half + 1).clamp_(0, z - 1)
        return volume[:, :, index].permute(2, 1, 0).flip(1).contiguous()

    @property
    def input_dims(self) -> int:
        """The model's input: 3 (volumes ``(C, X, Y, Z)``) or, with ``slices``, 2."""
        return 2 if self.slices is not None else 3

    def _pipeline(self) -> list:
        cached = self.__dict__.get("_built")
        if cached is None:
            cached = [_instantiate(step) for step in self.transforms]
            object.__setattr__(self, "_built", cached)
        return cached

    def _check_size(self, volume: Volume) -> None:
        if self.spacing is None:
            return
        target = [
            int(np.ceil(n * s / t)) for n, s, t in zip(volume.shape, volume.spacing, self.spacing)
        ]
        voxels = int(np.prod(target, dtype=np.int64))
        if voxels > MAX_VOXELS:
            factor = (voxels / MAX_VOXELS) ** (1 / 3)
            coarser = ",".join(f"{t * factor:.2g}" for t in self.spacing)
            raise DataError(
                f"{volume.source}: {'x'.join(map(str, volume.shape))} voxels at "
                f"{','.join(f'{s:.2g}' for s in volume.spacing)} mm would be "
                f"{'x'.join(map(str, target))} = {voxels:,} voxels at the target spacing "
                f"{','.join(f'{s:g}' for s in self.spacing)} mm, above {MAX_VOXELS:,}; "
                f"use a coarser spacing such as {coarser}"
            )

    def to_dict(self) -> dict:
        return {
            "dims": 3,
            "size": list(self.size),
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "spacing": list(self.spacing) if self.spacing is not None else None,
            "intensity": self.intensity,
            "slices": self.slices,
            "tilt": self.tilt,
            "transforms": [dict(t) for t in self.transforms],
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: dict) -> VolumePreprocess:
        known = set(cls.__dataclass_fields__) - {"window"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"preprocess: unknown field(s) {unknown}; is the run newer?")
        values = dict(data)
        for key in ("size", "mean", "std"):
            values[key] = (
                tuple(values[key]) if key in values else cls.__dataclass_fields__[key].default
            )
        if values.get("spacing") is not None:
            values["spacing"] = tuple(values["spacing"])
        values["transforms"] = tuple(dict(t) for t in values.get("transforms", ()))
        return cls(**values)

    def save(self, path: str | Path) -> None:
        """Write ``preprocess.json``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> VolumePreprocess:
        """Read ``preprocess.json``."""
        return cls.from_dict(json.loads(Path(path).read_text()))


#: The MONAI dictionary transforms a preprocess.json may name (applied without randomness).
_TRANSFORMS = (
    "Orientationd",
    "Spacingd",
    "ScaleIntensityRanged",
    "ScaleIntensityRangePercentilesd",
    "ScaleIntensityd",
    "NormalizeIntensityd",
    "ResizeWithPadOrCropd",
    "Resized",
    "CropForegroundd",
    "SpatialPadd",
    "CenterSpatialCropd",
)


def _instantiate(step: dict):
    import monai.transforms as mt

    kwargs = {k: v for k, v in step.items() if k != "_target_"}
    with warnings.catch_warnings():  # MONAI's notes on future defaults: not the user's concern
        warnings.simplefilter("ignore", FutureWarning)
        return getattr(mt, step["_target_"])(**kwargs)


# --------------------------------------------------------------------------- display


def volume_thumbnail(array: np.ndarray) -> np.ndarray:
    """Three orthogonal mid-slices of a ``(X, Y, Z)`` (or ``(C, X, Y, Z)``) array in ``[0, 1]``,
    side by side as one 2-D image (axial, coronal, sagittal; anterior/superior up), each
    plane padded to a common square."""
    if array.ndim == 4:
        array = array[0]
    x, y, z = array.shape
    planes = [
        np.flipud(array[:, :, z // 2].T),  # axial: X right, Y up
        np.flipud(array[:, y // 2, :].T),  # coronal: X right, Z up
        np.flipud(array[x // 2, :, :].T),  # sagittal: Y right, Z up
    ]
    side = max(max(p.shape) for p in planes)
    tiles = []
    for p in planes:
        tile = np.zeros((side, side), dtype=np.float32)
        r0, c0 = (side - p.shape[0]) // 2, (side - p.shape[1]) // 2
        tile[r0 : r0 + p.shape[0], c0 : c0 + p.shape[1]] = p
        tiles.append(tile)
    gap = np.ones((side, max(1, side // 16)), dtype=np.float32)
    return np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1)
