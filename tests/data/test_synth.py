"""The phantom dataset: layout, manifest, determinism, masks, patients and argument checks."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull

from medsight.data.synth import CLASSES, PatientAnatomy, make_phantom, write_phantom_dataset
from medsight.errors import ConfigError

COLUMNS = ["path", "label", "patient_id", "mask", "sex", "age", "site"]


def read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def load(root: Path, relative: str) -> np.ndarray:
    with Image.open(root / relative) as image:
        assert image.mode == "L"
        return np.asarray(image)


def solidity(mask: np.ndarray) -> float:
    """Mask area over the area of its convex hull: 1 for a convex blob, lower when spiky."""
    pts = np.argwhere(mask > 0).astype(float)
    corners = np.concatenate([pts + d for d in ([0, 0], [0, 1], [1, 0], [1, 1])])
    return float((mask > 0).sum() / ConvexHull(corners).volume)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """n=60, size=32, seed=0; returns the folder."""
    out = tmp_path_factory.mktemp("phantom") / "data"
    write_phantom_dataset(out, n=60, size=32, seed=0)
    return out


@pytest.fixture(scope="module")
def rows(phantom: Path) -> list[dict[str, str]]:
    return read_manifest(phantom / "manifest.csv")


def test_writes_exactly_n_images_over_three_classes(phantom, rows):
    assert len(rows) == 60
    for label in CLASSES:
        on_disk = sorted(p.name for p in (phantom / label).glob("*.png"))
        listed = sorted(Path(r["path"]).name for r in rows if r["label"] == label)
        assert on_disk == listed
        assert len(listed) > 0
        assert len(list((phantom / "masks" / label).glob("*.png"))) == len(listed)


def test_class_shares_are_near_40_30_30(tmp_path):
    rows = read_manifest(write_phantom_dataset(tmp_path / "d", n=300, size=32, seed=3))
    shares = [sum(r["label"] == c for r in rows) / len(rows) for c in CLASSES]
    assert shares == pytest.approx([0.4, 0.3, 0.3], abs=0.05)


def test_manifest_columns_and_every_file_exist(phantom, rows):
    with (phantom / "manifest.csv").open() as f:
        assert f.readline().rstrip("\n") == ",".join(COLUMNS)
    for r in rows:
        name = Path(r["path"]).name
        assert r["path"] == f"{r['label']}/{name}"
        assert r["mask"] == f"masks/{r['label']}/{name}"
        assert re.fullmatch(r"P\d{4}_\d{2}\.png", name)
        assert load(phantom, r["path"]).shape == (32, 32)
        assert load(phantom, r["mask"]).shape == (32, 32)
        assert r["sex"] in {"F", "M"}
        assert 20 <= int(r["age"]) <= 90
        assert r["site"] in {"site_a", "site_b", "site_c"}


def test_same_seed_gives_byte_identical_files(phantom, tmp_path):
    write_phantom_dataset(tmp_path / "again", n=60, size=32, seed=0)
    assert all_files(tmp_path / "again") == all_files(phantom)


def test_different_seed_gives_different_data(phantom, tmp_path):
    write_phantom_dataset(tmp_path / "other", n=60, size=32, seed=1)
    first, other = all_files(phantom), all_files(tmp_path / "other")
    assert first["manifest.csv"] != other["manifest.csv"]
    shared = [k for k in first.keys() & other.keys() if not k.startswith("masks/")]
    assert all(first[k] != other[k] for k in shared if k.endswith(".png"))


def test_masks_are_binary_empty_for_normal_and_present_for_lesions(phantom, rows):
    for r in rows:
        mask = load(phantom, r["mask"])
        assert set(np.unique(mask)) <= {0, 255}
        if r["label"] == "normal":
            assert not mask.any()
        else:
            assert (mask == 255).sum() >= 4


def test_lesions_lie_inside_the_body(phantom, rows):
    for r in rows:
        if r["label"] == "normal":
            continue
        image = load(phantom, r["path"]).astype(float)
        mask = load(phantom, r["mask"]) > 0
        background = np.concatenate([image[:3, :3], image[:3, -3:], image[-3:, :3]]).mean()
        assert image[mask].mean() > background + 60
        # Never touching the image border, which lies outside the body.
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def test_patients_have_several_images_one_label_and_fixed_metadata(rows):
    patients: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        patients.setdefault(r["patient_id"], []).append(r)
    assert len(patients) >= 10
    for images in patients.values():
        assert 2 <= len(images) <= 6
        for key in ("label", "sex", "age", "site"):
            assert len({r[key] for r in images}) == 1


def test_slices_of_one_patient_are_alike_but_not_identical(phantom, rows):
    first = [r["path"] for r in rows if r["patient_id"] == rows[0]["patient_id"]]
    other = next(r["path"] for r in rows if r["patient_id"] != rows[0]["patient_id"])
    a, b, c = (load(phantom, p).astype(float) for p in (first[0], first[1], other))
    assert not np.array_equal(a, b)
    assert np.abs(a - b).mean() < np.abs(a - c).mean()


def test_progress_counts_every_image(tmp_path):
    seen: list[int] = []
    write_phantom_dataset(tmp_path / "d", n=45, size=32, seed=0, progress=seen.append)
    assert sum(seen) == 45
    assert all(2 <= k <= 6 for k in seen)


@pytest.mark.parametrize("n", range(30, 42))
def test_no_patient_is_left_with_a_single_image(tmp_path, n):
    seen: list[int] = []
    write_phantom_dataset(tmp_path / "d", n=n, size=32, seed=n, progress=seen.append)
    assert sum(seen) == n
    assert min(seen) >= 2


def test_overwrites_a_previous_phantom_dataset_without_stale_files(tmp_path):
    out = tmp_path / "d"
    write_phantom_dataset(out, n=90, size=32, seed=0)
    write_phantom_dataset(out, n=40, size=32, seed=1)
    images = [p for c in CLASSES for p in (out / c).glob("*.png")]
    assert len(images) == 40
    assert len(read_manifest(out / "manifest.csv")) == 40


def test_refuses_a_non_empty_folder_that_is_not_a_phantom_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="out="):
        write_phantom_dataset(tmp_path, n=30, size=32)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "normal").exists()


@pytest.mark.parametrize("n", [0, 29, 40.0, "100", True])
def test_bad_n_is_a_config_error_naming_n(tmp_path, n):
    with pytest.raises(ConfigError, match=r"n=.*at least 30"):
        write_phantom_dataset(tmp_path / "d", n=n, size=32)


@pytest.mark.parametrize("size", [16, 31, 513, 64.0])
def test_bad_size_is_a_config_error_naming_size(tmp_path, size):
    with pytest.raises(ConfigError, match=r"size=.*32 to 512"):
        write_phantom_dataset(tmp_path / "d", n=60, size=size)
    with pytest.raises(ConfigError, match="size="):
        make_phantom(np.random.default_rng(0), size, "normal")


def test_unknown_label_is_a_config_error():
    with pytest.raises(ConfigError, match="label='cyst'"):
        make_phantom(np.random.default_rng(0), 64, "cyst")


@pytest.mark.parametrize("size", [32, 64, 100])
def test_make_phantom_returns_uint8_image_and_mask(size):
    image, mask = make_phantom(np.random.default_rng(0), size, "benign")
    assert image.shape == mask.shape == (size, size)
    assert image.dtype == mask.dtype == np.uint8
    assert mask.max() == 255


def test_benign_lesions_are_round_and_malignant_ones_spiky():
    benign = [solidity(make_phantom(np.random.default_rng(i), 96, "benign")[1]) for i in range(8)]
    malignant = [
        solidity(make_phantom(np.random.default_rng(i), 96, "malignant")[1]) for i in range(8)
    ]
    assert min(benign) > 0.85
    assert max(malignant) < 0.8


def test_lesions_are_visible_but_not_saturated_white_blobs():
    """Lesions stand out from the tissue around them by a moderate contrast, never clipped."""
    for i in range(12):
        label = CLASSES[1 + i % 2]
        image, mask = make_phantom(np.random.default_rng(i), 96, label)
        lesion = mask > 0
        ring = ndimage.binary_dilation(lesion, iterations=4) & ~ndimage.binary_dilation(lesion)
        contrast = image[lesion].mean() - np.median(image[ring])
        assert 15 < contrast < 120, (label, i, contrast)
        assert (image[lesion] == 255).mean() < 0.05


def test_lesions_add_little_global_brightness():
    """Image means must not give the class away: lesions shift them far less than anatomy does."""
    means: dict[str, list[float]] = {c: [] for c in CLASSES}
    for i in range(20):
        patient = PatientAnatomy.sample(np.random.default_rng(i))
        for label in CLASSES:
            image, _ = make_phantom(np.random.default_rng(100 + i), 64, label, patient)
            means[label].append(float(image.mean()))
    normal = np.asarray(means["normal"])
    for label in ("benign", "malignant"):
        shift = np.mean(np.asarray(means[label]) - normal)
        assert 0 < shift < normal.std()
