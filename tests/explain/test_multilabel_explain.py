"""Explanations of a multi-label run: one Grad-CAM map per finding, through that finding's own
logit; ``--class`` picks the finding, and without it every finding above its threshold gets a
map (the most probable one when none is)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medsight.cli import app
from medsight.errors import ConfigError
from medsight.explain import Explainer, explain_files
from medsight.inference import Predictor
from tests.serving.multilabel import (
    copy_run,
    train_multilabel_run,
    write_finding_images,
    write_thresholds,
)


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory):
    return train_multilabel_run(tmp_path_factory.mktemp("ml-explain"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_finding_images(tmp_path_factory.mktemp("ml-explain-images"))


def _input(run, path) -> np.ndarray:
    from medsight.data.imaging import decode

    predictor = Predictor.from_run(run)
    return predictor.preprocess(decode(str(path)))[None].astype(np.float32)


def test_a_finding_is_explained_through_its_own_logit(ml_run, images):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = _input(ml_run, images["ab"])
    explainer = Explainer.from_run(ml_run, method="gradcam")
    maps = {name: explainer.explain(x, target=name) for name in ("a", "b")}
    explainer.close()
    assert not np.allclose(maps["a"], maps["b"], atol=1e-3)
    # The same as pytorch-grad-cam on that finding's output of the same network and layer.
    model = Explainer.from_run(ml_run, method="gradcam").model
    layers = [model.get_submodule(name) for name in explainer.layer.split(",")]
    with GradCAM(model=model, target_layers=layers) as cam:
        for index, name in enumerate(("a", "b")):
            direct = cam(input_tensor=torch.from_numpy(x), targets=[ClassifierOutputTarget(index)])
            expected = direct[0]
            span = expected.max() - expected.min()
            expected = (expected - expected.min()) / span if span > 1e-12 else expected * 0
            np.testing.assert_allclose(maps[name], expected, atol=1e-4)


def test_without_class_each_finding_above_threshold_gets_a_map_most_probable_first(
    ml_run, images, tmp_path
):
    run = copy_run(ml_run, tmp_path / "run")
    write_thresholds(run, {"a": 1e-6, "b": 1e-6})  # both findings above threshold
    records = explain_files(run, [images["ab"]], tmp_path / "both", method="gradcam")
    probs = records[0]["probabilities"]
    assert [r["target"] for r in records] == sorted(probs, key=probs.get, reverse=True)
    assert all(r["above_threshold"] and r["threshold"] == 1e-6 for r in records)
    for r in records:
        assert r["overlay"] == f"ab_{r['target']}_gradcam.png"
        assert (tmp_path / "both" / r["overlay"]).exists()
        assert r["target_probability"] == pytest.approx(probs[r["target"]])
    maps = [np.load(tmp_path / "both" / r["map"]) for r in records]
    assert not np.allclose(maps[0], maps[1], atol=1e-3)

    write_thresholds(run, {"a": 0.999999, "b": 0.999999})  # none above: the top finding only
    records = explain_files(run, [images["ab"]], tmp_path / "none", method="gradcam")
    assert len(records) == 1 and not records[0]["above_threshold"]
    assert records[0]["target"] == max(probs, key=probs.get)
    assert records[0]["predicted"] == "no finding"


def test_the_explain_command_with_class_maps_that_finding(ml_run, images, tmp_path):
    out = tmp_path / "out"
    runner = CliRunner()
    for finding in ("a", "b"):
        result = runner.invoke(
            app,
            ["explain", str(ml_run), str(images["ab"]), "--class", finding, "--out", str(out)],
        )
        assert result.exit_code == 0, result.output
        assert f"(map: {finding} " in result.output
    lines = [json.loads(line) for line in (out / "explanations.jsonl").read_text().splitlines()]
    assert [r["target"] for r in lines] == ["a", "b"]
    maps = [np.load(out / r["map"]) for r in lines]
    assert not np.allclose(maps[0], maps[1], atol=1e-3)


def test_an_unknown_finding_is_refused_listing_the_findings(ml_run, images, tmp_path):
    result = CliRunner().invoke(
        app,
        ["explain", str(ml_run), str(images["a"]), "--class", "c", "--out", str(tmp_path / "o")],
    )
    assert result.exit_code == 2
    assert "finding 'c' is not one of the run's findings: a, b" in result.output
    assert not (tmp_path / "o").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="finding 'c' is not one of the run's findings: a, b"):
        Explainer.from_run(ml_run).explain(_input(ml_run, images["a"]), target="c")
