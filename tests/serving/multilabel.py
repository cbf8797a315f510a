"""A tiny multi-label data set and run for the prediction, explanation and serving tests.

Each image is a noisy gray field with up to two squares: a bright square in the upper left is
finding ``a``, a dark square in the lower right is finding ``b``; the four combinations occur
equally often. A small CNN learns both in a couple of epochs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.conftest import write_png

FINDINGS = ("a", "b")
#: The Youden thresholds the serving tests' run is given (``multilabel_run`` fixture).
THRESHOLDS = {"a": 0.5, "b": 0.3}


def finding_image(a: bool, b: bool, size: int = 32, seed: int = 0) -> np.ndarray:
    """One ``size``² uint8 image: a bright square at the upper left for ``a``, a dark one at
    the lower right for ``b``, on mid-gray noise."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(128, 12, (size, size))
    q = size // 4
    if a:
        pixels[q // 2 : q // 2 + q + 2, q // 2 : q // 2 + q + 2] = 250
    if b:
        pixels[-q // 2 - q - 2 : -q // 2, -q // 2 - q - 2 : -q // 2] = 5
    return np.clip(pixels, 0, 255).astype(np.uint8)


def make_findings_manifest(root: Path, n_patients: int = 16, per_patient: int = 2, size=32):
    """``root/manifest.csv`` (path, patient_id, a, b as 0/1) over generated PNGs; returns it."""
    lines = ["path,patient_id,a,b"]
    k = 0
    for p in range(n_patients):
        for i in range(per_patient):
            a, b = (k % 2 == 1), ((k // 2) % 2 == 1)
            rel = f"img/p{p}_{i}.png"
            write_png(root / rel, finding_image(a, b, size, seed=k))
            lines.append(f"{rel},P{p},{int(a)},{int(b)}")
            k += 1
    path = root / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def train_multilabel_run(root: Path, epochs: int = 2) -> Path:
    """A medcnn_lite trained on :func:`make_findings_manifest` data under ``root``; its path."""
    from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
    from medsight.training.trainer import train

    manifest = make_findings_manifest(root / "data")
    config = TrainConfig(
        data=DataConfig(path=str(manifest), labels=",".join(FINDINGS), ratios=(0.5, 0.25, 0.25)),
        model=ModelConfig(name="medcnn_lite"),
        optim=OptimConfig(
            epochs=epochs, batch_size=8, lr=1e-2, ema=0, warmup_epochs=0, augment="none"
        ),
        out=str(root / "run"),
    )
    return train(config, show_progress=False).path


def write_thresholds(run: Path, thresholds: dict[str, float]) -> None:
    """Write a metrics.json holding only ``thresholds`` (as evaluation writes them), with
    ``youden`` at the given value and a lower ``sensitivity_0.90`` point per finding."""
    import json

    doc = {
        "thresholds": {
            name: {
                "youden": {"threshold": t, "sensitivity": 0.8, "specificity": 0.8},
                "sensitivity_0.90": {"threshold": t / 2, "sensitivity": 0.9, "specificity": 0.5},
            }
            for name, t in thresholds.items()
        }
    }
    (Path(run) / "metrics.json").write_text(json.dumps(doc))


def write_finding_images(folder: Path, size: int = 32) -> dict[str, Path]:
    """Four images, one per combination: ``{"none", "a", "b", "ab"}`` → PNG path."""
    combos = {"none": (0, 0), "a": (1, 0), "b": (0, 1), "ab": (1, 1)}
    return {
        name: write_png(folder / f"{name}.png", finding_image(a, b, size, seed=900 + i))
        for i, (name, (a, b)) in enumerate(combos.items())
    }


def copy_run(run: Path, target: Path) -> Path:
    """A copy of ``run`` that a test may change (metrics.json, classes.json, exports)."""
    import shutil

    return Path(shutil.copytree(run, target))
