"""medsight demo: the whole job on a user's (tiny) data, ending with an HTML report."""

from __future__ import annotations

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
