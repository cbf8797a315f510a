"""A tiny trained and evaluated run shared by the serving tests, and small upload builders."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

#: What the page sends with every request: its proof of being same-origin (no token needed).
PAGE_HEADERS = {"X-Requested-With": "medsight"}


def local_client(app, **kwargs):
    """A test client that talks to ``app`` as the page on http://localhost does (a trusted
    host and the same-origin header); ``kwargs`` go to :class:`TestClient`."""
    from fastapi.testclient import TestClient

    kwargs.setdefault("base_url", "http://localhost")
    kwargs["headers"] = {**PAGE_HEADERS, **kwargs.get("headers", {})}
    return TestClient(app, **kwargs)


@pytest.fixture(scope="session")
def served_volume_run(tmp_path_factory) -> Path:
    """A 1-epoch 3-D run (medcnn3d_s) on tiny MedMNIST3D-like volumes of 12³, for serving
    volumes."""
    from medsight.training.trainer import train
    from tests.volumes import make_npz3d

    root = tmp_path_factory.mktemp("serve3d")
    npz = make_npz3d(root / "tiny3d.npz", {"train": 16, "val": 8, "test": 8}, size=12)
    config = TrainConfig(
        data=DataConfig(path=str(npz)),
        optim=OptimConfig(epochs=1, batch_size=8, lr=3e-3),
        out=str(root / "run"),
    )
    return train(config, show_progress=False).path


@pytest.fixture(scope="session")
def served_run(tmp_path_factory) -> Path:
    """A 1-epoch medcnn_s at 16 px on bright ("lesion") vs dark ("normal") squares, evaluated
    (so metrics.json holds operating points) in a few seconds."""
    from medsight.evaluation.evaluate import evaluate_run
    from medsight.training.trainer import train
    from tests.conftest import make_two_class_manifest

    root = tmp_path_factory.mktemp("serving")
    data = make_two_class_manifest(root / "data", 12, 2, 16)
    config = TrainConfig(
        data=DataConfig(path=str(data), ratios=(0.5, 0.25, 0.25)),
        model=ModelConfig(name="medcnn_s"),
        optim=OptimConfig(epochs=1, batch_size=8, lr=3e-3),
        out=str(root / "run"),
    )
    run = train(config, show_progress=False)
    evaluate_run(run.path, n_bootstrap=20)
    return run.path


@pytest.fixture(scope="session")
def multilabel_run(tmp_path_factory) -> Path:
    """A trained multi-label run (bright square: finding a, dark square: b) whose metrics.json
    holds Youden thresholds a 0.5, b 0.3 (:data:`tests.serving.multilabel.THRESHOLDS`)."""
    from tests.serving.multilabel import THRESHOLDS, train_multilabel_run, write_thresholds

    run = train_multilabel_run(tmp_path_factory.mktemp("multilabel-serving"))
    write_thresholds(run, THRESHOLDS)
    return run


def png_bytes(value: int = 128, size: int = 16, seed: int = 0) -> bytes:
    """A noisy gray square around ``value`` as PNG bytes (distinct per seed)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(value, 20, (size, size)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(value: int, fmt: str, size: int = 16) -> bytes:
    """The same kind of square in another container (JPEG, TIFF)."""
    pixels = np.full((size, size), value, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()
