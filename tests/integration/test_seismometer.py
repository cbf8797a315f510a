"""The seismometer export: its tables and configuration here, and seismometer's own loader
reading them in an environment of its own (seismometer needs pandas < 3)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sqlalchemy import update
from typer.testing import CliRunner

from medsight import runs
from medsight.cli import app
from medsight.data.privacy import pseudonymise
from medsight.errors import ConfigError, DataError
from medsight.integration import seismometer as sm
from medsight.integration.seismometer import export_worklist
from medsight.serving.worklist import Study, WorklistStore
from tests.conftest import make_two_class_manifest, write_run

CLASSES = ("normal", "effusion", "mass")
#: Raw identifiers in the data; none may reach the export.
RAW_PATIENTS = [f"MRN-{1000 + p}" for p in range(12)]


def write_predictions(run: Path, n: int = 24, seed: int = 0) -> pd.DataFrame:
    """A predictions.csv as ``medsight evaluate`` writes it for a three-class run: 12 patients
    (raw IDs, also inside the image paths) with 2 images each, sex 12 F / 12 M, an age."""
    p = np.random.default_rng(seed).dirichlet([1, 1, 1], n).round(6)
    labels = [CLASSES[i % 3] for i in range(n)]
    table = pd.DataFrame(
        {
            "sample_id": [f"scans/{RAW_PATIENTS[i // 2]}/{i % 2}.png" for i in range(n)],
            "label": labels,
            "predicted": [CLASSES[k] for k in p.argmax(axis=1)],
            **{f"p_{name}": p[:, k] for k, name in enumerate(CLASSES)},
            "patient_id": [RAW_PATIENTS[i // 2] for i in range(n)],
            "sex": ["F" if i % 2 else "M" for i in range(n)],
            "age": [20 + 3 * i for i in range(n)],
        }
    )
    table.to_csv(run / runs.PREDICTIONS, index=False)
    return table


@pytest.fixture
def evaluated(tmp_path) -> tuple[Path, pd.DataFrame]:
    run = write_run(tmp_path / "run", tmp_path / "data", classes=CLASSES)
    return run, write_predictions(run)


def said(result) -> str:
    """What a command printed, on one line (the terminal wraps long lines)."""
    return " ".join(result.output.split())


def read(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_parquet(out / sm.PREDICTIONS_FILE), pd.read_parquet(out / sm.EVENTS_FILE)


def test_scores_are_one_column_per_class_and_truth_one_event_per_image_and_class(
    evaluated, tmp_path
):
    run, table = evaluated
    result = sm.export_evaluation(run, tmp_path / "out", by=["sex"])
    predictions, events = read(tmp_path / "out")

    assert list(predictions.columns) == [
        "PatientId", "EncounterId", "ScoreTime", "p_normal", "p_effusion", "p_mass", "sex"
    ]  # fmt: skip
    for name in CLASSES:
        assert predictions[f"p_{name}"].tolist() == table[f"p_{name}"].tolist()
    assert (predictions["ScoreTime"] == sm.REFERENCE_TIME).all()
    # the run's positive class (write_run: the last) is the primary output and target
    assert (result.primary_output, result.primary_target) == ("p_mass", "mass (ground truth)")
    assert (result.predictions, result.events) == (24, 72)

    assert list(events.columns) == ["PatientId", "EncounterId", "Type", "EventTime", "Value"]
    assert sorted(events["Type"].unique()) == sorted(f"{c} (ground truth)" for c in CLASSES)
    assert (events["EventTime"] == sm.REFERENCE_TIME).all()
    encounter = dict(zip(predictions["EncounterId"], table["label"]))
    for row in events.itertuples():
        truth = encounter[row.EncounterId]
        assert row.Value == int(row.Type == f"{truth} (ground truth)"), row
    assert events.groupby("EncounterId")["Value"].sum().eq(1).all()  # one class each


def test_only_salted_pseudonyms_leave_medsight(evaluated, tmp_path):
    run, table = evaluated
    sm.export_evaluation(run, tmp_path / "out", by=["sex"])
    predictions, events = read(tmp_path / "out")

    assert predictions["PatientId"].tolist() == [pseudonymise(p) for p in table["patient_id"]]
    assert predictions["EncounterId"].tolist() == [pseudonymise(s) for s in table["sample_id"]]
    assert predictions["PatientId"].nunique() == 12  # a patient's two images: one pseudonym
    cells = [str(v) for frame in (predictions, events) for v in frame.to_numpy().ravel()]
    files = [p.read_text() for p in (tmp_path / "out").iterdir() if p.suffix != ".parquet"]
    for raw in RAW_PATIENTS:
        assert not any(raw in cell for cell in cells), raw
        assert not any(raw in text for text in files), raw


def test_an_image_without_a_patient_id_is_its_own_patient(evaluated, tmp_path):
    run, table = evaluated
    table.loc[5, "patient_id"] = None
    table.to_csv(run / runs.PREDICTIONS, index=False)
    sm.export_evaluation(run, tmp_path / "out")
    predictions, _ = read(tmp_path / "out")

    assert predictions["PatientId"][5] == pseudonymise(table["sample_id"][5])
    assert predictions["PatientId"][4] == pseudonymise(RAW_PATIENTS[2])


def test_config_files_parse_and_name_the_columns_the_tables_have(evaluated, tmp_path):
    run, _ = evaluated
    runs.write_json(
        run / runs.METRICS,
        {"thresholds": {"mass": {"youden": {"threshold": 0.41}, "sens_90": {"threshold": 0.2}}}},
    )
    out = tmp_path / "out"
    sm.export_evaluation(run, out, by=["sex", "age"])
    predictions, events = read(out)

    info = yaml.safe_load((out / "config.yml").read_text())["other_info"]
    for key in ("usage_config", "prediction_definition", "event_definition"):
        assert (out / info[key]).is_file(), key
    for key in ("prediction_path", "event_path", "metadata_path"):
        assert (out / info["data_dir"] / info[key]).is_file(), key

    usage = yaml.safe_load((out / "usage_config.yml").read_text())["data_usage"]
    named = [usage["entity_id"], usage["context_id"], usage["predict_time"], *usage["outputs"]]
    named += [c["source"] for c in usage["cohorts"]]
    assert set(named) == set(predictions.columns)
    assert usage["outputs"][0] == usage["primary_output"] == "p_mass"
    assert {e["source"] for e in usage["events"]} == set(events["Type"])
    assert usage["primary_target"] in {e["display_name"] for e in usage["events"]}
    assert all(e["window_hr"] > 0 and e["usage"] == "target" for e in usage["events"])

    dictionary = yaml.safe_load((out / "dictionary.yml").read_text())
    assert [i["name"] for i in dictionary["predictions"]] == list(predictions.columns)
    assert {i["name"] for i in dictionary["events"]} == set(events["Type"])
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["thresholds"] == [0.41, 0.2]
    assert "Open it" in (out / "README.md").read_text()


def test_cohorts_are_text_and_many_numbers_are_decade_bands(evaluated, tmp_path):
    run, table = evaluated
    table.loc[3, "sex"] = None
    table.to_csv(run / runs.PREDICTIONS, index=False)
    # without --by: the subgroups of the last evaluation
    runs.write_json(run / runs.METRICS, {"subgroups": {"sex": {}, "age": {}}})
    result = sm.export_evaluation(run, tmp_path / "out")
    predictions, _ = read(tmp_path / "out")

    assert result.cohorts == ["sex", "age"]
    assert predictions["sex"].tolist()[:5] == ["M", "F", "M", "missing", "M"]
    assert predictions["age"].tolist()[:5] == ["20-29", "20-29", "20-29", "20-29", "30-39"]
    assert predictions["age"].iloc[-1] == "80-89"  # 20 + 3 * 23 = 89


@pytest.mark.parametrize("task", ["multilabel", "detect"])
def test_findings_and_boxes_give_one_event_per_finding(tmp_path, task):
    run = write_run(tmp_path / "run", tmp_path / "data", classes=("bright", "dark"))
    model = json.loads((run / runs.MODEL).read_text())
    runs.write_json(run / runs.MODEL, {**model, "task": task})
    labels = ["bright|dark", "no finding", "dark", "bright|?dark"]
    pd.DataFrame(
        {
            "sample_id": [f"{i}.png" for i in range(4)],
            "label": labels,
            "predicted": labels,
            "p_bright": [0.9, 0.1, 0.2, 0.8],  # a detector's: the top box score of the class
            "p_dark": [0.7, 0.3, 0.6, 0.5],
        }
    ).to_csv(run / runs.PREDICTIONS, index=False)

    result = sm.export_evaluation(run, tmp_path / "out", primary="dark")
    predictions, events = read(tmp_path / "out")

    assert result.primary_output == "p_dark"
    assert predictions["p_dark"].tolist() == [0.7, 0.3, 0.6, 0.5]
    values = events.pivot(index="EncounterId", columns="Type", values="Value")
    values = values.loc[predictions["EncounterId"]]
    assert values["bright (ground truth)"].tolist() == [1, 0, 0, 1]
    assert values["dark (ground truth)"].fillna(-1).tolist() == [1, 0, 1, -1]  # ?dark: none
    assert len(events) == 7 and "uncertain" in result.notes[0]
    # no patient column: each image is its own patient
    assert (predictions["PatientId"] == predictions["EncounterId"]).all()


def test_refuses_identifiers_as_cohorts_unknown_columns_and_unevaluated_runs(evaluated, tmp_path):
    run, _ = evaluated
    with pytest.raises(DataError, match="patient_id identifies a patient"):
        sm.export_evaluation(run, tmp_path / "out", by=["patient_id"])
    with pytest.raises(DataError, match=r"\['ward'\] are not in predictions.csv.*'sex'"):
        sm.export_evaluation(run, tmp_path / "out", by=["ward"])
    with pytest.raises(ConfigError, match="--primary 'cyst' is not a class"):
        sm.export_evaluation(run, tmp_path / "out", primary="cyst")
    (run / runs.PREDICTIONS).unlink()
    with pytest.raises(DataError, match="run `medsight evaluate"):
        sm.export_evaluation(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_evaluate_with_seismometer_writes_the_evaluated_predictions(tmp_path):
    data = make_two_class_manifest(tmp_path / "data", n_patients=6, per_patient=2)
    run = write_run(tmp_path / "run", data)
    out = tmp_path / "for-seismometer"
    runner = CliRunner()
    argv = ["evaluate", str(run), "--data", str(data), "--by", "sex", "--bootstrap", "0"]
    result = runner.invoke(app, [*argv, "--device", "cpu", "--seismometer", str(out)])
    assert result.exit_code == 0, result.output
    assert "12 predictions, 24 events" in said(result)

    predictions, _ = read(out)
    evaluated = pd.read_csv(run / runs.PREDICTIONS)
    assert predictions["p_lesion"].tolist() == pytest.approx(evaluated["p_lesion"].tolist())
    assert list(predictions.columns[-1:]) == ["sex"]

    again = runner.invoke(app, ["seismometer", str(run), str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    assert "cohorts: sex" in said(again)  # the last evaluation's --by
    bad = runner.invoke(app, ["seismometer", str(run), str(tmp_path / "x"), "--by", "patient_id"])
    assert bad.exit_code == 2 and "error: --by patient_id identifies" in said(bad)


# --------------------------------------------------------------------------- worklist

#: (patient pseudonym, model label, probabilities, reviewer label or None, context)
STUDIES = [
    ("p-aaaa", "mass", {"normal": 0.1, "effusion": 0.2, "mass": 0.7}, "mass", {"priority": "stat"}),
    ("p-aaaa", "normal", {"normal": 0.6, "effusion": 0.3, "mass": 0.1}, "effusion", None),
    (None, "effusion", {"normal": 0.2, "effusion": 0.5, "mass": 0.3}, "normal", {"age_years": 71}),
    ("p-bbbb", "normal", {"normal": 0.8, "effusion": 0.1, "mass": 0.1}, None, None),
]


def reviewed_worklist(root: Path, run: Path) -> tuple[WorklistStore, list[Study]]:
    """Four studies scored by ``run`` (three reviewed; the first after a wait of three days)
    and one scored by another run."""
    store = WorklistStore(f"sqlite:///{root / 'worklist.db'}", root)
    studies = []
    model = {"name": "medcnn_s", "run": run.name, "version": "0123456789ab"}
    for i, (patient, label, probs, _, context) in enumerate(STUDIES + [STUDIES[0]]):
        studies.append(
            store.add(
                data=bytes([i]) * 8,
                extension=".png",
                format="png",
                meta={"patient": patient, "modality": "CR"},
                label=label,
                probabilities=probs,
                urgency=probs["mass"],
                flag=None,
                model=model if i < 4 else {**model, "run": "another-run"},
                context=context,
            )
        )
    earlier = studies[0].received_at - timedelta(days=3)
    with store.sessions.begin() as session:
        session.execute(update(Study).where(Study.id == studies[0].id).values(received_at=earlier))
    for study, (*_, reviewer, _) in zip(studies, STUDIES + [STUDIES[0]]):
        if reviewer is not None:
            store.update(study.id, "reviewed", reviewer)
    return store, [store.get(s.id) for s in studies]


def test_worklist_reviews_become_outcomes_at_the_time_of_review(tmp_path):
    run = write_run(tmp_path / "run", tmp_path / "data", classes=CLASSES)
    store, studies = reviewed_worklist(tmp_path / "worklist", run)
    result = export_worklist(run, store, tmp_path / "out")
    predictions, events = read(tmp_path / "out")

    reviewed = studies[:3]  # the fourth is pending, the fifth another run's
    assert predictions["EncounterId"].tolist() == [f"study-{s.id}" for s in reviewed]
    assert predictions["PatientId"].tolist()[:2] == ["p-aaaa", "p-aaaa"]
    assert predictions["PatientId"][2] == pseudonymise(f"worklist-study-{reviewed[2].id}")
    assert predictions["p_mass"].tolist() == [0.7, 0.1, 0.3]
    received = [s.received_at.replace(tzinfo=None) for s in reviewed]
    assert predictions["ScoreTime"].tolist() == received
    assert predictions["priority"].tolist() == ["stat", "missing", "missing"]
    assert predictions["age_band"].tolist() == ["missing", "missing", "70-79"]
    assert set(predictions["model_version"]) == {"0123456789ab"}

    assert len(events) == 9 and result.primary_target == "mass (reviewer)"
    values = events.pivot(index="EncounterId", columns="Type", values="Value")
    assert values.loc[f"study-{reviewed[0].id}"].to_dict() == {
        "effusion (reviewer)": 0, "mass (reviewer)": 1, "normal (reviewer)": 0
    }  # fmt: skip
    assert values.loc[f"study-{reviewed[1].id}", "effusion (reviewer)"] == 1
    times = events.drop_duplicates("EncounterId")["EventTime"].tolist()
    assert times == [s.reviewed_at.replace(tzinfo=None) for s in reviewed]
    usage = yaml.safe_load((tmp_path / "out" / "usage_config.yml").read_text())["data_usage"]
    assert usage["events"][0]["window_hr"] >= 72  # the three-day wait for review fits
    assert result.notes == [
        "1 study not reviewed yet left out (seismometer would count a study without its review as "
        "negative)"
    ]


def test_worklist_export_from_the_command_line(tmp_path):
    run = write_run(tmp_path / "run", tmp_path / "data", classes=CLASSES)
    reviewed_worklist(run / "worklist", run)
    out = tmp_path / "reviews"
    result = CliRunner().invoke(app, ["seismometer", str(run), str(out), "--worklist"])
    assert result.exit_code == 0, result.output
    assert "3 predictions, 9 events" in said(result)
    assert "cohorts: model_version, modality, priority, age_band" in said(result)

    other = write_run(tmp_path / "other", tmp_path / "data", classes=CLASSES)
    db = f"sqlite:///{run / 'worklist' / 'worklist.db'}"
    refused = CliRunner().invoke(
        app, ["seismometer", str(other), str(out), "--worklist", "--db", db]
    )
    assert refused.exit_code == 2
    assert "no reviewed study scored by the run 'other'" in said(refused)
    missing = CliRunner().invoke(app, ["seismometer", str(other), str(out), "--worklist"])
    assert missing.exit_code == 2 and "no worklist at" in said(missing)


# --------------------------------------------------------------------------- seismometer itself

SEISMOMETER = "seismometer==0.5.0"
VENV = Path(
    os.environ.get(
        "MEDSIGHT_SEISMOMETER_VENV",
        Path.home() / ".cache" / "medsight-tests" / "seismometer-venv",
    )
)
LOADER = Path(__file__).with_name("seismometer_load.py")


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / "python"


def _has_seismometer(python: Path) -> bool:
    if not python.exists():
        return False
    check = [str(python), "-c", f"import seismometer; assert seismometer.__version__ == "
             f"{SEISMOMETER.split('==')[1]!r}"]  # fmt: skip
    return subprocess.run(check, capture_output=True).returncode == 0


def seismometer_python() -> Path:
    """The Python of a virtual environment with seismometer installed from PyPI (made once,
    then reused); the test skips when PyPI cannot be reached, except in CI, where it fails."""
    python = _venv_python(VENV)
    if _has_seismometer(python):
        return python
    probe = [sys.executable, "-m", "pip", "index", "versions", "seismometer"]
    try:
        reachable = subprocess.run(probe, capture_output=True, timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        reachable = False
    if not reachable:
        message = f"PyPI cannot be reached to install {SEISMOMETER} into {VENV}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    building = VENV.with_name(f"{VENV.name}.{os.getpid()}.tmp")
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
    install = [str(_venv_python(building)), "-m", "pip", "install", "-q", SEISMOMETER]
    done = subprocess.run(install, capture_output=True, text=True, timeout=1500)
    if done.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        pytest.fail(f"pip install {SEISMOMETER} failed:\n{done.stderr[-3000:]}")
    shutil.rmtree(VENV, ignore_errors=True)
    building.rename(VENV)  # whole or not at all: a killed install leaves only a .tmp folder
    return python


def test_seismometer_loads_the_exports_with_its_own_startup(tmp_path):
    python = seismometer_python()
    run = write_run(tmp_path / "run", tmp_path / "data", classes=CLASSES)
    table = write_predictions(run)
    sm.export_evaluation(run, tmp_path / "evaluation", by=["sex", "age"])
    store, studies = reviewed_worklist(tmp_path / "worklist", run)
    export_worklist(run, store, tmp_path / "reviews")

    folders = [tmp_path / "evaluation", tmp_path / "reviews"]
    done = subprocess.run(
        [str(python), str(LOADER), *map(str, folders)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])

    evaluation = loaded[str(folders[0])]
    assert (evaluation["rows"], evaluation["entities"]) == (24, 12)
    assert evaluation["entity_keys"] == ["PatientId", "EncounterId"]
    assert evaluation["output"] == "p_mass" and evaluation["target"] == "mass (ground truth)_Value"
    order = {pseudonymise(s): i for i, s in enumerate(table["sample_id"])}
    rows = [order[key] for key in evaluation["keys"]]
    assert evaluation["scores"]["p_mass"] == pytest.approx(table["p_mass"][rows].tolist())
    truth = (table["label"][rows] == "mass").astype(float).tolist()
    assert evaluation["truth"]["mass (ground truth)"] == truth
    # seismometer shows cohorts of more than 10 rows: sex 12/12; the age decades are too small
    assert evaluation["cohorts"] == {"sex": ["F", "M"]}

    reviews = loaded[str(folders[1])]
    assert (reviews["rows"], reviews["entities"]) == (3, 2)
    assert reviews["keys"] == sorted(f"study-{s.id}" for s in studies[:3])
    assert reviews["scores"]["p_mass"] == [0.7, 0.1, 0.3]
    # each study keeps its review, also the one reviewed three days after it was scored
    assert reviews["truth"]["mass (reviewer)"] == [1.0, 0.0, 0.0]
    assert reviews["truth"]["effusion (reviewer)"] == [0.0, 1.0, 0.0]
    assert reviews["truth"]["normal (reviewer)"] == [0.0, 0.0, 1.0]
