"""The report of a detection run: the headline table, FROC, PR curves and the gallery of found
and missed lesions, rendered from a run folder written by hand (no training)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medsight.config import DataConfig, TrainConfig
from medsight.data.transforms import Preprocess
from medsight.evaluation.report import write_report
from medsight.tasks.detect_metrics import HEADLINE, detection_metrics

CLASSES = ["nodule", '<b>mass & "x"</b>']
SIDE = 48
N = 12
DETECT_SECTIONS = (
    "summary",
    "detection",
    "froc",
    "detection_pr",
    "detection_gallery",
    "training",
    "model_card",
)


def _boxes_of(i: int, rng) -> tuple[list, list]:
    """One image's true boxes ``[x1, y1, x2, y2, class]`` and predicted boxes
    ``[x1, y1, x2, y2, class, score]`` in pixels: lesions on two of three images, most found,
    some missed, a few false positives."""
    truth, found = [], []
    if i % 3:
        for j in range(1 + i % 2):
            x, y = 4 + 22 * j, 6 + (i % 4) * 4
            truth.append([x, y, x + 14, y + 12, CLASSES[(i + j) % 2]])
            if (i + j) % 5:
                found.append([x + 1, y, x + 15, y + 12, CLASSES[(i + j) % 2], 0.9 - 0.04 * i])
    if i % 4 == 0:
        found.append([30, 30, 44, 44, CLASSES[i % 2], round(float(rng.uniform(0.3, 0.8)), 3)])
    return truth, found


def make_detection_run(root: Path) -> Path:
    """A finished, evaluated detection run over ``N`` 48×48 PNGs with bright lesions."""
    from tests.conftest import random_image, write_png

    rng = np.random.default_rng(0)
    data, run = root / "data", root / "run"
    run.mkdir(parents=True)
    rows, truths, founds = [], [], []
    for i in range(N):
        truth, found = _boxes_of(i, rng)
        image = (random_image(i, SIDE) // 3).astype(np.uint8)
        for x1, y1, x2, y2, _ in truth:
            image[y1:y2, x1:x2] = 230
        path = f"img/{i:03d}.png"
        write_png(data / path, image)
        rows.append({"path": path, "label": "lesion" if truth else "normal"})
        truths.append(truth)
        founds.append(found)
    manifest = pd.DataFrame(rows)
    manifest.to_csv(data / "manifest.csv", index=False)

    (run / "config.yaml").write_text(TrainConfig(data=DataConfig(path=str(data))).to_yaml())
    model = {"name": "fasterrcnn_tiny", "task": "detect", "in_chans": 1, "image_size": [SIDE] * 2}
    (run / "model.json").write_text(json.dumps(model))
    Preprocess(size=(SIDE, SIDE)).save(run / "preprocess.json")
    (run / "classes.json").write_text(json.dumps({"classes": CLASSES, "positive": None}))
    pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "train_loss": [1.2, 0.8, 0.6],
            "val_loss": [1.0, 0.9, 0.95],
            "val_map50": [0.2, 0.5, 0.45],
            "seconds": [3.0, 3.0, 3.0],
        }
    ).to_csv(run / "history.csv", index=False)

    index = {name: k for k, name in enumerate(CLASSES)}
    gt = np.zeros((N, 2, 5))
    gt[..., 4] = -1
    pred = np.zeros((N, 4, 6))
    pred[..., 5] = -1
    for i, (truth, found) in enumerate(zip(truths, founds)):
        for j, (x1, y1, x2, y2, c) in enumerate(truth):
            gt[i, j] = [x1 / SIDE, y1 / SIDE, x2 / SIDE, y2 / SIDE, index[c]]
        for j, (x1, y1, x2, y2, c, s) in enumerate(sorted(found, key=lambda b: -b[5])):
            pred[i, j] = [x1 / SIDE, y1 / SIDE, x2 / SIDE, y2 / SIDE, s, index[c]]
    metrics = detection_metrics(gt, pred, CLASSES, n_bootstrap=40)
    metrics.update(split="test", data=str(data))
    (run / "metrics.json").write_text(json.dumps(metrics))

    top = np.zeros((N, len(CLASSES)))
    for i, found in enumerate(founds):
        for *_, c, s in found:
            top[i, index[c]] = max(top[i, index[c]], s)
    predictions = pd.DataFrame(
        {
            "sample_id": manifest["path"],
            "label": [
                "|".join(c for c in CLASSES if any(t[4] == c for t in truth)) or "no finding"
                for truth in truths
            ],
            "predicted": [
                "|".join(c for k, c in enumerate(CLASSES) if top[i, k] >= 0.5) or "no finding"
                for i in range(N)
            ],
        }
    )
    for k, name in enumerate(CLASSES):
        predictions[f"p_{name}"] = top[:, k]
    predictions["boxes"] = [json.dumps([[*b[:4], b[4], b[5]] for b in found]) for found in founds]
    predictions["true_boxes"] = [json.dumps(truth) for truth in truths]
    predictions["width"] = SIDE
    predictions["height"] = SIDE
    predictions.to_csv(run / "predictions.csv", index=False)
    predictions.assign(split="test")[["sample_id", "label", "split"]].to_csv(
        run / "splits.csv", index=False
    )
    return run


@pytest.fixture
def detect_task(monkeypatch):
    """A stand-in ``detect`` task listing the detection sections (the real one's targets are
    the multi-label ones of the box classes present in each image)."""
    from medsight import tasks
    from medsight.tasks.multilabel import MultiLabelTask

    class DetectStub(MultiLabelTask):
        name = "detect"
        headline_metrics = HEADLINE
        report_sections = DETECT_SECTIONS

    monkeypatch.setitem(tasks.TASKS, "detect", DetectStub)
    return DetectStub


@pytest.fixture
def detection_report(tmp_path, detect_task):
    run = make_detection_run(tmp_path)
    return run, write_report(run, examples=3).read_text(encoding="utf-8")


def _png_sizes(html: str) -> list[tuple[int, int]]:
    from PIL import Image

    sizes = []
    for data in re.findall(r'src="data:image/png;base64,([^"]+)"', html):
        sizes.append(Image.open(io.BytesIO(base64.b64decode(data))).size)
    return sizes


def test_detection_sections_render_in_the_tasks_order(detection_report):
    _, html = detection_report
    shown = re.findall(r'<section class="card" id="([a-z-]+)">', html)
    assert shown == [
        "summary",
        "detection",
        "froc",
        "detection-pr",
        "detection-gallery",
        "training",
        "model-card",
    ]
    assert "detection: boxes of 2 classes" in html
    # one key tile, mAP@0.5; the class balance counts images with a box of each class
    assert html.count('class="tile key"') == 1
    balance = re.findall(r"<td>(\d+) <span", html.split('id="summary"')[1].split("</section>")[0])
    assert balance[:2] == ["8", "4"]


def test_headline_tiles_and_table_show_the_detection_metrics(detection_report):
    run, html = detection_report
    metrics = json.loads((run / "metrics.json").read_text())
    tiles = html.split('id="summary"')[1].split("</section>")[0]
    for label in ("mAP @ IoU 0.5", "Lesion sensitivity at 1 FP / image", "AUROC (macro)"):
        assert label in tiles
    table = html.split('id="detection"')[1].split("</section>")[0]
    assert f"{metrics['map50']['value']:.3f}" in table
    assert f"{metrics['sensitivity_at_1fp']['value']:.3f}" in table
    assert "Median IoU of found lesions" in table and "Image-level AUROC" in table
    assert table.count("<tr>") >= 6 + len(CLASSES) + 7  # headline, per class, 7 points


def test_froc_and_pr_sections_embed_their_figures(detection_report):
    _, html = detection_report
    froc = html.split('id="froc"')[1].split("</section>")[0]
    assert froc.count("data:image/png;base64,") == 1
    for rate in ("1/8", "1/4", "1/2", ">1<", ">2<", ">4<", ">8<"):
        assert rate in froc
    assert "FROC score" in froc
    pr = html.split('id="detection-pr"')[1].split("</section>")[0]
    assert pr.count("data:image/png;base64,") == 1


def test_gallery_draws_true_and_predicted_boxes(detection_report):
    _, html = detection_report
    gallery = html.split('id="detection-gallery"')[1].split("</section>")[0]
    titles = re.findall(r"<h3>([^<]+)</h3>", gallery)
    assert titles == ["Lesions found", "Lesions missed", "False positives"]
    thumbs = re.findall(r'<img src="(data:image/png;base64,[^"]+)"', gallery)
    assert 3 <= len(thumbs) <= 9
    from PIL import Image

    image = np.asarray(
        Image.open(io.BytesIO(base64.b64decode(thumbs[0].split(",", 1)[1]))).convert("RGB")
    )
    assert max(image.shape[:2]) == 224
    green = (image[..., 1] > 150) & (image[..., 0] < 60) & (image[..., 2] < 120)
    blue = (image[..., 2] > 200) & (image[..., 0] < 80) & (image[..., 1] < 140)
    assert green.sum() > 50 and blue.sum() > 50
    assert "Found <strong>" in gallery and "from score" in gallery
    assert "&lt;b&gt;mass" in html and "<b>mass" not in html  # class names escaped


def test_gallery_notes_missing_images_instead_of_failing(tmp_path, detect_task):
    run = make_detection_run(tmp_path)
    for png in (tmp_path / "data" / "img").glob("*.png"):
        png.unlink()
    html = write_report(run, examples=2).read_text(encoding="utf-8")
    gallery = html.split('id="detection-gallery"')[1].split("</section>")[0]
    assert "could not be read" in gallery or "not shown" in gallery
    html = write_report(run, examples=0).read_text(encoding="utf-8")
    assert "No example images were requested" in html
    assert len(_png_sizes(html)) == 3  # FROC, PR, training; no thumbnails
