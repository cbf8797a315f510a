"""Multi-label data: readers (0/1 columns, NIH 'Finding Labels', multi-hot npz), iterative
patient-grouped splits, the check's finding counts, and the multi-label phantoms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from medsight.cli import app
from medsight.data.checks import check_samples, multilabel_summary
from medsight.data.findings import is_multilabel, mark_multilabel, positives
from medsight.data.sources import MEDMNIST_CLASSES, load_samples, validate_table
from medsight.data.splits import assign_splits, fold_splits, kfold_assignments, max_folds
from medsight.data.synth import FINDINGS, MULTILABEL_COLUMNS, write_multilabel_phantoms
from medsight.errors import ConfigError, DataError
from tests.conftest import FINDINGS_LABELS


def _manifest(root, header: str, rows: list[str], helpers, name: str = "manifest.csv"):
    """Write ``rows`` under ``header`` and one distinct 16 px PNG per row (``i.png``)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(len(rows)):
        helpers.write_png(root / f"{i}.png", helpers.random_image(i))
    lines = [header] + [f"{i}.png,{row}" for i, row in enumerate(rows)]
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


# --------------------------------------------------------------------------- --labels all


def test_labels_all_takes_every_column_but_paths_ids_and_metadata(tmp_path, helpers):
    path = _manifest(
        tmp_path,
        "path,patient_id,split,Sex,age,site,mask,lung_mask_path,No Finding,effusion,mass",
        ["p1,train,F,40,a,,,1,0,0", "p1,train,F,40,a,,,0,1,0", "p2,test,M,50,b,,,0,1,1"],
        helpers,
    )
    table = load_samples(path, labels="all")
    assert is_multilabel(table)
    assert table.attrs["classes"] == ["effusion", "mass"]
    assert table["label"].tolist() == ["no finding", "effusion", "effusion|mass"]
    notes = " ".join(table.attrs["notes"])
    assert "finding column(s): effusion, mass" in notes
    assert "Sex, age, site" in notes and "'No Finding'" in notes
    assert table["Sex"].tolist() == ["F", "F", "M"]  # metadata kept for subgroups


def test_labels_all_with_a_text_column_says_to_name_the_findings(tmp_path, helpers):
    path = _manifest(tmp_path, "path,scanner,mass", ["GE,1", "Siemens,0"], helpers)
    with pytest.raises(DataError, match=r"line 2, column 'scanner' holds 'GE'.*--labels a,b"):
        load_samples(path, labels="all")


def test_labels_all_without_finding_columns_is_refused(tmp_path, helpers):
    path = _manifest(tmp_path, "path,patient_id,sex", ["p1,F", "p2,M"], helpers)
    with pytest.raises(DataError, match="--labels all found no finding column"):
        load_samples(path, labels="all")


def test_labels_naming_no_finding_or_a_missing_column_are_refused(tmp_path, helpers):
    path = _manifest(tmp_path, "path,No Finding,mass", ["1,0", "0,1"], helpers)
    with pytest.raises(DataError, match="'No Finding', which means an image without findings"):
        load_samples(path, labels="mass,No Finding")
    with pytest.raises(DataError, match=r"\['edema'\].*columns are: path, No Finding, mass"):
        load_samples(path, labels="mass,edema")


def test_finding_value_other_than_0_1_minus1_blank_names_line_and_column(tmp_path, helpers):
    path = _manifest(tmp_path, "path,a,b", ["1,0", "0,", "1,2"], helpers)
    with pytest.raises(DataError, match=r"line 4, column 'b' holds '2'"):
        load_samples(path, labels="a,b")


# --------------------------------------------------------------------------- Finding Labels


def test_nih_findings_column_is_found_by_name_and_normalised(tmp_path, helpers):
    path = _manifest(
        tmp_path,
        "path,Patient ID,Finding Labels",
        [
            "1,Effusion|Cardiomegaly",
            "1,effusion",
            "2,No Finding",
            "2,no finding",
            "3,Pleural Thickening;Mass",
            "3,Pleural_Thickening",
            "4,",
        ],
        helpers,
    )
    table = load_samples(path)
    assert table.attrs["task"] == "multilabel"  # the attrs survive validate_table
    assert table.attrs["classes"] == ["cardiomegaly", "effusion", "mass", "pleural_thickening"]
    assert table["label"].tolist() == [
        "cardiomegaly|effusion",
        "effusion",
        "no finding",
        "no finding",
        "mass|pleural_thickening",
        "pleural_thickening",
        None,  # a blank cell: unlabelled
    ]
    assert table["patient_id"].tolist() == ["1", "1", "2", "2", "3", "3", "4"]
    notes = table.attrs["notes"]
    assert any("'Effusion' and 'effusion' → 'effusion'" in n for n in notes)
    assert any("'Pleural Thickening' and 'Pleural_Thickening'" in n for n in notes)
    assert any("separates findings with ';'" in n for n in notes)
    assert any("grouped by column 'Patient ID'" in n for n in notes)


def test_findings_column_option_and_commas(tmp_path, helpers):
    path = _manifest(tmp_path, "path,label,dx", ["x,edema, mass", "y,No Finding"], helpers)
    with pytest.raises(DataError, match="line 2 has more fields than the header"):
        load_samples(path)  # an unquoted comma must not shift the columns
    path = _manifest(tmp_path, "path,label,dx", ['x,"edema, mass"', "y,No Finding"], helpers)
    single = load_samples(path)  # a label column wins when no option is given
    assert not is_multilabel(single)
    table = load_samples(path, findings_column="dx")
    assert table["label"].tolist() == ["edema|mass", "no finding"]
    assert any("separates findings with ','" in n for n in table.attrs["notes"])
    with pytest.raises(DataError, match="--findings-column 'findings' is not a column"):
        load_samples(path, findings_column="findings")
    with pytest.raises(DataError, match="give one"):
        load_samples(path, findings_column="dx", labels="label")


def test_no_finding_beside_findings_and_a_column_without_findings_are_refused(tmp_path, helpers):
    path = _manifest(tmp_path, "path,Finding Labels", ["Mass|No Finding", "Mass"], helpers)
    with pytest.raises(DataError, match="line 2, column 'Finding Labels'.*not both"):
        load_samples(path)
    path = _manifest(tmp_path / "b", "path,Finding Labels", ["No Finding", "NO FINDING"], helpers)
    with pytest.raises(DataError, match="names no finding"):
        load_samples(path)


# --------------------------------------------------------------------------- npz, folders


def _npz(path, labels: dict[str, np.ndarray]):
    arrays = {}
    for split, y in labels.items():
        arrays[f"{split}_images"] = np.zeros((len(y), 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = y
    np.savez(path, **arrays)
    return path


def test_chestmnist_multi_hot_labels_read_as_its_14_findings(tmp_path):
    train = np.zeros((3, 14), dtype=np.uint8)
    train[0, [2, 1]] = 1  # effusion, cardiomegaly
    train[1, 13] = 1  # hernia
    path = _npz(tmp_path / "chestmnist.npz", {"train": train, "val": np.ones((2, 14), np.uint8)})
    table = load_samples(path)
    assert table.attrs["task"] == "multilabel"
    assert table.attrs["classes"] == list(MEDMNIST_CLASSES["chestmnist"])
    assert table.attrs["classes"][12:] == ["pleural", "hernia"]
    assert table["label"].tolist()[:3] == ["cardiomegaly|effusion", "hernia", "no finding"]
    np.testing.assert_array_equal(positives(table["label"][:3], table.attrs["classes"]), train)
    assert table["split"].tolist() == ["train"] * 3 + ["val"] * 2


def test_other_multi_hot_npz_get_numbered_findings(tmp_path):
    path = _npz(tmp_path / "mine.npz", {"train": np.array([[1, 0, 1], [0, 0, 0]], np.uint8)})
    table = load_samples(path)
    assert table.attrs["classes"] == ["finding_0", "finding_1", "finding_2"]
    assert table["label"].tolist() == ["finding_0|finding_2", "no finding"]


def test_npz_label_widths_differing_between_splits_are_refused(tmp_path):
    path = _npz(
        tmp_path / "x.npz", {"train": np.zeros((2, 14), np.uint8), "test": np.zeros((2, 3))}
    )
    with pytest.raises(DataError, match="train_labels 14, test_labels 3"):
        load_samples(path)


def test_npz_multi_hot_value_other_than_0_1_names_split_row_and_column(tmp_path):
    val = np.zeros((3, 4), np.int64)
    val[2, 1] = 2
    path = _npz(tmp_path / "x.npz", {"train": np.zeros((2, 4), np.int64), "val": val})
    with pytest.raises(DataError, match="val_labels row 2, column 1 holds 2"):
        load_samples(path)


def test_multilabel_options_are_refused_for_class_folders_and_npz(tmp_path, helpers):
    root = helpers.make_class_folders(tmp_path / "d", {"a": 1, "b": 1})
    with pytest.raises(DataError, match="--labels .*one label per image.*not findings"):
        load_samples(root, labels="a,b")
    with pytest.raises(DataError, match="--findings-column"):
        load_samples(root, findings_column="Finding Labels")
    path = _npz(tmp_path / "x.npz", {"train": np.zeros((2, 3), np.uint8)})
    with pytest.raises(DataError, match="carries its own labels"):
        load_samples(path, labels="all")


# --------------------------------------------------------------------------- splits

FIVE = ["a", "b", "c", "d", "e"]


def _ml_table(n_patients=120, per_patient=2, seed=0, with_patients=True) -> pd.DataFrame:
    """Patients with correlated findings of different rarity; ``e`` is held by 3 patients."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        has = rng.random(4) < [0.5, 0.3, 0.15, 0.08]
        has[1] |= has[0] and rng.random() < 0.3
        e = p in (5, 50, 100)
        for i in range(per_patient):
            shown = [f for f, h in zip(FIVE, [*has, e]) if h and rng.random() < 0.9]
            rows.append(
                {
                    "sample_id": f"P{p:03d}_{i}",
                    "source": f"/x/P{p:03d}_{i}.png",
                    "label": "|".join(shown) or "no finding",
                    "patient_id": f"P{p:03d}" if with_patients else None,
                }
            )
    return mark_multilabel(validate_table(pd.DataFrame(rows)), FIVE)


def test_multilabel_split_keeps_patients_whole_and_reaches_every_split():
    table = _ml_table()
    split = assign_splits(table, ratios=(0.7, 0.15, 0.15), seed=0)
    assert split.attrs["task"] == "multilabel" and split.attrs["classes"] == FIVE
    assert split.groupby("patient_id")["split"].nunique().max() == 1
    present = positives(split["label"], FIVE)
    for name in ("train", "val", "test"):
        in_split = present[(split["split"] == name).to_numpy()]
        # every finding, the 3-patient one too, lands in every split
        assert (in_split.sum(axis=0) > 0).all(), (name, in_split.sum(axis=0))


def test_multilabel_split_proportions_stay_near_the_whole_set():
    table = _ml_table(n_patients=400)
    split = assign_splits(table, ratios=(0.7, 0.15, 0.15), seed=3)
    share = split["split"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.70, abs=0.03)
    assert share["val"] == pytest.approx(0.15, abs=0.03)
    present = positives(split["label"], FIVE)
    whole = present.mean(axis=0)
    for name in ("train", "val", "test"):
        part = present[(split["split"] == name).to_numpy()].mean(axis=0)
        np.testing.assert_allclose(part[:3], whole[:3], atol=0.05)  # the common findings


def test_multilabel_split_is_seeded():
    table = _ml_table()
    first = assign_splits(table, seed=7)["split"].tolist()
    assert assign_splits(table, seed=7)["split"].tolist() == first
    assert assign_splits(table, seed=8)["split"].tolist() != first


def test_multilabel_split_without_patients_groups_each_image_alone():
    table = _ml_table(n_patients=100, per_patient=1, with_patients=False)
    split = assign_splits(table, seed=0)
    assert split["split"].value_counts()["train"] == pytest.approx(70, abs=3)
    assert set(split["split"]) == {"train", "val", "test"}


def test_multilabel_split_with_a_zero_ratio_leaves_that_split_empty():
    split = assign_splits(_ml_table(), ratios=(0.8, 0.2, 0.0), seed=0)
    assert set(split["split"]) == {"train", "val"}


def test_multilabel_kfold_is_patient_grouped_stratified_and_seeded():
    table = _ml_table(n_patients=200)
    folds = kfold_assignments(table, folds=3, seed=1)
    assert (
        pd.DataFrame({"p": table["patient_id"], "f": folds}).groupby("p")["f"].nunique().max() == 1
    )
    present = positives(table["label"], FIVE)
    for k in range(3):
        share = present[(folds == k).to_numpy()].mean(axis=0)
        np.testing.assert_allclose(share[:3], present.mean(axis=0)[:3], atol=0.05)
    assert kfold_assignments(table, folds=3, seed=1).tolist() == folds.tolist()
    assert max_folds(table) == 3  # finding e has three patients
    with pytest.raises(ConfigError, match="smallest finding has patients; the maximum .* 3"):
        kfold_assignments(table, folds=4)


def test_multilabel_fold_splits_keep_the_attrs_and_the_test_rows():
    split = assign_splits(_ml_table(), seed=0)
    fold = fold_splits(split, folds=2, fold=1, seed=0)
    assert fold.attrs["task"] == "multilabel"
    assert (fold["split"] == "test").equals(split["split"] == "test")


# --------------------------------------------------------------------------- check


def test_check_counts_findings_per_split_pairs_and_gaps(tmp_path, helpers):
    rows = [
        "p1,train,1,1,0",  # a+b
        "p1,train,1,0,0",  # a
        "p2,train,0,0,0",  # none
        "p3,train,1,1,1",  # a+b+c
        "p4,val,0,1,0",  # b
        "p5,val,0,0,0",  # none
        "p6,val,-1,0,0",  # a uncertain: not no finding, not a
        "p7,test,1,,0",  # a, b uncertain
    ]
    path = _manifest(tmp_path, "path,patient_id,split,a,b,c", rows, helpers)
    report = check_samples(load_samples(path, labels="a,b,c"))
    ml = report.multilabel
    assert ml["findings"] == ["a", "b", "c"]
    assert ml["images"] == {"all": 8, "train": 4, "val": 3, "test": 1}
    assert ml["prevalence"]["train"] == {
        "a": {"count": 3, "percent": 75.0},
        "b": {"count": 2, "percent": 50.0},
        "c": {"count": 1, "percent": 25.0},
    }
    assert ml["prevalence"]["val"]["b"] == {"count": 1, "percent": 33.3}
    assert ml["prevalence"]["all"]["a"] == {"count": 4, "percent": 50.0}
    assert ml["no_finding"]["train"] == {"count": 1, "percent": 25.0}
    assert ml["no_finding"]["val"] == {"count": 1, "percent": 33.3}
    assert ml["no_finding"]["all"]["count"] == 2
    assert ml["uncertain"] == {"a": 1, "b": 1}
    assert ml["co_occurrence"] == [
        {"findings": ["a", "b"], "count": 2, "percent": 25.0},
        {"findings": ["a", "c"], "count": 1, "percent": 12.5},
        {"findings": ["b", "c"], "count": 1, "percent": 12.5},
    ]
    assert {(m["split"], m["finding"]) for m in ml["missing"]} == {
        ("val", "a"),
        ("val", "c"),
        ("test", "b"),
        ("test", "c"),
    }
    assert report.classes == {"a": 4, "b": 3, "c": 1}
    assert report.splits["val"] == {"a": 0, "b": 1, "c": 0}
    assert report.leakage == [] and report.clean


def test_check_reports_a_patient_in_two_splits_of_a_multilabel_set(tmp_path, helpers):
    path = _manifest(
        tmp_path, "path,patient_id,split,a", ["p1,train,1", "p1,test,0", "p2,val,1"], helpers
    )
    report = check_samples(load_samples(path, labels="a"))
    assert report.leakage == [
        {"kind": "patient", "patient_id": "p1", "splits": {"train": 1, "test": 1}}
    ]


def test_multilabel_summary_leaves_unlabelled_images_out():
    table = mark_multilabel(
        validate_table(
            pd.DataFrame({"sample_id": ["x", "y"], "source": ["x", "y"], "label": ["a", None]})
        ),
        ["a"],
    )
    summary = multilabel_summary(table)
    assert summary["images"] == {"all": 1, "unassigned": 1}
    assert summary["prevalence"]["all"]["a"] == {"count": 1, "percent": 100.0}


def test_data_check_command_draws_findings_and_warns_of_gaps(tmp_path, helpers):
    rows = ["p1,train,1,1", "p2,train,0,1", "p3,val,0,1", "p4,test,1,0"]
    _manifest(tmp_path, "path,patient_id,split,effusion,mass", rows, helpers)
    result = CliRunner().invoke(
        app, ["data", "check", str(tmp_path), "--labels", "all", "--json", str(tmp_path / "r.json")]
    )
    assert result.exit_code == 0, result.output
    assert "Images per finding and split" in result.output
    assert "effusion + mass" in result.output
    assert "never occur in split val: effusion" in result.output
    assert "never occur in split test: mass" in result.output
    assert "--labels all: 2 finding column(s)" in result.output
    import json

    document = json.loads((tmp_path / "r.json").read_text())
    assert document["multilabel"]["prevalence"]["train"]["mass"]["count"] == 2
    assert document["notes"]


# --------------------------------------------------------------------------- synth


@pytest.fixture(scope="module")
def findings_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("ml") / "data"
    write_multilabel_phantoms(out, n=300, size=48, seed=0)
    return out


def test_multilabel_phantoms_read_back_as_their_findings(findings_set):
    table = load_samples(findings_set)  # no option: the NIH column is found by name
    assert table.attrs["task"] == "multilabel"
    assert table.attrs["classes"] == sorted(FINDINGS)
    assert len(table) == 300
    present = positives(table["label"], sorted(FINDINGS))
    none = (table["label"] == "no finding").mean()
    assert 0.15 <= none <= 0.35
    assert (present.sum(axis=1) >= 2).any()  # several findings in one image
    assert present.mean(axis=0).min() > 0.15  # each finding is common enough to learn
    assert table.groupby("patient_id").size().min() >= 2


def test_multilabel_phantom_manifest_lists_a_mask_exactly_for_each_finding_shown(findings_set):
    manifest = pd.read_csv(findings_set / "manifest.csv", keep_default_na=False, dtype=str)
    assert tuple(manifest.columns) == MULTILABEL_COLUMNS
    for _, row in manifest.iterrows():
        shown = set(row["Finding Labels"].split("|")) - {"No Finding"}
        for finding in FINDINGS:
            mask_path = row[f"{finding}_mask_path"]
            assert bool(mask_path) == (finding in shown)
            if mask_path:
                mask = np.asarray(Image.open(findings_set / mask_path))
                assert set(np.unique(mask)) == {0, 255}


def test_multilabel_phantom_masks_lie_on_their_lesions():
    from medsight.data.synth import make_multilabel_phantom

    for seed in range(8):
        image, masks = make_multilabel_phantom(np.random.default_rng(seed), 64, set(FINDINGS))
        image = image.astype(float)
        tissue = np.median(image[image > 40])  # the body's soft tissue
        nodule, cyst, specks = (masks[f] > 0 for f in ("nodule", "cyst", "calcification"))
        assert min(nodule.sum(), cyst.sum(), specks.sum()) >= 4
        assert image[nodule].mean() > tissue + 30  # a bright, homogeneous oval
        assert image[cyst].min() < tissue - 40  # dark fluid ...
        assert image[cyst].max() > tissue + 15  # ... inside a bright wall
        assert image[specks].max() > tissue + 70  # very bright specks
        assert not (nodule & cyst).mean() > 0.5 * min(nodule.mean(), cyst.mean())


def test_multilabel_phantoms_are_repeatable_and_replace_a_previous_set(tmp_path, findings_set):
    out = tmp_path / "again"
    write_multilabel_phantoms(out, n=300, size=48, seed=0)
    assert (out / "manifest.csv").read_bytes() == (findings_set / "manifest.csv").read_bytes()
    first = (out / "images" / "P0001_01.png").read_bytes()
    assert first == (findings_set / "images" / "P0001_01.png").read_bytes()
    write_multilabel_phantoms(out, n=60, size=48, seed=1)  # a previous set is replaced
    assert len(list((out / "images").glob("*.png"))) == 60
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a phantom dataset"):
        write_multilabel_phantoms(tmp_path / "other", n=60)


def test_data_synth_multilabel_command_writes_a_readable_set(tmp_path):
    out = tmp_path / "s"
    result = CliRunner().invoke(app, ["data", "synth", str(out), "--multilabel", "--n", "40"])
    assert result.exit_code == 0, result.output
    assert load_samples(out).attrs["task"] == "multilabel"


def test_data_split_and_preview_take_the_finding_columns(tmp_path, helpers):
    import pandas as pd
    from typer.testing import CliRunner

    from medsight.cli import app

    data = helpers.make_findings_manifest(tmp_path / "data")
    out = tmp_path / "splits.csv"
    result = CliRunner().invoke(
        app,
        ["data", "split", str(data / "manifest.csv"), "--labels", "bright,dark", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    splits = pd.read_csv(out)
    assert set(splits["label"]) <= FINDINGS_LABELS
    assert (splits.groupby("patient_id")["split"].nunique() == 1).all()
    for split, rows in splits.groupby("split"):
        for finding in ("bright", "dark"):  # 16 patients: each finding reaches every split
            assert rows["label"].str.split("|").apply(lambda p, f=finding: f in p).any(), split

    grid = tmp_path / "grid.png"
    result = CliRunner().invoke(
        app,
        [
            "data",
            "preview",
            str(data / "manifest.csv"),
            "--labels",
            "bright,dark",
            "--out",
            str(grid),
            "--per-class",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "(6 images)" in " ".join(result.output.split()) and grid.exists()


def test_the_same_seed_draws_the_same_multilabel_phantoms_in_any_process(tmp_path):
    """String hashing differs between processes (PYTHONHASHSEED): nothing may depend on it."""
    import os
    import subprocess
    import sys

    manifests = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        code = (
            "from medsight.data.synth import write_multilabel_phantoms;"
            f"write_multilabel_phantoms({str(out)!r}, n=40, size=32, seed=3)"
        )
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        manifests.append((out / "manifest.csv").read_bytes())
    assert manifests[0] == manifests[1]
