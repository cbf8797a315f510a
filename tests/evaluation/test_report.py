"""The HTML report: self-contained, complete, escaped, and written even when the data moved.

Runs are built by hand (no training): the run files, a tiny manifest of PNGs, and metrics.json /
predictions.csv computed with ``compute_metrics`` on random probabilities.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medsight.config import DataConfig, TrainConfig
from medsight.data.transforms import Preprocess
from medsight.errors import ConfigError, DataError
from medsight.evaluation.report import write_report
from medsight.evaluation.subgroups import subgroup_metrics
from medsight.tasks.classify_metrics import compute_metrics

SECTIONS = (
    "Summary",
    "Confusion matrix",
    "ROC and precision–recall curves",
    "Calibration",
    "Operating points",
    "Per-class metrics",
    "Subgroups",
    "Training",
    "Examples",
    "Model card",
)
N_FIGURES = 4  # confusion matrix, ROC/PR, reliability, training curves
TRICKY = '<b>lesion & "mass"</b>'


def make_run(root: Path, classes: list[str], positive: str, *, by=(), n: int = 60) -> Path:
    """A finished, evaluated run over a manifest of ``n`` 16×16 PNGs (one per patient)."""
    from tests.conftest import random_image, write_png

    rng = np.random.default_rng(0)
    k = len(classes)
    data, run = root / "data", root / "run"
    run.mkdir(parents=True)
    y = np.arange(n) % k
    split = np.array(["train", "train", "val", "test", "test"] * (n // 5 + 1))[:n]
    manifest = pd.DataFrame(
        {
            "path": [f"img/{i:03d}.png" for i in range(n)],
            "label": [classes[c] for c in y],
            "patient_id": [f"P{i:03d}" for i in range(n)],
            "sex": rng.choice(["F", "M"], n),
        }
    )
    for i, rel in enumerate(manifest["path"]):
        write_png(data / rel, random_image(i))
    manifest.to_csv(data / "manifest.csv", index=False)

    (run / "config.yaml").write_text(TrainConfig(data=DataConfig(path=str(data))).to_yaml())
    model = {
        "name": "medcnn_s",
        "num_classes": k,
        "in_chans": 1,
        "attention": "none",
        "drop_rate": 0.1,
        "image_size": [16, 16],
        "mode": "full",
        "frozen_stages": 0,
        "pretrained_source": None,
    }
    (run / "model.json").write_text(json.dumps(model))
    Preprocess(size=(16, 16)).save(run / "preprocess.json")
    (run / "classes.json").write_text(json.dumps({"classes": classes, "positive": positive}))
    (run / "versions.json").write_text(json.dumps({"python": "3.11", "medsight": "0.1.0"}))
    pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "train_loss": [0.9, 0.6, 0.4],
            "val_loss": [0.8, 0.7, 0.75],
            "val_auroc": [0.6, 0.8, 0.78],
            "val_accuracy": [0.5, 0.7, 0.7],
            "val_balanced_accuracy": [0.5, 0.68, 0.7],
            "lr": [1e-3, 5e-4, 1e-4],
            "train_seconds": [1.0, 1.0, 1.0],
            "seconds": [1.2, 1.1, 1.1],
        }
    ).to_csv(run / "history.csv", index=False)
    manifest.assign(sample_id=manifest["path"], split=split)[
        ["sample_id", "label", "patient_id", "split"]
    ].to_csv(run / "splits.csv", index=False)

    test = manifest[split == "test"].reset_index(drop=True)
    y_test = y[split == "test"]
    logits = rng.normal(size=(len(test), k)) + 1.5 * np.eye(k)[y_test]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    metrics = compute_metrics(y_test, probs, classes, positive=positive, n_bootstrap=50)
    metrics.update(split="test", data=str(data), calibration=None, subgroups={})
    for column in by:
        metrics["subgroups"][column] = subgroup_metrics(
            y_test, probs, classes, test[column], column=column, positive=positive, n_bootstrap=20
        )
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    predictions = pd.DataFrame(
        {
            "sample_id": test["path"],
            "label": test["label"],
            "predicted": [classes[c] for c in probs.argmax(axis=1)],
        }
    )
    for c, name in enumerate(classes):
        predictions[f"p_{name}"] = probs[:, c]
    predictions["sex"] = test["sex"]
    predictions.to_csv(run / "predictions.csv", index=False)
    return run


def img_sources(html: str) -> list[str]:
    return re.findall(r"<img\b[^>]*?\bsrc=\"([^\"]*)\"", html)


@pytest.fixture(scope="module")
def binary_report(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("report"), ["normal", TRICKY], TRICKY, by=["sex"])
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["per_class"]["normal"]["npv"] = {"value": None, "ci": None}  # as for 0 / 0
    (run / "metrics.json").write_text(json.dumps(metrics))
    path = write_report(run)
    return run, path.read_text(encoding="utf-8")


def test_report_is_written_into_the_run_and_is_self_contained(binary_report):
    run, html = binary_report
    assert (run / "report.html").is_file()
    links = re.findall(r"\b(?:src|href)\s*=\s*\"([^\"]*)\"", html)
    assert links and not [u for u in links if u.startswith(("http:", "https:", "//"))]
    assert "http://" not in html and "https://" not in html
    sources = img_sources(html)
    assert len(sources) > N_FIGURES  # the figures and the example thumbnails
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in html and "<link" not in html


def test_report_has_every_section_the_headline_auroc_and_the_warning(binary_report):
    run, html = binary_report
    for heading in SECTIONS:
        assert re.search(rf"<h2>{re.escape(heading)}</h2>", html), heading
    auroc = json.loads((run / "metrics.json").read_text())["auroc"]["value"]
    assert repr(auroc) in html  # exact, as in metrics.json (tooltip)
    assert f"{auroc:.3f}" in html  # as shown
    assert "Not for diagnosis" in html


def test_class_names_are_escaped(binary_report):
    _, html = binary_report
    assert TRICKY not in html and "<b>lesion" not in html
    assert "&lt;b&gt;lesion &amp; &#34;mass&#34;&lt;/b&gt;" in html


def test_undefined_values_show_a_dash_with_a_tooltip(binary_report):
    _, html = binary_report
    section = html[html.index('id="per-class"') : html.index('id="subgroups"')]
    assert section.count('<span class="undef" title="undefined">—</span>') == 1


def test_subgroup_table_lists_the_groups(binary_report):
    _, html = binary_report
    section = html[html.index('id="subgroups"') : html.index('id="training"')]
    assert "By sex" in section and "Largest gap" in section
    for group in ("F", "M"):
        assert f'<td class="name">{group}' in section
    assert "By sex:" in html[html.index('id="model-card"') :]  # quoted in the bias statement


def test_report_without_data_or_subgroups_still_renders(tmp_path):
    classes = ["a", "b", "c"]
    run = make_run(tmp_path, classes, "c", n=45)
    shutil.rmtree(tmp_path / "data")
    path = write_report(run, out=tmp_path / "elsewhere.html", examples=2)
    html = path.read_text(encoding="utf-8")
    assert path == tmp_path / "elsewhere.html"
    assert "Example images are not shown" in html and "could not be read" in html
    assert len(img_sources(html)) == N_FIGURES  # no thumbnails
    assert "No subgroup analysis was requested" in html and "--by sex" in html
    assert "No subgroup audit was run" in html
    assert "one-vs-rest" in html


def test_missing_metrics_asks_for_evaluate(tmp_path):
    run = make_run(tmp_path, ["normal", "lesion"], "lesion", n=20)
    (run / "metrics.json").unlink()
    with pytest.raises(DataError, match="medsight evaluate"):
        write_report(run)
    assert not (run / "report.html").exists()


def test_model_card_states_a_tie_instead_of_a_gap_between_one_group_and_itself():
    from medsight.evaluation.report import _largest_gaps

    groups = {g: {"n": 40, "auroc": {"value": 1.0}, "sensitivity": {"value": 0.9}} for g in "FM"}
    gaps = {
        "auroc": {"gap": 0.0, "highest": "F", "lowest": "M"},
        "sensitivity": {"gap": 0.0, "highest": "M", "lowest": "F"},
    }
    findings = _largest_gaps({"subgroups": {"sex": {"groups": groups, "gaps": gaps}}})
    assert findings == [
        "By sex: AUROC is the same (1.000) in every group; "
        "sensitivity is the same (0.900) in every group."
    ]


def test_page_has_the_sections_its_task_lists_in_its_order(tmp_path, monkeypatch):
    from medsight import tasks
    from medsight.tasks.classify import ClassifyTask

    class Brief(ClassifyTask):
        name = "brief"
        report_sections = ("model_card", "summary", "per_class")

    monkeypatch.setitem(tasks.TASKS, Brief.name, Brief)
    run = make_run(tmp_path, ["normal", "lesion"], "lesion", n=20)
    model = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**model, "task": "brief"}))
    html = write_report(run, examples=0).read_text(encoding="utf-8")
    shown = re.findall(r'<section class="card" id="([a-z-]+)">', html)
    assert shown == ["model-card", "summary", "per-class"]
    assert re.findall(r'<a href="#([a-z-]+)">', html.split("</nav>")[0]) == shown
    assert not img_sources(html)  # no figure section, no thumbnails

    Brief.report_sections = ("summary", "sankey")
    with pytest.raises(ConfigError, match=r"\['sankey'\]"):
        write_report(run)


def test_training_curves_follow_validations_within_epochs(tmp_path):
    # a run that validated within epochs: several history rows per epoch, placed by fraction
    run = make_run(tmp_path, ["normal", "lesion"], "lesion", n=20)
    pd.DataFrame(
        {
            "epoch": [1, 1, 1, 2, 2],
            "epoch_fraction": [0.25, 0.5, 1.0, 1.5, 1.75],
            "step": [10, 20, 40, 60, 70],
            "images_seen": [640, 1280, 2560, 3840, 4480],
            "val_images": [200, 200, 900, 200, 900],
            "train_loss": [0.9, 0.7, 0.6, 0.5, 0.45],
            "val_loss": [0.8, 0.7, 0.6, 0.55, 0.6],
            "val_auroc": [0.6, 0.7, 0.8, 0.85, 0.84],
            "val_accuracy": [0.5, 0.6, 0.7, 0.75, 0.74],
            "val_balanced_accuracy": [0.5, 0.6, 0.7, 0.75, 0.74],
            "lr": [1e-3] * 5,
            "train_seconds": [1.0] * 5,
            "seconds": [1.2] * 5,
        }
    ).to_csv(run / "history.csv", index=False)
    html = write_report(run).read_text(encoding="utf-8")
    section = html[html.index('id="training"') :]
    assert "1.75 epochs, planned from the training-set size" in section
    assert "Best epoch <strong>1.5</strong>" in section and "val AUROC 0.850" in section
    assert "Training curves" in section and "data:image/png;base64," in section


def test_model_card_says_where_the_run_trained(tmp_path):
    run = make_run(tmp_path, ["normal", "lesion"], "lesion")
    assert "Trained on" not in write_report(run).read_text()  # a run from before it was kept
    model = json.loads((run / "model.json").read_text())
    model["trained_on"] = {
        "device": "cuda:0 (NVIDIA H100)",
        "precision": "bf16",
        "processes": 2,
        "backend": "nccl",
        "batch_per_process": 32,
        "effective_batch": 64,
    }
    (run / "model.json").write_text(json.dumps(model))
    card = write_report(run).read_text()
    card = card[card.index('id="model-card"') :]
    assert (
        "Trained on cuda:0 (NVIDIA H100), bf16; 2 data-parallel processes (nccl), effective "
        "batch 64 = 2 × 32." in card
    )
