"""3-D explanations: maps of volumes, overlays on three planes, scores against mask volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medsight import runs
from medsight.errors import ConfigError, DataError
from medsight.explain import Explainer
from medsight.explain.localisation import (
    box_iou,
    mask_box,
    pointing_game,
    region_from_map,
    score_localisation,
)
from medsight.models import create_model
from tests.volumes import blob_volume, write_nifti

SIZE = 16


def _lesion_mask(size: int = SIZE) -> np.ndarray:
    grid = (
        np.indices((size,) * 3) - np.array([size // 3, size // 2, size // 2])[:, None, None, None]
    )
    return ((grid**2).sum(0) <= (size // 4) ** 2).astype(np.uint8)


def write_volume_data(root: Path, n: int = 4, affine_flip: bool = False) -> Path:
    """Lesion volumes (a bright sphere) with their mask volumes, and normal volumes."""
    lines = ["path,label,patient_id,mask"]
    spacing = (1.0, 1.0, 1.0)
    for i in range(n):
        volume, mask = blob_volume(100 + i, SIZE, bright=True), _lesion_mask()
        if affine_flip:  # stored LPS: the reader's RAS orientation flips X and Y of both
            volume, mask = volume[::-1, ::-1].copy(), mask[::-1, ::-1].copy()
        _write(root / f"lesion_{i}.nii.gz", volume, affine_flip, spacing)
        _write(root / f"lesion_{i}_mask.nii.gz", mask, affine_flip, spacing)
        lines.append(f"lesion_{i}.nii.gz,lesion,P{i},lesion_{i}_mask.nii.gz")
        _write(root / f"normal_{i}.nii.gz", blob_volume(i, SIZE), affine_flip, spacing)
        lines.append(f"normal_{i}.nii.gz,normal,N{i},")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def _write(path: Path, array: np.ndarray, flip: bool, spacing) -> None:
    if not flip:
        write_nifti(path, array, spacing)
        return
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [SIZE - 1, SIZE - 1, 0]
    nib.save(nib.Nifti1Image(array, affine), str(path))


def write_volume_run(path: Path, data: Path, seed: int = 0) -> Path:
    """A 3-D run directory with a randomly initialised medcnn3d_s (what train writes, minus
    training)."""
    from medsight.config import DataConfig, ModelConfig, TrainConfig
    from medsight.data.volumes import VolumePreprocess

    torch.manual_seed(seed)
    model = create_model("medcnn3d_s", 2, in_chans=1)
    path.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(
        data=DataConfig(path=str(data)), model=ModelConfig(name="medcnn3d_s"), out=str(path)
    )
    runs.write_text(path / runs.CONFIG, config.to_yaml())
    runs.write_json(path / runs.MODEL, {**model.config(), "image_size": [SIZE] * 3})
    VolumePreprocess.build(SIZE, intensity="percentile").save(path / runs.PREPROCESS)
    runs.write_json(path / runs.CLASSES, {"classes": ["normal", "lesion"], "positive": "lesion"})
    runs.save_weights(path / runs.WEIGHTS, model.state_dict())
    return path


@pytest.fixture
def volume_run(tmp_path):
    data = write_volume_data(tmp_path / "data")
    return write_volume_run(tmp_path / "run", data), data


def test_geometry_scores_work_on_volumes():
    heat = np.zeros((8, 8, 8), np.float32)
    heat[2:4, 5:7, 1:3] = 1.0
    heat[7, 0, 7] = 0.9  # a separate voxel: not part of the largest region
    region = region_from_map(heat)
    assert region.sum() == 8 and not region[7, 0, 7]
    mask = np.zeros((8, 8, 8), bool)
    mask[2:4, 5:7, 1:4] = True
    assert mask_box(mask) == (2, 5, 1, 4, 7, 4)
    assert box_iou((2, 5, 1, 4, 7, 3), mask_box(mask)) == pytest.approx(8 / 12)
    assert pointing_game(heat, mask) and not pointing_game(heat, ~mask)
    # a mask at twice the map's resolution is sampled onto the map's grid
    assert pointing_game(heat, mask.repeat(2, 0).repeat(2, 1).repeat(2, 2))


def test_a_volume_is_explained_as_a_volume_and_shown_on_three_planes(volume_run, tmp_path):
    from PIL import Image

    from medsight.explain.files import explain_files

    run, data = volume_run
    notes = []
    records = explain_files(run, [data.parent / "lesion_0.nii.gz"], tmp_path / "why",
                            note=notes.append)  # fmt: skip
    record = records[0]
    # never scored against masks: a volume's default is Grad-CAM++ on the first stage
    assert (record["method"], record["layer"]) == ("gradcam++", "backbone.stem")
    assert record["chosen_by"] == "default" and "no maps scored" in notes[0]
    heatmap = np.load(tmp_path / "why" / record["map"])
    assert heatmap.shape == (SIZE,) * 3 and float(heatmap.max()) == pytest.approx(1.0)
    assert record["overlay"] == "lesion_0_gradcam++.png"
    with Image.open(tmp_path / "why" / record["overlay"]) as picture:
        assert picture.size == (3 * 256 + 8, 256)  # axial, coronal, sagittal side by side
    with pytest.raises(DataError, match="cannot be explained.*NIfTI volume"):
        (tmp_path / "flat.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        explain_files(run, [tmp_path / "flat.png"], tmp_path / "why")


def test_volume_maps_are_scored_against_mask_volumes(volume_run):
    run, data = volume_run
    result = score_localisation(run, data, methods=["gradcam", "ig"], split=None, faithfulness=2)
    assert result["n_images"] == 4 and result["lesion_classes"] == ["lesion"]
    for entry in result["methods"].values():
        for key in ("pointing_game", "box_iou", "energy_in_mask"):
            assert 0.0 <= entry[key]["value"] <= 1.0
    assert "spearman" in result["sanity"]["gradcam"]
    saved = json.loads((run / runs.LOCALISATION).read_text())
    assert saved["best_method"] in ("gradcam", "ig")
    explainer = Explainer.from_run(run)
    assert explainer.chosen_by == "scored" and explainer.method == saved["best_method"]
    # the report draws each volume's map on three planes, wide, without the boxes' legend
    from medsight.evaluation.evaluate import evaluate_run
    from medsight.evaluation.report import write_report

    lines = data.read_text().splitlines()  # the same volumes, as a test split
    tested = data.parent / "tested.csv"
    tested.write_text("\n".join([lines[0] + ",split", *(f"{x},test" for x in lines[1:])]) + "\n")
    evaluate_run(run, data=tested, n_bootstrap=20)
    section = write_report(run).read_text().split('id="explanations"')[1].split("</section>")[0]
    assert "axial, coronal and sagittal planes through the map's maximum" in section
    assert 'class="gallery volumes"' in section and "box-key" not in section


def test_mask_volumes_follow_the_volume_orientation(tmp_path):
    from medsight.data.volumes import VolumePreprocess, read_volume
    from medsight.explain.localisation import _volume_mask

    plain = write_volume_data(tmp_path / "ras", n=1)
    flipped = write_volume_data(tmp_path / "lps", n=1, affine_flip=True)
    prep = VolumePreprocess.build(SIZE, intensity="percentile")
    masks = [_volume_mask(prep, read_volume(str(d.parent / "lesion_0_mask.nii.gz")))
             for d in (plain, flipped)]  # fmt: skip
    assert masks[0].sum() > 0 and np.array_equal(masks[0], masks[1])
    assert np.array_equal(masks[0], _lesion_mask().astype(bool))


def test_3d_bad_input_is_refused_with_the_fix(volume_run, tmp_path):
    run, data = volume_run
    model = create_model("medcnn3d_s", 2, in_chans=1)
    with pytest.raises(ConfigError, match="scorecam maps images only.*gradcam, gradcam\\+\\+"):
        Explainer(model, "scorecam")
    with pytest.raises(ConfigError, match=r"no spatial map for a 28×28×28 input.*stage1 \(7×7×7\)"):
        Explainer(model, "gradcam", layer="head")
    explainer = Explainer.from_run(run, method="gradcam")
    with pytest.raises(DataError, match=r"one preprocessed volume shaped \(1, 1, 16, 16, 16\)"):
        explainer.explain(np.zeros((1, 1, 16, 16), np.float32))
    # a mask volume of another shape than its image, aspect kept: resized with a warning
    write_nifti(data.parent / "lesion_0_mask.nii.gz",
                _lesion_mask().repeat(2, 0).repeat(2, 1).repeat(2, 2))  # fmt: skip
    with pytest.warns(UserWarning, match="1 mask.*resized"):
        result = score_localisation(run, data, methods=["gradcam"], split=None, faithfulness=0,
                                    write=False)  # fmt: skip
    assert result["n_resized_masks"] == 1
    write_nifti(data.parent / "lesion_0_mask.nii.gz", _lesion_mask().repeat(2, 0))
    with pytest.raises(DataError, match=r"lesion_0.nii.gz is 32×16×16 voxels but the image is"):
        score_localisation(run, data, methods=["gradcam"], split=None, write=False)
