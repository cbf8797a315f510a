"""The 3-D phantom volumes: NIfTI files with a lesion mask per lesion volume, a manifest that
reads back as a 3-D table, deterministic for a seed."""

from __future__ import annotations

import numpy as np
import pytest

from medsight.data.sources import load_samples
from medsight.data.synth import VOLUME_CLASSES, write_phantom_volumes
from medsight.data.volumes import read_volume
from medsight.errors import ConfigError


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_volumes(tmp_path_factory.mktemp("p3d") / "set", n=12, size=16, seed=3)


def test_manifest_reads_back_as_a_3d_table(phantoms):
    table = load_samples(phantoms)
    assert table.attrs["dims"] == 3 and len(table) == 12
    assert table["label"].value_counts().to_dict() == {"normal": 6, "lesion": 6}
    assert set(table["label"]) == set(VOLUME_CLASSES)
    assert table["patient_id"].is_unique
    lesion = table["label"] == "lesion"
    assert table.loc[lesion, "mask"].notna().all()
    assert table.loc[~lesion, "mask"].isna().all()  # no mask without a lesion
    header = phantoms.read_text().splitlines()[0]
    assert header == "path,label,patient_id,mask,sex,age,site"


def test_volumes_have_their_geometry(phantoms):
    volume = read_volume(str(phantoms.parent / "normal" / next(
        p.name for p in (phantoms.parent / "normal").iterdir()
    )))  # fmt: skip
    assert volume.array.shape == (1, 16, 16, 16)
    assert volume.spacing == (4.0, 4.0, 4.0) and volume.orientation == "RAS"


def test_each_mask_marks_its_volumes_bright_lesion(phantoms):
    import nibabel as nib

    table = load_samples(phantoms)
    for _, row in table[table["label"] == "lesion"].iterrows():
        image, mask = nib.load(row["source"]), nib.load(row["mask"])
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
        voxels, inside = image.get_fdata(), mask.get_fdata() > 0
        assert 0 < inside.sum() < inside.size // 20
        outside = voxels[~inside]
        # the mask's voxels are the bright ones: brighter than nearly every other voxel
        assert voxels[inside].mean() > np.percentile(outside, 99)
        assert voxels[inside].mean() > np.median(outside[outside > -500]) + 80
    for _, row in table[table["label"] == "normal"].iterrows():
        voxels = nib.load(row["source"]).get_fdata()
        assert voxels.max() < 100 + 120  # no lesion-bright voxels without a lesion


def test_same_seed_same_bytes_other_seed_other_volumes(phantoms, tmp_path):
    again = write_phantom_volumes(tmp_path / "again", n=12, size=16, seed=3)
    files = sorted(p.relative_to(phantoms.parent) for p in phantoms.parent.rglob("*.*"))
    assert files == sorted(p.relative_to(again.parent) for p in again.parent.rglob("*.*"))
    for name in files:
        assert (phantoms.parent / name).read_bytes() == (again.parent / name).read_bytes()
    other = write_phantom_volumes(tmp_path / "other", n=12, size=16, seed=4)
    assert other.read_text() != phantoms.read_text()


def test_rewrites_a_phantom_set_and_refuses_other_folders_and_values(tmp_path):
    out = tmp_path / "set"
    write_phantom_volumes(out, n=8, size=8)
    write_phantom_volumes(out, n=10, size=8)  # a previous set is replaced
    assert len(load_samples(out / "manifest.csv")) == 10
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a phantom dataset"):
        write_phantom_volumes(tmp_path / "mine", n=8, size=8)
    with pytest.raises(ConfigError, match="n=3 is not allowed"):
        write_phantom_volumes(tmp_path / "x", n=3)
    with pytest.raises(ConfigError, match="size=4 is out of range"):
        write_phantom_volumes(tmp_path / "x", size=4)


def test_cli_writes_3d_phantoms(tmp_path):
    from typer.testing import CliRunner

    from medsight.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "s"), "--3d", "--n", "8",
                                 "--size", "8"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote 8 volumes of 8x8x8 voxels" in result.output
    assert len(load_samples(tmp_path / "s" / "manifest.csv")) == 8
    both = runner.invoke(app, ["data", "synth", str(tmp_path / "t"), "--3d", "--multilabel"])
    assert both.exit_code == 2 and "give one" in both.output
