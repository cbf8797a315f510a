"""evaluate → report → compare on a tiny trained multi-label run (two findings per image)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from medsight.cli import app
from medsight.data.findings import multi_hot
from medsight.errors import DataError
from medsight.evaluation.compare import compare_runs
from medsight.evaluation.evaluate import evaluate_run, select_split
from medsight.evaluation.report import write_report
from medsight.runs import Run
from medsight.tasks import get_task
from medsight.tasks.multilabel_metrics import compute_metrics

FINDINGS = ["bright", "dark"]


def make_findings_manifest(root, n_patients=24, per_patient=2, size=16):
    """A bright square top-left = "bright", a dark one bottom-right = "dark" (either, both or
    neither); a few "dark" entries uncertain (-1); patients and sex columns."""
    from tests.conftest import write_png

    rng = np.random.default_rng(0)
    lines = ["path,patient_id,sex,bright,dark"]
    for p in range(n_patients):
        for i in range(per_patient):
            bright, dark = int(rng.random() < 0.5), int(rng.random() < 0.4)
            pixels = rng.normal(110, 20, (size, size))
            if bright:
                pixels[1:7, 1:7] = 240
            if dark:
                pixels[9:15, 9:15] = 5
            rel = f"img/{p}_{i}.png"
            write_png(root / rel, np.clip(pixels, 0, 255))
            dark_text = "-1" if (p * per_patient + i) % 11 == 5 else str(dark)
            lines.append(f"{rel},P{p},{'F' if p % 2 else 'M'},{bright},{dark_text}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
    from medsight.training.trainer import train

    root = tmp_path_factory.mktemp("multilabel")
    manifest = make_findings_manifest(root / "data")
    config = TrainConfig(
        data=DataConfig(path=str(manifest), labels=",".join(FINDINGS), ratios=(0.5, 0.25, 0.25)),
        model=ModelConfig(name="medcnn_lite"),
        optim=OptimConfig(epochs=2, batch_size=8, lr=3e-3),
        out=str(root / "run"),
    )
    run = train(config, show_progress=False).path
    metrics = evaluate_run(run, n_bootstrap=100, by=["sex"])
    return run, metrics


def test_evaluate_writes_the_multilabel_metrics_and_predictions(evaluated):
    run, metrics = evaluated
    assert Run.load(run).task == "multilabel"
    predictions = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    assert list(predictions.columns[:5]) == [
        "sample_id",
        "label",
        "predicted",
        "p_bright",
        "p_dark",
    ]
    assert {"patient_id", "sex"} <= set(predictions.columns)
    assert len(predictions) == metrics["n"]
    probs = predictions[["p_bright", "p_dark"]].to_numpy()
    # the predicted column is the task's decoded label, the label column the findings text
    decoded = get_task("multilabel").decode(probs, FINDINGS)
    assert list(predictions["predicted"]) == [d["label"] for d in decoded]
    y = multi_hot(predictions["label"], FINDINGS)
    assert np.isnan(y).any()  # the uncertain "dark" entries came through as ignored
    for k, name in enumerate(FINDINGS):
        known = ~np.isnan(y[:, k])
        expected = roc_auc_score(y[known, k], probs[known, k])
        assert metrics["per_finding"][name]["auroc"]["value"] == pytest.approx(expected, abs=1e-9)
        assert set(metrics["thresholds"][name]) == {
            "sensitivity_0.90",
            "sensitivity_0.95",
            "youden",
        }
    same = compute_metrics(y, probs, FINDINGS, n_bootstrap=100, seed=0)
    for name in get_task("multilabel").headline_metrics:
        assert metrics[name] == same[name], name
    written = json.loads((run / "metrics.json").read_text())
    assert written["per_finding"] == json.loads(json.dumps(metrics["per_finding"]))
    groups = metrics["subgroups"]["sex"]["groups"]
    assert set(groups) == {"F", "M"}
    assert set(groups["F"]) >= {"n", "auroc_macro", "average_precision_macro", "hamming_loss"}


def test_calibrate_fits_one_temperature_per_finding(evaluated, tmp_path):
    run, _ = evaluated
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    metrics = evaluate_run(copy, n_bootstrap=0, calibrate=True)
    calibration = json.loads((copy / "calibration.json").read_text())
    assert calibration["method"] == "per-finding temperature"
    assert len(calibration["temperatures"]) == 2
    assert metrics["calibration"] == calibration


def test_select_split_names_a_finding_the_run_does_not_know(evaluated):
    run, _ = evaluated
    table = pd.DataFrame({"split": ["test", "test"], "label": ["bright", "bright|cyst"]})
    with pytest.raises(DataError, match=r"finding\(s\) \['cyst'\] are not findings of this run"):
        select_split(Run.load(run), table, "test")


def test_evaluate_cli_prints_the_findings_table(evaluated, tmp_path):
    run, _ = evaluated
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    result = CliRunner().invoke(app, ["evaluate", str(copy), "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    for text in ("auroc_macro", "auroc_micro", "hamming_loss", "Per finding", "bright", "dark"):
        assert text in result.output, text
    assert "Youden" in result.output
    assert "Per class" not in result.output


SECTION_IDS = [
    "summary",
    "findings",
    "finding-curves",
    "operating-points",
    "cooccurrence",
    "subgroups",
    "training",
    "examples",
    "model-card",
]


def test_report_shows_the_multilabel_sections(evaluated, tmp_path):
    run, metrics = evaluated
    html = write_report(run, out=tmp_path / "report.html").read_text(encoding="utf-8")
    assert re.findall(r'<section class="card" id="([a-z-]+)">', html) == SECTION_IDS
    assert "http://" not in html and "https://" not in html and "<script" not in html
    findings = html[html.index('id="findings"') : html.index('id="finding-curves"')]
    for name in FINDINGS:
        assert f'<td class="name">{name}</td>' in findings
    auroc = metrics["per_finding"]["dark"]["auroc"]["value"]
    assert repr(auroc) in findings  # exact value in the tooltip
    curves = html[html.index('id="finding-curves"') : html.index('id="operating-points"')]
    assert curves.count("data:image/png;base64,") == 2  # ROC and reliability small multiples
    cooccurrence = html[html.index('id="cooccurrence"') : html.index('id="subgroups"')]
    assert "data:image/png;base64," in cooccurrence
    assert "AUROC (macro)" in html and "Hamming loss" in html
    assert "multi-label: 2 findings" in html
    assert "A finding called wrong" in html or "All findings called right" in html
    assert 'id="confusion"' not in html and "Accuracy" not in html


def test_report_shows_an_absent_finding_as_undefined(evaluated, tmp_path):
    run, _ = evaluated
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    predictions = pd.read_csv(copy / "predictions.csv", keep_default_na=False)
    predictions["label"] = [
        "bright" if "bright" in label.split("|") else "no finding" for label in predictions["label"]
    ]  # "dark" never occurs
    predictions.to_csv(copy / "predictions.csv", index=False)
    y = multi_hot(predictions["label"], FINDINGS)
    probs = predictions[["p_bright", "p_dark"]].to_numpy()
    metrics = compute_metrics(y, probs, FINDINGS, n_bootstrap=20)
    metrics.update(split="test", data=None, calibration=None, subgroups={})
    (copy / "metrics.json").write_text(json.dumps(metrics))
    html = write_report(copy, examples=0).read_text(encoding="utf-8")
    findings = html[html.index('id="findings"') : html.index('id="finding-curves"')]
    dark = findings[findings.index('<td class="name">dark</td>') :].split("</tr>")[0]
    assert dark.count('<span class="undef" title="undefined">—</span>') == 2  # AUROC, AP
    assert "&#39;dark&#39; has no positive image" in html  # the note, in the warnings


def test_compare_two_multilabel_runs_tests_mean_and_per_finding_auroc(evaluated, tmp_path):
    run, _ = evaluated
    other = tmp_path / "other"
    shutil.copytree(run, other)
    predictions = pd.read_csv(other / "predictions.csv", keep_default_na=False)
    noise = np.random.default_rng(1).random(len(predictions))
    predictions["p_dark"] = 0.5 * predictions["p_dark"] + 0.5 * noise
    predictions.to_csv(other / "predictions.csv", index=False)
    result = compare_runs([run, other], n_bootstrap=100)
    paired = result["runs"][1]["paired"]
    assert paired["metric"] == "auroc_macro"
    assert paired["per_finding"]["bright"]["difference"] == 0.0
    first = result["runs"][0]["metrics"]["per_finding"]["dark"]["auroc"]["value"]
    second = result["runs"][1]["metrics"]["per_finding"]["dark"]["auroc"]["value"]
    assert paired["per_finding"]["dark"]["difference"] == pytest.approx(second - first)
    assert paired["difference"] == pytest.approx((second - first) / 2)
    output = CliRunner().invoke(app, ["compare", str(run), str(other), "--bootstrap", "50"])
    assert output.exit_code == 0, output.output
    assert "Δ mean" in output.output  # the mean AUROC's difference
    assert "AUROC of first" in output.output  # and the per-finding table
