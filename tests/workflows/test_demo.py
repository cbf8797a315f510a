"""medsight demo: the whole job on a user's (tiny) data, ending with an HTML report."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from medsight.cli import app


def test_demo_on_own_data_writes_run_and_report(tmp_path, helpers):
    data = helpers.make_two_class_manifest(tmp_path / "data", n_patients=40, per_patient=3)
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        app, ["demo", "--data", str(data), "--out", str(out), "--epochs", "1"]
    )
    assert result.exit_code == 0, result.output
    report = out / "run" / "report.html"
    assert report.exists() and "Not for diagnosis" in report.read_text()
    assert (out / "run" / "metrics.json").exists()
    assert "open the report" in result.output
    again = CliRunner().invoke(app, ["demo", "--data", str(data), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_the_multilabel_demo_trains_evaluates_and_explains_each_finding(tmp_path):
    import json

    from medsight.data.synth import write_multilabel_phantoms

    data = tmp_path / "findings"
    write_multilabel_phantoms(data, n=160, size=32, seed=0)
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        app, ["demo", "--task", "multilabel", "--data", str(data), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "test AUROC per finding: calcification" in result.output
    assert json.loads((out / "run" / "model.json").read_text())["task"] == "multilabel"
    localisation = json.loads((out / "run" / "localisation.json").read_text())
    assert localisation["target"] == "each finding present"
    best = localisation["methods"][localisation["best_method"]]
    # each CAM method tried the last stage, the one before and all three fused
    assert set(best["layers_tried"]) == {
        "backbone.stage3",
        "backbone.stage2",
        "backbone.stage1,backbone.stage2,backbone.stage3",
    }
    assert best["layer"] in best["layers_tried"]
    assert localisation["sanity"][localisation["best_method"]]["passes"] is not False
    assert set(best["per_finding"]) <= {"calcification", "cyst", "nodule"}
    html = (out / "run" / "report.html").read_text()
    assert "Co-occurrence" in html
    assert "Per finding: " in html and "findings of the test split" in html  # the maps, per finding

    refused = CliRunner().invoke(app, ["demo", "--task", "segment", "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2
    assert "the demo runs classify or multilabel or detect" in refused.output


def test_the_detection_demo_trains_a_detector_and_reports_froc(tmp_path, monkeypatch):
    from medsight.workflows import demo

    monkeypatch.setattr(demo, "DEMO_DETECT_IMAGES", 48)  # the code path, not the accuracy
    result = CliRunner().invoke(app, ["demo", "--task", "detect", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "lesion sensitivity at 1 FP/image" in result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"map50", "froc", "median_iou"} <= set(metrics)
    html = (tmp_path / "run" / "report.html").read_text()
    assert 'id="froc"' in html and 'id="detection-gallery"' in html
