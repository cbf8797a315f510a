"""Archive scoring: every image of a folder, zip or manifest becomes one Parquet row (unreadable
ones with their error), a re-run fills exactly what is missing, and Ray gives the same
probabilities as one process."""

from __future__ import annotations

import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medsight.cli import app
from medsight.errors import ConfigError, DataError
from medsight.inference import predict_paths
from medsight.workflows.batch import Scorer, decode_batch, read_scored, score_archive
from tests.conftest import random_image, write_dicom, write_png, write_run

N_IMAGES = 240


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A randomly initialised run, and a folder of ``N_IMAGES`` PNGs in three subfolders plus
    two corrupt files (not an image; a PNG cut short)."""
    root = tmp_path_factory.mktemp("batch")
    run = write_run(root / "run", root / "data", size=16)
    images = root / "scans"
    for i in range(N_IMAGES):
        write_png(images / f"site{i % 3}" / f"img{i:04d}.png", random_image(i, 20))
    (images / "notes.txt").write_text("not an image, not listed")
    (images / "site0" / "broken.png").write_bytes(b"this is not a PNG")
    whole = (images / "site1" / "img0001.png").read_bytes()
    (images / "site1" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return run, images


@pytest.fixture(scope="module")
def scored(archive, tmp_path_factory):
    """The archive scored once by the local engine: (summary, its rows)."""
    run, images = archive
    out = tmp_path_factory.mktemp("scored") / "preds.parquet"
    summary = score_archive(run, images, out, batch_size=32)
    return summary, read_scored(out)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for part in src.glob("part-*.parquet"):
        (dst / part.name).write_bytes(part.read_bytes())
    return dst


# --------------------------------------------------------------------------- the local engine


def test_every_image_is_one_row_and_corrupt_files_are_rows_with_their_error(archive, scored):
    run, images = archive
    summary, rows = scored
    assert summary["listed"] == summary["scored"] == N_IMAGES + 2
    assert (summary["skipped"], summary["errors"]) == (0, 2)
    assert summary["images_per_s"] > 0
    assert rows["file"].is_unique and len(rows) == N_IMAGES + 2
    failed = rows[rows["error"].ne("")]
    assert sorted(Path(f).name for f in failed["file"]) == ["broken.png", "truncated.png"]
    assert failed["label"].eq("").all() and failed["p_lesion"].isna().all()
    assert list(rows.columns) == [
        "file",
        "label",
        "confidence",
        "p_normal",
        "p_lesion",
        "error",
        "model",
        "scored_at",
    ]
    assert rows["model"].unique().tolist() == [summary["model"]]
    assert summary["model"].startswith("run@") and len(summary["model"]) == len("run@") + 12
    assert len(list(Path(summary["out"]).glob("part-*.parquet"))) == -(-(N_IMAGES + 2) // 32)


def test_the_local_engine_gives_predict_paths_probabilities(archive, scored):
    _, rows = scored
    expected = predict_paths(archive[0], rows["file"].tolist(), backend="onnx")
    np.testing.assert_allclose(
        rows[["p_normal", "p_lesion"]].to_numpy(),
        expected[["p_normal", "p_lesion"]].to_numpy(),
        atol=1e-6,
    )
    assert rows["label"].tolist() == expected["label"].tolist()


def test_an_image_whose_outputs_are_not_finite_is_an_error_row_beside_the_others(archive):
    from medsight.inference import Predictor

    run, images = archive
    predictor = Predictor.from_run(run, backend="onnx")
    predict_array = predictor.predict_array

    def refusing(x):  # the task refuses a batch holding an image scored NaN
        if (x[:, 0, 0, 0] == 0.5).any():
            raise DataError("logits row 0 holds NaN or infinity: [nan, nan]")
        return predict_array(x)

    predictor.predict_array = refusing
    files = [str(p) for p in sorted((images / "site0").glob("img*.png"))[:4]]
    batch = decode_batch(files, predictor.preprocess, predictor.input_shape[1:], 10**7)
    batch["x"][2, 0, 0, 0] = 0.5
    rows = Scorer(predictor, "run@test")(batch)
    assert rows["error"].tolist()[:2] + rows["error"].tolist()[3:] == ["", "", ""]
    assert rows["error"][2] == f"{files[2]}: the model's outputs hold NaN or infinity"
    assert rows["p_lesion"].isna().tolist() == [False, False, True, False]


# --------------------------------------------------------------------------- resuming


def test_a_second_run_scores_nothing_new_but_retries_the_errors(archive, scored, tmp_path):
    run, images = archive
    out = _copy(Path(scored[0]["out"]), tmp_path / "preds.parquet")
    summary = score_archive(run, images, out, batch_size=32)
    assert (summary["skipped"], summary["scored"], summary["errors"]) == (N_IMAGES, 2, 2)
    rows = read_scored(out)
    assert rows["file"].is_unique and len(rows) == N_IMAGES + 2  # one row per file, still


def test_a_re_run_fills_exactly_the_gap_a_lost_part_leaves(archive, scored, tmp_path):
    run, images = archive
    out = _copy(Path(scored[0]["out"]), tmp_path / "preds.parquet")
    lost = sorted(out.glob("part-*.parquet"))[1]
    gap = set(pd.read_parquet(lost)["file"])
    lost.unlink()
    summary = score_archive(run, images, out, batch_size=32, retry_errors=False)
    assert summary["scored"] == len(gap) and summary["skipped"] == N_IMAGES + 2 - len(gap)
    rows = read_scored(out)
    assert rows["file"].is_unique and len(rows) == N_IMAGES + 2
    before = scored[1].set_index("file")["p_lesion"]
    after = rows.set_index("file")["p_lesion"]
    np.testing.assert_allclose(after[sorted(gap)], before[sorted(gap)], atol=1e-6)


def test_an_out_holding_another_models_predictions_is_refused(archive, scored, tmp_path):
    _, images = archive
    other = write_run(tmp_path / "other", tmp_path / "data", size=16, seed=1)
    out = _copy(Path(scored[0]["out"]), tmp_path / "preds.parquet")
    with pytest.raises(ConfigError, match="holds predictions of model run@"):
        score_archive(other, images, out)


# --------------------------------------------------------------------------- sources


def test_a_source_without_images_names_itself_and_what_was_looked_for(archive, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing to see")
    with pytest.raises(DataError, match=r"empty: no images to score; looked for files ending"):
        score_archive(archive[0], empty, tmp_path / "preds.parquet")
    assert not (tmp_path / "preds.parquet").exists()


def test_a_zip_and_a_csv_manifest_score_their_images(archive, scored, tmp_path):
    run, images = archive
    chosen = sorted((images / "site2").glob("img*.png"))[:20]
    with zipfile.ZipFile(tmp_path / "scans.zip", "w") as zf:
        for path in chosen:
            zf.write(path, f"scans/{path.name}")
        zf.writestr("scans/readme.txt", "ignored")
    manifest = tmp_path / "manifest.csv"
    lines = ["path,site"] + [f"{p},2" for p in chosen] + ["missing.png,2"]
    manifest.write_text("\n".join(lines) + "\n")
    from_zip = score_archive(run, tmp_path / "scans.zip", tmp_path / "zip.parquet", csv=True)
    from_csv = score_archive(run, manifest, tmp_path / "csv.parquet")
    assert (from_zip["scored"], from_zip["errors"]) == (20, 0)
    assert (from_csv["scored"], from_csv["errors"]) == (21, 1)
    zipped = pd.read_csv(from_zip["csv"], keep_default_na=False)
    assert zipped["file"].str.startswith("zip://").all()
    listed = read_scored(tmp_path / "csv.parquet").set_index("file")
    assert "missing.png: file not found" in listed.loc[str(tmp_path / "missing.png"), "error"]
    reference = scored[1].set_index("file")["p_lesion"]
    np.testing.assert_allclose(
        listed.loc[[str(p) for p in chosen], "p_lesion"], reference[[str(p) for p in chosen]]
    )
    np.testing.assert_allclose(
        zipped["p_lesion"].sort_values().to_numpy(),
        reference[[str(p) for p in chosen]].sort_values().to_numpy(),
        atol=1e-6,
    )


def test_a_dicom_tree_scores_dicom_files_with_and_without_an_extension(archive, tmp_path):
    tree = tmp_path / "PACS" / "patient1" / "study1"
    pixels = np.arange(400, dtype=np.int16).reshape(20, 20)
    write_dicom(tree / "series1" / "IM0001", pixels)  # DICOM files often have no extension
    write_dicom(tree / "series2" / "slice.dcm", pixels[::-1])
    (tree / "series1" / "VERSION").write_text("not DICOM, not listed")
    summary = score_archive(archive[0], tmp_path / "PACS", tmp_path / "p.parquet")
    assert (summary["listed"], summary["scored"], summary["errors"]) == (2, 2, 0)
    files = read_scored(tmp_path / "p.parquet")["file"].map(lambda f: Path(f).name)
    assert sorted(files) == ["IM0001", "slice.dcm"]


def test_a_file_name_that_is_not_utf8_is_scored_and_shown_by_its_bytes(archive, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    good = sorted((archive[1] / "site0").glob("img*.png"))[0]
    with open(os.path.join(os.fsencode(folder), b"\xff\xfe.png"), "wb") as file:
        file.write(good.read_bytes())
    summary = score_archive(archive[0], folder, tmp_path / "p.parquet")
    assert (summary["scored"], summary["errors"]) == (1, 0)
    assert read_scored(tmp_path / "p.parquet")["file"].tolist() == [f"{folder}/\\xff\\xfe.png"]
    assert score_archive(archive[0], folder, tmp_path / "p.parquet")["skipped"] == 1


def test_the_ray_engine_without_ray_says_how_to_install_it(archive, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    with pytest.raises(
        ConfigError, match=r'the ray engine needs Ray: pip install "medsight\[ray\]"'
    ):
        score_archive(archive[0], archive[1], tmp_path / "p.parquet", engine="ray")


# --------------------------------------------------------------------------- the CLI


def test_predict_on_a_folder_writes_a_parquet_dataset_and_a_summary(archive, tmp_path):
    run, images = archive
    out = tmp_path / "x.parquet"
    result = CliRunner().invoke(app, ["predict", str(run), str(images), "--out", str(out), "--csv"])
    assert result.exit_code == 0, result.output
    assert "skipped (already in --out)" in result.output
    assert "2 of 242 file(s) could not be predicted" in result.output
    assert len(read_scored(out)) == len(pd.read_csv(tmp_path / "x.csv")) == N_IMAGES + 2
    again = CliRunner().invoke(app, ["predict", str(run), str(images), "--out", str(out)])
    assert again.exit_code == 0, again.output  # only the two broken files were tried again
    assert "│      2 │      2 │                        240 │" in again.output


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_an_unreachable_ray_address_fails_within_seconds_naming_it(archive, tmp_path):
    pytest.importorskip("ray")
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        start = time.perf_counter()
        with pytest.raises(ConfigError, match=f"--address {address}: no Ray cluster answers"):
            score_archive(
                archive[0], archive[1], tmp_path / "p.parquet", engine="ray", address=address
            )
        assert time.perf_counter() - start < 10


def test_ray_scores_the_archive_as_the_local_engine_does(local_ray, archive, scored, tmp_path):
    run, images = archive
    out = tmp_path / "ray.parquet"
    summary = score_archive(run, images, out, engine="ray", workers=2, batch_size=32)
    assert (summary["scored"], summary["errors"], summary["workers"]) == (N_IMAGES + 2, 2, 2)
    rows = read_scored(out).set_index("file")
    local = scored[1].set_index("file")
    assert sorted(rows.index) == sorted(local.index)
    np.testing.assert_allclose(
        rows.loc[local.index, ["p_normal", "p_lesion"]].to_numpy(),
        local[["p_normal", "p_lesion"]].to_numpy(),
        atol=1e-5,
    )
    assert (rows.loc[local.index, "label"] == local["label"]).all()
    assert (rows.loc[local.index, "error"] != "").sum() == 2
    # a worker that died with its batch leaves a gap: the next run (any engine) fills it
    lost = sorted(out.glob("part-*.parquet"))[0]
    gap = len(pd.read_parquet(lost))
    lost.unlink()
    again = score_archive(run, images, out, engine="ray", workers=1, retry_errors=False)
    assert (again["scored"], again["skipped"]) == (gap, N_IMAGES + 2 - gap)
    assert read_scored(out)["file"].is_unique and len(read_scored(out)) == N_IMAGES + 2
