"""Images with boxes: the four readers agree, masks give boxes, and bad boxes are named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medsight.data.boxes import (
    box_targets,
    boxes_from_masks,
    boxes_json,
    is_detection,
    max_box_count,
    parse_boxes,
    read_box_csv,
    read_coco,
    read_voc,
    read_yolo,
    require_boxes,
)
from medsight.data.sources import load_samples
from medsight.data.splits import assign_splits, kfold_assignments, max_folds
from medsight.errors import DataError
from tests.conftest import random_image, write_png

CLASSES = ["cell", "spot"]
W, H = 64, 48
# Corners on a 1/8 px grid: exact in binary, so YOLO's normalised numbers convert back exactly.
BOXES = {
    "a.png": [[4.0, 8.0, 20.0, 24.0, "cell"], [30.5, 2.0, 40.0, 10.25, "spot"]],
    "b.png": [[0.0, 0.0, 64.0, 48.0, "cell"]],
    "c.png": [],  # a negative: kept, without boxes
}


def _images(root: Path) -> None:
    for k, name in enumerate(BOXES):
        write_png(root / name, random_image(k, 64)[:H, :W])


def write_coco(root: Path, boxes=BOXES, categories=CLASSES) -> Path:
    _images(root / "images")
    images, annotations = [], []
    for k, (name, found) in enumerate(boxes.items(), start=1):
        images.append({"id": k, "file_name": name, "width": W, "height": H})
        for x1, y1, x2, y2, cls in found:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": k,
                    "category_id": categories.index(cls) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                }
            )
    document = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": c} for i, c in enumerate(categories)],
    }
    path = root / "annotations.json"
    path.write_text(json.dumps(document))
    return path


def write_yolo(root: Path, boxes=BOXES) -> Path:
    _images(root / "images")
    (root / "labels").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for name, found in boxes.items():
        lines = [
            f"{CLASSES.index(c)} {(x1 + x2) / 2 / W} {(y1 + y2) / 2 / H} {(x2 - x1) / W} "
            f"{(y2 - y1) / H}"
            for x1, y1, x2, y2, c in found
        ]
        (root / "labels" / Path(name).with_suffix(".txt")).write_text("\n".join(lines))
    return root


def write_voc(root: Path, boxes=BOXES, splits: dict | None = None) -> Path:
    _images(root / "JPEGImages")
    (root / "Annotations").mkdir(parents=True)
    for name, found in boxes.items():
        objects = "".join(
            f"<object><name>{c}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for x1, y1, x2, y2, c in found
        )
        (root / "Annotations" / Path(name).with_suffix(".xml")).write_text(
            f"<annotation><filename>{name}</filename><size><width>{W}</width>"
            f"<height>{H}</height><depth>1</depth></size>{objects}</annotation>"
        )
    for split, names in (splits or {}).items():
        (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def write_csv(root: Path, boxes=BOXES) -> Path:
    _images(root)
    lines = ["path,x1,y1,x2,y2,label"]
    for name, found in boxes.items():
        lines += [f"{name},{x1},{y1},{x2},{y2},{c}" for x1, y1, x2, y2, c in found]
        if not found:
            lines.append(f"{name},,,,,")
    (root / "boxes.csv").write_text("\n".join(lines) + "\n")
    return root / "boxes.csv"


def _view(table: pd.DataFrame) -> list:
    return [
        (Path(s).name, lab, parse_boxes(b), w, h)
        for s, lab, b, w, h in zip(
            table["sample_id"], table["label"], table["boxes"], table["width"], table["height"]
        )
    ]


EXPECTED = [
    ("a.png", "cell|spot", BOXES["a.png"], W, H),
    ("b.png", "cell", BOXES["b.png"], W, H),
    ("c.png", "no finding", [], W, H),
]


@pytest.mark.parametrize(
    ("writer", "fmt"),
    [(write_coco, "coco"), (write_yolo, "yolo"), (write_voc, "voc"), (write_csv, "boxes")],
)
def test_every_box_format_reads_to_the_same_table(tmp_path, writer, fmt):
    path = writer(tmp_path / "set")
    table = load_samples(path)  # the format is detected from the path
    assert table.attrs["format"] == fmt
    assert is_detection(table)
    assert table.attrs["classes"] == CLASSES
    assert _view(table) == EXPECTED
    assert all(Path(s).is_file() for s in table["source"])


def test_yolo_normalised_numbers_convert_to_exact_pixels(tmp_path):
    root = tmp_path / "yolo"
    write_yolo(root, {"a.png": [], "b.png": [], "c.png": []})
    (root / "labels" / "a.txt").write_text("1 0.5 0.5 0.25 0.5\n0 0.1 0.2 0.1 0.2\n")
    table = read_yolo(root)
    assert parse_boxes(table.loc[0, "boxes"]) == [
        [24.0, 12.0, 40.0, 36.0, "spot"],
        [3.2, 4.8, 9.6, 14.4, "cell"],
    ]


def test_yolo_split_folders_and_data_yaml_names(tmp_path):
    root = tmp_path / "yolo"
    for k, split in enumerate(("train", "val", "test")):
        write_png(root / "images" / split / f"{split}.png", random_image(k, 32))
        (root / "labels" / split).mkdir(parents=True)
        (root / "labels" / split / f"{split}.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text("names:\n  0: cell\n  1: spot\n")
    table = load_samples(root)
    assert dict(zip(table["sample_id"], table["split"])) == {
        "test/test.png": "test",
        "train/train.png": "train",
        "val/val.png": "val",
    }
    assert table.attrs["classes"] == CLASSES and set(table["label"]) == {"spot"}


def test_voc_imagesets_give_the_splits(tmp_path):
    root = write_voc(tmp_path / "voc", splits={"train": ["a", "b"], "test": ["c"]})
    table = load_samples(root)
    assert dict(zip(table["sample_id"], table["split"])) == {
        "a.png": "train",
        "b.png": "train",
        "c.png": "test",
    }


def test_box_csv_reads_bccd_columns_and_keeps_patients(tmp_path):
    _images(tmp_path)
    (tmp_path / "cells.csv").write_text(
        "filename,cell_type,xmin,xmax,ymin,ymax,patient_id\n"
        "a.png,WBC,4,20,8,24,p1\na.png,RBC,30,40,2,10,p1\nb.png,RBC,0,64,0,48,p2\n"
    )
    table = load_samples(tmp_path / "cells.csv")
    assert table.attrs["classes"] == ["RBC", "WBC"]
    assert parse_boxes(table.loc[0, "boxes"]) == [
        [4.0, 8.0, 20.0, 24.0, "WBC"],
        [30.0, 2.0, 40.0, 10.0, "RBC"],
    ]
    assert list(table["label"]) == ["RBC|WBC", "RBC"]
    assert list(table["patient_id"]) == ["p1", "p2"]


def test_zero_area_boxes_are_dropped_and_partly_outside_clipped_with_notes(tmp_path):
    boxes = {
        "a.png": [[5, 5, 5, 9, "cell"], [-3, 40, 10, 60, "cell"]],
        "b.png": [[1, 1, 9, 9, "spot"]],
        "c.png": [],
    }
    table = read_box_csv(write_csv(tmp_path, boxes))
    assert parse_boxes(table.loc[0, "boxes"]) == [[0.0, 40.0, 10.0, 48.0, "cell"]]
    assert table.attrs["box_fixes"] == {"zero_area": 1, "clipped": 1}
    notes = " ".join(table.attrs["notes"])
    assert "1 box(es) of zero area" in notes and "line 2" in notes
    assert "1 box(es) partly outside" in notes and "line 3" in notes


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("box", "words"),
    [
        ([20, 5, 10, 9, "cell"], ["line 2", "x2 < x1", "swapped corners"]),
        ([5, 20, 10, 9, "cell"], ["line 2", "y2 < y1"]),
        ([70, 5, 80, 9, "cell"], ["line 2", "wholly outside", "64x48"]),
        ([math.nan, 5, 80, 9, "cell"], ["line 2", "not a number"]),
    ],
)
def test_bad_csv_boxes_are_refused_naming_file_and_line(tmp_path, box, words):
    path = write_csv(tmp_path, {"a.png": [box], "b.png": [], "c.png": []})
    with pytest.raises(DataError) as error:
        read_box_csv(path)
    assert str(path) in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_yolo_line_with_wrong_number_of_fields_is_named(tmp_path):
    root = write_yolo(tmp_path / "yolo")
    (root / "labels" / "b.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2\n")
    with pytest.raises(DataError, match=r"b\.txt: line 2: 4 fields .* has 5: class cx cy w h"):
        read_yolo(root)


def test_yolo_class_index_beyond_the_class_list_is_named(tmp_path):
    root = write_yolo(tmp_path / "yolo")
    (root / "labels" / "b.txt").write_text("2 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match=r"b\.txt: line 1: class index 2 is beyond .*cell, spot"):
        read_yolo(root)


def test_yolo_without_class_names_says_where_to_put_them(tmp_path):
    root = write_yolo(tmp_path / "yolo")
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match="classes.txt .* or data.yaml"):
        read_yolo(root)


def test_coco_category_beyond_the_categories_is_named(tmp_path):
    path = write_coco(tmp_path)
    document = json.loads(path.read_text())
    document["annotations"][0]["category_id"] = 9
    path.write_text(json.dumps(document))
    with pytest.raises(DataError, match="annotation id 1: category_id 9 is not a category"):
        read_coco(path)


def test_coco_file_without_annotations_is_refused(tmp_path):
    path = write_coco(tmp_path)
    document = json.loads(path.read_text())
    document["annotations"] = []
    path.write_text(json.dumps(document))
    with pytest.raises(DataError, match="no annotations, so no boxes"):
        load_samples(path)


def test_an_annotated_image_that_does_not_exist_is_named(tmp_path):
    path = write_coco(tmp_path)
    (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(DataError, match=r"image id 2: image .*b\.png does not exist"):
        read_coco(path)
    root = write_voc(tmp_path / "voc")
    (root / "JPEGImages" / "a.png").unlink()
    with pytest.raises(DataError, match=r"a\.xml: image .*a\.png does not exist"):
        read_voc(root)


def test_voc_box_with_swapped_corners_is_named(tmp_path):
    root = write_voc(tmp_path / "voc", {"a.png": [[20, 5, 10, 9, "cell"]], "b.png": []})
    with pytest.raises(DataError, match=r"a\.xml: object 1: .* x2 < x1"):
        read_voc(root)


def test_detect_on_a_set_without_boxes_says_how_to_give_them(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "classes", {"a": 2, "b": 2})
    table = load_samples(root)
    with pytest.raises(DataError) as error:
        require_boxes(table)
    message = str(error.value)
    for word in ("has no boxes", "COCO", "YOLO", "Pascal VOC", "path,x1,y1,x2,y2,label", "mask"):
        assert word in message


# --------------------------------------------------------------------------- masks


def test_two_mask_regions_give_two_tight_boxes(tmp_path):
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[2:6, 3:10] = 255  # rows 2..5, columns 3..9
    mask[30:41, 50:52] = 255
    mask[44, 60] = 255  # one stray pixel: not a box
    write_png(tmp_path / "m1.png", mask)
    write_png(tmp_path / "m0.png", np.zeros((H, W), dtype=np.uint8))
    for name in ("i1.png", "i0.png"):
        write_png(tmp_path / name, random_image(0, 64)[:H, :W])
    (tmp_path / "manifest.csv").write_text(
        "path,label,mask\ni1.png,lesion,m1.png\ni0.png,normal,m0.png\n"
    )
    table = boxes_from_masks(load_samples(tmp_path))
    assert is_detection(table) and table.attrs["classes"] == ["lesion"]
    assert parse_boxes(table.loc[0, "boxes"]) == [
        [3.0, 2.0, 10.0, 6.0, "lesion"],
        [50.0, 30.0, 52.0, 41.0, "lesion"],
    ]
    assert table.loc[1, "boxes"] == "[]" and table.loc[1, "label"] == "no finding"
    assert (table.loc[0, "width"], table.loc[0, "height"]) == (W, H)
    assert any("1 mask region(s) under 4 pixels" in n for n in table.attrs["notes"])
    assert is_detection(require_boxes(load_samples(tmp_path)))  # a mask column suffices


# --------------------------------------------------------------------------- helpers


def test_box_targets_are_normalised_and_padded():
    rows = [
        {"boxes": boxes_json(BOXES["a.png"]), "width": W, "height": H},
        {"boxes": "[]", "width": W, "height": H},
    ]
    targets = box_targets(rows, CLASSES, max_boxes=3)
    assert targets.shape == (2, 3, 5) and targets.dtype == np.float32
    np.testing.assert_allclose(targets[0, 0], [4 / W, 8 / H, 20 / W, 24 / H, 0])
    np.testing.assert_allclose(targets[0, 1], [30.5 / W, 2 / H, 40 / W, 10.25 / H, 1])
    np.testing.assert_array_equal(targets[0, 2], [0, 0, 0, 0, -1])
    np.testing.assert_array_equal(targets[1], [[0, 0, 0, 0, -1]] * 3)
    with pytest.raises(DataError, match="more than max_boxes=1"):
        box_targets(rows, CLASSES, max_boxes=1)
    assert max_box_count(pd.DataFrame(rows)) == 2


def test_detection_tables_split_by_the_classes_present(tmp_path):
    names = {f"{k:02d}.png": [] for k in range(24)}
    for k, name in enumerate(names):
        if k % 2 == 0:
            names[name].append([1, 1, 9, 9, "cell"])
        if k % 3 == 0:
            names[name].append([20, 20, 30, 30, "spot"])
    root = tmp_path / "set"
    for k, name in enumerate(names):
        write_png(root / name, random_image(k, 32))
    lines = ["path,x1,y1,x2,y2,label,patient_id"]
    for k, (name, found) in enumerate(names.items()):
        patient = f"p{k // 2}"
        lines += [f"{name},{x1},{y1},{x2},{y2},{c},{patient}" for x1, y1, x2, y2, c in found]
        if not found:
            lines.append(f"{name},,,,,,{patient}")
    (root / "boxes.csv").write_text("\n".join(lines) + "\n")
    table = load_samples(root / "boxes.csv")
    split = assign_splits(table, seed=0)
    for cls in CLASSES:  # every class reaches every split
        held = split[split["label"].str.contains(cls)]
        assert set(held["split"]) == {"train", "val", "test"}
    assert split.groupby("patient_id")["split"].nunique().max() == 1
    assert max_folds(table) == 8  # "spot" is held by 8 patients
    folds = kfold_assignments(table, folds=3, seed=0)
    assert pd.Series(folds.to_numpy()).groupby(table["patient_id"]).nunique().max() == 1


# --------------------------------------------------------------------------- real data


def test_bccd_loads_from_its_voc_folder(shared_data):
    root = shared_data / "bccd" / "BCCD"
    if not root.is_dir():
        pytest.skip("BCCD is not in ../shared/data")
    table = load_samples(root)
    assert table.attrs["format"] == "voc" and len(table) == 364
    assert table["split"].value_counts().to_dict() == {"train": 205, "val": 87, "test": 72}
    assert set(table.attrs["classes"]) == {"RBC", "WBC", "Platelets"}
    assert table.attrs["box_fixes"]["zero_area"] == 2
    assert (table["width"] == 640).all() and (table["height"] == 480).all()
