"""``medsight explain``: overlays, maps and the JSONL log; localisation scoring; clean errors."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from medsight.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_explain_writes_overlay_map_and_jsonl(tiny_run, mask_data, tmp_path):
    images = sorted((mask_data.parent / "img").glob("lesion_*.png"))[:2]
    out = tmp_path / "why"
    result = _run("explain", tiny_run, *images, "--method", "gradcam", "--out", out)
    assert result.exit_code == 0, result.output
    lines = [json.loads(s) for s in (out / "explanations.jsonl").read_text().splitlines()]
    assert [r["image"] for r in lines] == [str(p) for p in images]
    first = lines[0]
    fused = "backbone.stage1,backbone.stage2,backbone.stage3"
    assert (
        first["method"] == "gradcam" and first["layer"] == fused and first["chosen_by"] == "asked"
    )
    assert first["predicted"] in ("normal", "lesion")
    assert set(first["probabilities"]) == {"normal", "lesion"}
    assert abs(sum(first["probabilities"].values()) - 1) < 1e-5
    overlay = Image.open(out / first["overlay"])
    assert overlay.mode == "RGB" and min(overlay.size) >= 256  # enlarged so the label reads
    heatmap = np.load(out / first["map"])
    assert heatmap.shape == (16, 16) and 0 <= heatmap.min() <= heatmap.max() <= 1

    again = _run("explain", tiny_run, images[0], "--method", "attention", "--class", "lesion",
                 "--out", out)  # fmt: skip
    assert again.exit_code == 0, again.output
    lines = (out / "explanations.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["target"] == "lesion"


def test_explain_masks_scores_the_run(tiny_run, mask_data):
    result = _run("explain", tiny_run, "--data", mask_data, "--masks", "--methods",
                  "gradcam,ig", "--split", "all", "--faithfulness", "0")  # fmt: skip
    assert result.exit_code == 0, result.output
    scores = json.loads((tiny_run / "localisation.json").read_text())
    assert list(scores["methods"]) == ["gradcam", "ig"] and scores["n_missing_masks"] == 1
    assert "pointing" in result.output and "1 lesion image(s) had no mask" in result.output


def test_explain_errors_are_one_clear_line(tiny_run, mask_data, tmp_path):
    image = next((mask_data.parent / "img").glob("lesion_*.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    cases = [
        (("explain", tiny_run, broken, "--out", tmp_path / "o"), "broken.png cannot be explained"),
        (("explain", tiny_run, image, "--layer", "backbone.nope", "--out", tmp_path / "o"),
         "candidate layers"),
        (("explain", tiny_run, image, "--method", "magic", "--out", tmp_path / "o"),
         "choose one of"),
        (("explain", tiny_run, image), "--out"),
        (("explain", tiny_run, image, "--class", "tumour", "--out", tmp_path / "o"),
         "not one of the run's classes"),
    ]  # fmt: skip
    for args, message in cases:
        result = _run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output


def test_report_gains_the_explanation_table_and_gallery(tiny_run, mask_data):
    import warnings

    from medsight.evaluation.evaluate import evaluate_run
    from medsight.evaluation.report import write_report
    from medsight.explain import score_localisation

    evaluate_run(tiny_run, data=mask_data)
    assert 'id="explanations"' not in write_report(tiny_run).read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        score_localisation(tiny_run, mask_data, methods=["gradcam"], split=None, faithfulness=0)
    html = write_report(tiny_run).read_text()
    assert 'id="explanations"' in html and "Pointing game" in html
    assert "True positives" in html and "False negatives" in html


def test_auto_on_a_run_never_scored_against_masks_says_what_it_falls_back_to(
    tiny_run, mask_data, tmp_path
):
    image = sorted((mask_data.parent / "img").glob("lesion_*.png"))[0]
    result = _run("explain", tiny_run, image, "--out", tmp_path / "why")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "note: gradcam on backbone.stage1,backbone.stage2,backbone.stage3" in text
    assert "has no maps scored against lesion masks" in text and "--masks" in text
    record = json.loads((tmp_path / "why" / "explanations.jsonl").read_text().splitlines()[0])
    assert record["chosen_by"] == "default"
