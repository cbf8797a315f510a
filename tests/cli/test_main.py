"""The command line: exit codes, JSON report, one-line errors, written files."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from medsight.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_check_json_report_and_exit_zero(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "d", {"normal": 3, "lesion": 2})
    result = _run("data", "check", root, "--json", tmp_path / "r.json", "--strict")
    assert result.exit_code == 0, result.output
    assert "normal" in result.output and "lesion" in result.output
    document = json.loads((tmp_path / "r.json").read_text())
    assert document["n_images"] == 5
    assert document["classes"] == {"lesion": 2, "normal": 3}
    assert document["unreadable"] == document["duplicates"] == document["leakage"] == []


def test_check_strict_exits_one_naming_the_leaking_patient(tmp_path, helpers):
    for i in range(4):
        helpers.write_png(tmp_path / f"{i}.png", helpers.random_image(i))
    (tmp_path / "m.csv").write_text(
        "path,label,patient_id,split\n0.png,a,P-17,train\n1.png,a,P-17,test\n"
        "2.png,b,P-2,train\n3.png,b,P-3,val\n"
    )
    assert _run("data", "check", tmp_path / "m.csv").exit_code == 0
    result = _run("data", "check", tmp_path / "m.csv", "--strict")
    assert result.exit_code == 1
    assert "patient P-17" in result.output and "patient P-3" not in result.output


def test_check_lists_images_too_small_to_train_on_and_strict_fails(tmp_path, helpers):
    import numpy as np

    root = helpers.make_class_folders(tmp_path / "d", {"a": 2, "b": 2})
    helpers.write_png(root / "b" / "tiny.png", np.full((1, 1), 200, dtype=np.uint8))
    result = _run("data", "check", root, "--strict")
    assert result.exit_code == 1
    assert "Images too small to train on (1)" in result.output
    assert "b/tiny.png" in result.output and "1x1" in result.output
    assert "1 too small" in result.output


def test_check_wrong_path_exits_two_with_one_line(tmp_path):
    result = runner.invoke(app, ["data", "check", str(tmp_path / "missing")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no such file or folder" in lines[0]


def test_check_nothing_readable_exits_two(tmp_path, helpers):
    for name in ("a", "b"):
        (tmp_path / "d" / name).mkdir(parents=True)
        (tmp_path / "d" / name / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = runner.invoke(app, ["data", "check", str(tmp_path / "d")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "none of the 2 images could be read" in lines[0]


def test_split_writes_grouped_splits_and_folds(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "d", {"a": 12, "b": 12})
    out = tmp_path / "splits.csv"
    result = _run("data", "split", root, "--out", out, "--folds", "3", "--seed", "1")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["sample_id", "label", "patient_id", "split", "fold"]
    assert frame["fold"][frame["split"] == "test"].isna().all()
    assert set(frame["fold"].dropna().astype(int)) == {0, 1, 2}


def test_preview_writes_a_png(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "d", {"a": 3, "b": 3})
    out = tmp_path / "grid.png"
    result = _run("data", "preview", root, "--out", out, "--per-class", "2")
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.width > 100 and image.height > 100


def test_synth_then_strict_check_is_clean(tmp_path):
    pytest.importorskip("medsight.data.synth")
    out = tmp_path / "phantom"
    assert _run("data", "synth", out, "--n", "60", "--size", "32").exit_code == 0
    result = _run("data", "check", out, "--strict", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "r.json").read_text())
    assert document["n_images"] == 60
    assert set(document["classes"]) == {"normal", "benign", "malignant"}
    split = _run("data", "split", out, "--out", tmp_path / "s.csv")
    assert split.exit_code == 0
    frame = pd.read_csv(tmp_path / "s.csv")
    assert (frame.groupby("patient_id")["split"].nunique() == 1).all()


def test_version():
    assert "medsight" in _run("--version").output
