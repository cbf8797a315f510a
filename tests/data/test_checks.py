"""Checks: planted problems are found, named, and never stop the audit."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from medsight.data.checks import check_samples
from medsight.data.datasets import ImageDataset
from medsight.data.sources import load_samples
from medsight.data.transforms import Preprocess
from medsight.errors import ImageDecodeError


def test_clean_set_reports_counts_and_no_problems(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "d", {"a": 3, "b": 1})
    report = check_samples(load_samples(root))
    assert report.n_images == report.n_readable == 4
    assert report.classes == {"a": 3, "b": 1}
    assert report.splits == {"unassigned": {"a": 3, "b": 1}}
    assert report.sizes == {"16x16": 4} and report.channels == {"L": 4}
    assert report.imbalance_ratio == 3.0
    assert report.clean and report.usable


def test_planted_duplicate_is_found_across_classes(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "d", {"a": 2, "b": 2})
    shutil.copy(root / "a" / "a_0.png", root / "b" / "copy.png")
    report = check_samples(load_samples(root))
    assert len(report.duplicates) == 1
    group = report.duplicates[0]
    assert sorted(group["sample_ids"]) == ["a/a_0.png", "b/copy.png"]
    assert group["labels"] == ["a", "b"]
    assert report.leakage == []  # no splits yet, so nothing can leak
    assert not report.clean


def test_planted_patient_leakage_and_duplicate_across_splits(tmp_path, helpers):
    for i, name in enumerate(["p1a", "p1b", "p2", "p3"]):
        helpers.write_png(tmp_path / f"{name}.png", helpers.random_image(i))
    shutil.copy(tmp_path / "p2.png", tmp_path / "p2_again.png")
    (tmp_path / "m.csv").write_text(
        "path,label,patient_id,split\n"
        "p1a.png,x,P1,train\np1b.png,x,P1,test\np2.png,y,P2,train\n"
        "p2_again.png,y,P2b,val\np3.png,y,P3,val\n"
    )
    report = check_samples(load_samples(tmp_path / "m.csv"))
    patients = [leak for leak in report.leakage if leak["kind"] == "patient"]
    images = [leak for leak in report.leakage if leak["kind"] == "duplicate"]
    assert patients == [{"kind": "patient", "patient_id": "P1", "splits": {"train": 1, "test": 1}}]
    assert len(images) == 1 and images[0]["splits"] == ["train", "val"]


def test_corrupt_file_is_reported_and_the_rest_still_checked(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "d", {"a": 2, "b": 2})
    good = (root / "a" / "a_0.png").read_bytes()
    (root / "a" / "broken.png").write_bytes(good[:40])
    seen = []
    report = check_samples(load_samples(root), progress=seen.append)
    assert sum(seen) == 5
    assert report.n_images == 5 and report.n_readable == 4
    assert [u["sample_id"] for u in report.unreadable] == ["a/broken.png"]
    assert report.classes == {"a": 2, "b": 2}


def test_report_document_has_the_documented_keys(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "d", {"a": 1, "b": 1})
    document = check_samples(load_samples(root)).to_dict()
    for key in ("n_images", "classes", "splits", "unreadable", "duplicates", "leakage"):
        assert key in document


def test_real_pneumoniamnist_has_duplicates_leaking_into_val(shared_data):
    report = check_samples(load_samples(shared_data / "pneumoniamnist" / "pneumoniamnist.npz"))
    assert report.n_readable == 5030
    assert report.splits["train"] == {"normal": 388, "pneumonia": 3494}
    leaks = [leak for leak in report.leakage if leak["kind"] == "duplicate"]
    assert leaks and all("val" in leak["splits"] or "test" in leak["splits"] for leak in leaks)
    assert np.isclose(report.imbalance_ratio, 4273 / 757, atol=1e-3)


def test_images_below_eight_pixels_are_reported_and_refused_for_training(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "d", {"a": 2, "b": 2})
    tiny = helpers.write_png(root / "b" / "tiny.png", np.full((1, 1), 200, dtype=np.uint8))
    helpers.write_png(root / "a" / "thin.png", np.zeros((7, 64), dtype=np.uint8))
    report = check_samples(load_samples(root))
    assert [(t["sample_id"], t["size"]) for t in report.too_small] == [
        ("a/thin.png", "64x7"),
        ("b/tiny.png", "1x1"),
    ]
    assert report.too_small[1]["reason"] == (
        "1x1 pixels is below the minimum of 8 on each side; training refuses it"
    )
    assert not report.clean and report.n_readable == 6

    table = load_samples(root)
    dataset = ImageDataset(table, Preprocess(size=(16, 16)))
    position = table.index[table["sample_id"] == "b/tiny.png"][0]
    with pytest.raises(ImageDecodeError) as err:
        dataset[position]
    assert str(err.value) == (
        f"{tiny.resolve()}: 1x1 pixels is below the minimum of 8 on each side for training; "
        "replace the image or leave it out (medsight data check lists them all)"
    )
    assert dataset[0][0].shape == (1, 16, 16)
