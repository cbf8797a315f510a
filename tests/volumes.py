"""Tiny volumes written on the fly for the 3-D tests: NIfTI files, DICOM series (with the
faults a series can have), and a MedMNIST3D-like ``.npz``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.conftest import write_dicom


def blob_volume(seed: int, size: int = 16, bright: bool = False) -> np.ndarray:
    """A noisy ``(size,)*3`` volume; ``bright`` adds a bright sphere off-centre (the lesion)."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(0.0, 20.0, (size,) * 3)
    if bright:
        grid = (
            np.indices((size,) * 3)
            - np.array([size // 3, size // 2, size // 2])[:, None, None, None]
        )
        volume[(grid**2).sum(0) <= (size // 4) ** 2] += 200.0
    return volume.astype(np.float32)


def write_nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))
    return path


def make_nifti_folders(root: Path, per_class: int = 6, size: int = 16) -> Path:
    """``root/{normal,lesion}/case_<i>.nii.gz``: lesions hold a bright sphere."""
    for label in ("normal", "lesion"):
        for i in range(per_class):
            seed = i + (1000 if label == "lesion" else 0)
            write_nifti(
                root / label / f"case_{i}.nii.gz", blob_volume(seed, size, label == "lesion")
            )
    return root


def write_series(
    folder: Path,
    volume: np.ndarray,
    *,
    spacing=(0.8, 0.8, 2.5),
    series_uid: str | None = None,
    skip: tuple[int, ...] = (),
    duplicate: int | None = None,
    tilt: float = 0.0,
    other_orientation: int | None = None,
    patient: str = "ID-0001",
) -> str:
    """Write ``volume`` (X, Y, Z; int16 HU) as an axial CT series, one file per Z slice, in
    shuffled file order; optionally leave slices out, repeat one, shift each slice along Y by
    ``tilt`` mm per slice (a gantry tilt), or give one slice another orientation. Returns the
    SeriesInstanceUID."""
    from pydicom.uid import generate_uid

    uid = series_uid or generate_uid()
    study = generate_uid()
    nz = volume.shape[2]
    order = np.random.default_rng(0).permutation(nz)
    for k in order:
        if k in skip:
            continue
        iop = [1, 0, 0, 0, 1, 0] if k != other_orientation else [1, 0, 0, 0, 0, -1]
        position = [0.0, k * tilt, k * spacing[2]]
        copies = 2 if k == duplicate else 1
        for c in range(copies):
            write_dicom(
                folder / f"slice_{k:03d}_{c}.dcm",
                volume[:, :, k].T - 1024,  # rows = Y, columns = X
                SeriesInstanceUID=uid,
                StudyInstanceUID=study,
                PatientID=patient,
                ImagePositionPatient=position,
                ImageOrientationPatient=iop,
                PixelSpacing=[spacing[1], spacing[0]],
                SliceThickness=spacing[2],
                RescaleSlope=1,
                RescaleIntercept=-1024 + 1024,
                InstanceNumber=int(k) + 1,
            )
    return uid


def make_npz3d(path: Path, n: dict[str, int] | None = None, size: int = 16) -> Path:
    """A MedMNIST3D-like ``.npz``: uint8 0/255 masks ``(N, D, H, W)`` whose class 1 is a larger
    ball than class 0."""
    n = n or {"train": 24, "val": 8, "test": 8}
    arrays = {}
    grid = np.indices((size,) * 3) - size / 2 + 0.5
    radius2 = (grid**2).sum(0)
    for split, count in n.items():
        labels = np.arange(count) % 2
        rng = np.random.default_rng(len(split))
        images = []
        for y in labels:
            r = (size / 5 if y == 0 else size / 2.8) + rng.uniform(-0.8, 0.8)
            images.append(np.where(radius2 <= r * r, 255, 0).astype(np.uint8))
        arrays[f"{split}_images"] = np.stack(images)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path
