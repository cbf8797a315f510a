"""Boxes in `data check` and the detection phantoms of `data synth --detect`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from medsight.cli import app
from medsight.data.boxes import boxes_from_masks, boxes_json, mark_detection, parse_boxes
from medsight.data.checks import check_samples, detection_summary
from medsight.data.sources import load_samples
from medsight.data.synth import DETECT_CLASSES, write_detection_phantoms
from tests.conftest import random_image, write_png


def _hand_made(tmp_path: Path) -> pd.DataFrame:
    """Four 32x32 images with known box problems."""
    boxes = [
        # two "a" boxes that are one box drawn twice (IoU 0.97), and one "b"
        [[0, 0, 10, 10, "a"], [0, 0, 10, 10.3, "a"], [12, 12, 20, 20, "b"]],
        # one reaching outside the image, one of zero area
        [[25, 25, 40, 30, "a"], [5, 5, 5, 9, "b"]],
        [],
        [[1, 1, 4, 4, "b"]],
    ]
    rows = []
    for k, found in enumerate(boxes):
        source = write_png(tmp_path / f"{k}.png", random_image(k, 32))
        rows.append(
            {
                "sample_id": f"{k}.png",
                "source": str(source),
                "label": "|".join(sorted({b[4] for b in found})) or "no finding",
                "patient_id": None,
                "split": ["train", "train", "val", None][k],
                "boxes": boxes_json(found),
                "width": 32,
                "height": 32,
            }
        )
    return mark_detection(pd.DataFrame(rows), ["a", "b"])


def test_detection_summary_counts_boxes_and_their_problems(tmp_path):
    summary = detection_summary(_hand_made(tmp_path))
    assert summary["boxes"] == 6 and summary["images"] == 4
    assert summary["boxes_per_image"] == {"mean": 1.5, "max": 3}
    assert summary["images_without_boxes"] == 1
    assert summary["boxes_per_class"] == {
        "all": {"a": 3, "b": 3},
        "train": {"a": 3, "b": 2},
        "val": {"a": 0, "b": 0},
        "unassigned": {"a": 0, "b": 1},
    }
    assert summary["images_per_class"] == {"a": 2, "b": 3}
    assert [o["sample_id"] for o in summary["outside"]] == ["1.png"]
    assert summary["zero_area"] == [{"sample_id": "1.png", "box": [5.0, 5.0, 5.0, 9.0, "b"]}]
    (pair,) = summary["duplicate_boxes"]
    assert pair["sample_id"] == "0.png" and pair["iou"] == pytest.approx(0.971, abs=1e-3)


def test_check_report_of_boxes_is_unclean_and_in_the_json(tmp_path):
    report = check_samples(_hand_made(tmp_path))
    assert report.detection is not None and report.multilabel is None
    assert report.classes == {"a": 2, "b": 3}  # images where each class is present
    assert not report.clean  # boxes outside, of zero area, duplicated
    json.dumps(report.to_dict())


def test_data_check_prints_and_writes_box_counts(tmp_path):
    csv = write_detection_phantoms(tmp_path / "set", n=30, size=32, seed=1)
    out = tmp_path / "check.json"
    result = CliRunner().invoke(app, ["data", "check", str(csv.parent), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "Boxes per class and split" in result.output
    assert "boxes per image: mean" in result.output
    document = json.loads(out.read_text())
    assert document["format"] == "boxes"
    assert document["detection"]["images"] == 30
    assert set(document["detection"]["boxes_per_class"]["all"]) == set(DETECT_CLASSES)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_detection_phantoms_are_deterministic(tmp_path):
    write_detection_phantoms(tmp_path / "a", n=30, size=32, seed=3, splits=True)
    write_detection_phantoms(tmp_path / "b", n=30, size=32, seed=3, splits=True)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    write_detection_phantoms(tmp_path / "c", n=30, size=32, seed=4, splits=True)
    assert _files(tmp_path / "a") != _files(tmp_path / "c")


def test_detection_phantom_boxes_are_tight_on_their_masks(tmp_path):
    csv = write_detection_phantoms(tmp_path / "set", n=40, size=64, seed=0, splits=True)
    table = load_samples(csv)  # a box CSV, read as detection
    assert table.attrs["format"] == "boxes" and table.attrs["classes"] == sorted(DETECT_CLASSES)
    assert len(table) == 40 and set(table["split"]) == {"train", "val", "test"}
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    counts = [len(parse_boxes(b)) for b in table["boxes"]]
    assert min(counts) == 0 and max(counts) >= 2  # negatives and several lesions per image
    derived = boxes_from_masks(table, class_name="lesion")
    for written, found in zip(table["boxes"], derived["boxes"]):
        assert sorted(b[:4] for b in parse_boxes(written)) == sorted(
            b[:4] for b in parse_boxes(found)
        )
    sides = [min(b[2] - b[0], b[3] - b[1]) for t in table["boxes"] for b in parse_boxes(t)]
    assert min(sides) >= 5  # a detector can find them at 64 px
    with Image.open(table.loc[0, "source"]) as image:
        assert image.size == (64, 64)


def test_a_negative_phantom_has_one_row_without_corners(tmp_path):
    csv = write_detection_phantoms(tmp_path / "set", n=30, size=32, seed=2)
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    negatives = frame[frame["x1"] == ""]
    assert len(negatives) and (negatives[["y1", "x2", "y2", "label"]] == "").all().all()
    assert not negatives["path"].duplicated().any()
    masks = [np.asarray(Image.open(csv.parent / m)) for m in negatives["mask"]]
    assert all(m.max() == 0 for m in masks)


def test_synth_detect_flag_writes_a_box_csv(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app, ["data", "synth", str(tmp_path / "d"), "--detect", "--n", "30", "--size", "32"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d" / "manifest.csv").read_text().startswith("path,x1,y1,x2,y2,label")
    both = runner.invoke(app, ["data", "synth", str(tmp_path / "e"), "--detect", "--multilabel"])
    assert both.exit_code == 2 and "give one" in both.output
