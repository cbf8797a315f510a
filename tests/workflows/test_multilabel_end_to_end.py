"""A ChestMNIST-style npz, (N, K) multi-hot labels: train → evaluate → report → explain → serve."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from medsight.evaluation.evaluate import evaluate_run
from medsight.evaluation.report import write_report
from medsight.explain.files import explain_files
from medsight.serving.api import ServeSettings, create_app
from medsight.training.trainer import train
from tests.serving.conftest import local_client

pytest.importorskip("medsight.models.zoo")


def _multi_hot_npz(path, size=16, seed=0):
    """Three findings as blocks in three corners of noisy squares; none, one or several."""
    rng = np.random.default_rng(seed)
    arrays = {}
    corners = [
        (slice(0, 6), slice(0, 6)),
        (slice(0, 6), slice(10, 16)),
        (slice(10, 16), slice(0, 6)),
    ]
    for split, n in (("train", 96), ("val", 40), ("test", 40)):
        labels = (rng.random((n, 3)) < 0.4).astype(np.uint8)
        images = rng.normal(110, 12, (n, size, size))
        for i, row in enumerate(labels):
            for present, block in zip(row, corners):
                if present:
                    images[i][block] += 100
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels
    np.savez(path, **arrays)
    return arrays


def test_a_multi_hot_npz_trains_evaluates_reports_explains_and_serves(tmp_path):
    arrays = _multi_hot_npz(tmp_path / "findings.npz")
    config = TrainConfig(
        data=DataConfig(path=str(tmp_path / "findings.npz")),
        model=ModelConfig(name="medcnn_lite"),
        optim=OptimConfig(epochs=8, batch_size=16),
        out=str(tmp_path / "run"),
    )
    run = train(config)
    assert run.task == "multilabel" and run.classes == ["finding_0", "finding_1", "finding_2"]

    metrics = evaluate_run(run.path)
    assert metrics["n"] == 40 and set(metrics["per_finding"]) == set(run.classes)
    assert metrics["auroc_macro"]["value"] > 0.9  # corner blocks are easy to see
    predictions = json.loads((run.path / "metrics.json").read_text())
    assert set(predictions["thresholds"]) == set(run.classes)
    assert "Co-occurrence" in write_report(run.path).read_text()

    image = tmp_path / "both.png"
    both = np.where(arrays["test_labels"].sum(axis=1) >= 2)[0][0]
    Image.fromarray(arrays["test_images"][both]).save(image)
    records = explain_files(
        run.path, [image], tmp_path / "maps", method="gradcam", target="finding_1"
    )
    assert [r["target"] for r in records] == ["finding_1"]
    assert (tmp_path / "maps" / "explanations.jsonl").exists()

    client = local_client(create_app(ServeSettings(run=run.path, data_dir=tmp_path / "served")))
    body = client.post(
        "/v1/predict", files={"file": ("both.png", image.read_bytes(), "image/png")}
    ).json()
    assert [f["name"] for f in body["findings"]] == run.classes
    above = [f["name"] for f in body["findings"] if f["above_threshold"]]
    assert body["label"] == ("|".join(above) or "no finding")
