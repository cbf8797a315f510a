"""The command line's failures are one line and exit status 2, never a traceback, and nothing
already done is lost: full disks, unwritable paths, file names that are not UTF-8, NaN images."""

from __future__ import annotations

import errno
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from medsight.cli import app
from tests.conftest import write_run

runner = CliRunner()


def _lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def run_dir(tmp_path, helpers):
    """A run with a random medcnn_s (what train writes, minus training) and two images."""
    data = helpers.make_class_folders(tmp_path / "d", {"normal": 1, "lesion": 1})
    return write_run(tmp_path / "run", data), sorted(data.rglob("*.png"))


def test_check_json_into_a_file_path_is_one_line(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "d", {"a": 2, "b": 2})
    (tmp_path / "out").write_text("a file, not a folder")
    result = _run("data", "check", root, "--json", tmp_path / "out" / "r.json")
    assert result.exit_code == 2
    assert _lines(result) == [
        f"error: cannot create the folder {tmp_path / 'out'}: it is a file (ENOTDIR)"
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_json_into_a_read_only_folder_is_one_line(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "d", {"a": 2, "b": 2})
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = _run("data", "check", root, "--json", locked / "r.json")
    assert result.exit_code == 2
    assert _lines(result) == [
        f"error: cannot write {locked / 'r.json'}: Permission denied (EACCES); the folder is "
        "not writable by this user: choose another place"
    ]


def test_a_full_disk_during_the_first_checkpoint_is_one_line_and_leaves_no_run(
    tmp_path, helpers, monkeypatch
):
    from medsight.training import handlers

    def full(payload, path):
        path.write_bytes(b"part of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(handlers, "_save", full)
    data = helpers.make_two_class_manifest(tmp_path / "data", 8, 2, 16)
    out = tmp_path / "runs" / "r"
    result = _run("train", "--data", data, "--out", out, "--epochs", "1", "--model", "medcnn_s")
    assert result.exit_code == 2, result.output
    assert _lines(result)[-1] == (
        f"error: cannot write {out / 'checkpoints' / 'last.pt'}: No space left on device "
        "(ENOSPC); free space on that disk or write elsewhere"
    )
    assert "Traceback" not in result.output
    assert list((tmp_path / "runs").iterdir()) == []  # nothing half-written


def test_an_os_error_from_anywhere_is_one_line_with_the_file_and_errno(
    tmp_path, helpers, monkeypatch
):
    import medsight.data.sources

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/scan.png")

    monkeypatch.setattr(medsight.data.sources, "load_samples", refused)
    result = _run("data", "check", tmp_path)
    assert result.exit_code == 2
    assert _lines(result) == ["error: /data/scan.png: Permission denied (EACCES)"]


def test_an_error_message_with_brackets_is_printed_whole(run_dir, monkeypatch):
    import medsight.inference
    from medsight.errors import DataError

    run, files = run_dir

    def refused(*args, **kwargs):
        raise DataError("logits row 1 holds NaN or infinity: [nan, nan]")

    monkeypatch.setattr(medsight.inference, "predict_paths", refused)
    result = _run("predict", run, files[0])
    assert result.exit_code == 2
    assert _lines(result) == ["error: logits row 1 holds NaN or infinity: [nan, nan]"]


def test_predict_keeps_the_good_rows_and_exits_zero_beside_a_nan_image(tmp_path, run_dir):
    run, files = run_dir
    nan = tmp_path / "nan.tif"
    Image.fromarray(np.full((16, 16), np.nan, np.float32), mode="F").save(nan)
    out = tmp_path / "p.csv"
    result = _run("predict", run, files[0], nan, files[1], "--out", out)
    assert result.exit_code == 0, result.output
    assert "1 of 3 file(s) could not be predicted; see the error column" in result.output
    table = pd.read_csv(out, keep_default_na=False)
    assert table["file"].tolist() == [str(files[0]), str(nan), str(files[1])]
    assert table["error"].tolist() == [
        "",
        f"{nan}: pixel values include NaN or infinity; medsight needs finite numbers "
        "(fix the image, or leave it out)",
        "",
    ]
    assert table.loc[[0, 2], "label"].ne("").all()


def test_predict_with_nothing_predictable_exits_two_and_still_writes_the_rows(tmp_path, run_dir):
    run, _ = run_dir
    nan = tmp_path / "nan.tif"
    Image.fromarray(np.full((16, 16), np.nan, np.float32), mode="F").save(nan)
    out = tmp_path / "p.csv"
    result = _run("predict", run, nan, "--out", out)
    assert result.exit_code == 2
    assert _lines(result)[-1] == "error: none of the files could be predicted; see the error column"
    assert "pixel values include NaN or infinity" in pd.read_csv(out)["error"].iloc[0]


def test_predict_shows_a_file_name_that_is_not_utf8_by_its_bytes(tmp_path, run_dir, monkeypatch):
    run, files = run_dir
    monkeypatch.chdir(tmp_path)
    with open(b"\xff\xfe.png", "wb") as file, open(files[0], "rb") as good:
        file.write(good.read())
    result = _run("predict", run, os.fsdecode(b"\xff\xfe.png"), "--out", "p.csv")
    assert result.exit_code == 0, result.output
    assert "\\xff\\xfe.png" in result.output
    assert b"\n\xff\xfe.png," in (tmp_path / "p.csv").read_bytes()
