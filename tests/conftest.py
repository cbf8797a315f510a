"""Shared test helpers: tiny images written on the fly, and the optional real data in ../shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _fixed_salt(monkeypatch):
    # Pseudonyms must not depend on (or create) a salt file in the tester's home folder.
    monkeypatch.setenv("MEDSIGHT_SALT", "test-salt")


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; tests using it are skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not available")
    return SHARED_DATA


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array (H×W or H×W×3) as PNG, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def random_image(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def make_class_folders(
    root: Path, layout: dict[str, int], seed: int = 0, ext: str = ".png"
) -> Path:
    """``{"normal": 3, "pneumonia": 2}`` → root/<class>/<class>_<i>.png with distinct pixels."""
    k = seed * 1000
    for label, count in layout.items():
        for i in range(count):
            k += 1
            write_png(root / label / f"{label}_{i}{ext}", random_image(k))
    return root


def write_dicom(path: Path, pixels: np.ndarray, **tags) -> Path:
    """Write a small single-frame grayscale DICOM file (signed 16-bit unless told otherwise)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = "ID-0001"
    ds.PatientName = "Doe^Jane"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    for key, value in tags.items():
        setattr(ds, key, value)
    dtype = np.int16 if ds.PixelRepresentation == 1 else np.uint16
    ds.PixelData = np.asarray(pixels, dtype=dtype).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_two_class_manifest(root: Path, n_patients=12, per_patient=2, size=16, sites=None) -> Path:
    """Bright ("lesion") vs dark ("normal") noisy squares with patients, sex and site columns:
    a small CNN separates them in a few epochs."""
    rng = np.random.default_rng(0)
    lines = ["path,label,patient_id,sex,site"]
    for p in range(n_patients):
        label = "lesion" if p % 2 else "normal"
        sex = "F" if p % 3 else "M"
        site = (sites or ["a", "b"])[p % len(sites or ["a", "b"])]
        for i in range(per_patient):
            base = 170 if label == "lesion" else 80
            pixels = np.clip(rng.normal(base, 25, (size, size)), 0, 255).astype(np.uint8)
            rel = f"img/{label}_{p}_{i}.png"
            write_png(root / rel, pixels)
            lines.append(f"{rel},{label},P{p},{sex},{site}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


#: Every label text :func:`make_findings_manifest` data can read as (``?dark``: uncertain).
FINDINGS_LABELS = {"bright", "dark", "bright|dark", "no finding", "?dark", "bright|?dark"}


def make_findings_manifest(root: Path, n_patients=16, per_patient=2, size=16) -> Path:
    """Two findings on noisy gray squares: "bright" (a bright top-left block) and "dark" (a dark
    bottom-right block), each, both or neither; patients and sex columns; the manifest names the
    findings as 0/1 columns (read with ``labels="bright,dark"``) with a mask of each finding
    present (``bright_mask_path``, ``dark_mask_path``). Every fifth patient's "dark" is
    uncertain (-1)."""
    rng = np.random.default_rng(0)
    lines = ["path,patient_id,sex,bright,dark,bright_mask_path,dark_mask_path"]
    half = size // 2
    for p in range(n_patients):
        for i in range(per_patient):
            bright, dark = (p + i) % 2, (p // 2 + i) % 2
            pixels = rng.normal(120, 15, (size, size))
            if bright:
                pixels[:half, :half] += 90
            if dark:
                pixels[half:, half:] -= 90
            rel = f"img/{p}_{i}.png"
            write_png(root / rel, np.clip(pixels, 0, 255).astype(np.uint8))
            masks = []
            for name, present, block in (
                ("bright", bright, (slice(None, half), slice(None, half))),
                ("dark", dark, (slice(half, None), slice(half, None))),
            ):
                if not present:
                    masks.append("")
                    continue
                mask = np.zeros((size, size), dtype=np.uint8)
                mask[block] = 255
                write_png(root / f"mask/{name}_{p}_{i}.png", mask)
                masks.append(f"mask/{name}_{p}_{i}.png")
            dark_text = "-1" if p % 5 == 4 else str(dark)
            sex = "F" if p % 3 else "M"
            lines.append(f"{rel},P{p},{sex},{bright},{dark_text},{masks[0]},{masks[1]}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def tiny_train_config(data, out, **optim):
    """medcnn_s on ``data`` for 2 epochs of batches of 8 (``optim`` overrides), into ``out``."""
    from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

    settings = {"epochs": 2, "batch_size": 8, "lr": 3e-3, "patience": 10, **optim}
    return TrainConfig(
        data=DataConfig(path=str(data), ratios=(0.5, 0.25, 0.25)),
        model=ModelConfig(name="medcnn_s"),
        optim=OptimConfig(**settings),
        out=str(out),
    )


def train_tiny_run(root: Path, attention: str = "none") -> tuple[Path, list[Path]]:
    """A 2-epoch medcnn_s trained under ``root`` on two-class squares, and six of its images."""
    from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
    from medsight.training.trainer import train

    data = make_two_class_manifest(root / "data", 10, 2, 16)
    config = TrainConfig(
        data=DataConfig(path=str(data), ratios=(0.5, 0.25, 0.25)),
        model=ModelConfig(name="medcnn_s", attention=attention),
        optim=OptimConfig(epochs=2, batch_size=8, lr=3e-3),
        out=str(root / "run"),
    )
    run = train(config, show_progress=False)
    return run.path, sorted((data / "img").glob("*.png"))[:6]


def write_run(
    path: Path,
    data: Path,
    *,
    name: str = "medcnn_s",
    attention: str = "none",
    classes: tuple[str, ...] = ("normal", "lesion"),
    size: int = 16,
    seed: int = 0,
    model=None,
) -> Path:
    """A run directory with a randomly initialised model (or ``model``, a network of ``name``
    with ``attention``): what ``train`` writes, minus training."""
    import torch

    from medsight import runs
    from medsight.config import DataConfig, ModelConfig, TrainConfig
    from medsight.data.transforms import Preprocess
    from medsight.models import create_model

    if model is None:
        torch.manual_seed(seed)
        model = create_model(name, len(classes), in_chans=1, attention=attention)
    path.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(
        data=DataConfig(path=str(data)),
        model=ModelConfig(name=name, attention=attention),
        out=str(path),
    )
    runs.write_text(path / runs.CONFIG, config.to_yaml())
    runs.write_json(path / runs.MODEL, {**model.config(), "image_size": [size, size]})
    Preprocess(size=(size, size)).save(path / runs.PREPROCESS)
    runs.write_json(path / runs.CLASSES, {"classes": list(classes), "positive": classes[-1]})
    runs.save_weights(path / runs.WEIGHTS, model.state_dict())
    return path


@pytest.fixture
def helpers():
    """The helper functions above, for tests that build their own data."""

    class Helpers:
        pass

    h = Helpers()
    h.write_png = write_png
    h.random_image = random_image
    h.make_class_folders = make_class_folders
    h.write_dicom = write_dicom
    h.make_two_class_manifest = make_two_class_manifest
    h.make_findings_manifest = make_findings_manifest
    return h


def wait_for(condition, seconds: float = 60, what: str = "the condition", every: float = 0.1):
    """``condition()``'s first true value, polled every ``every`` s (servers and threads
    answer in their own time); an AssertionError naming ``what`` after ``seconds``."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what} did not happen within {seconds} s")
