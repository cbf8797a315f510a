"""A tiny box data set and detection run for the detection tests.

Each image is a noisy gray field with 0–2 bright squares (class ``spot``) and, in some images,
a dark square (class ``hole``); the box CSV lists them as ``path,x1,y1,x2,y2,label`` (a
negative image has one row with empty corners), with a patient per two images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.conftest import write_png

CLASSES = ("spot", "hole")


def box_image(boxes: list[tuple], size: int = 64, seed: int = 0) -> np.ndarray:
    """A ``size``² uint8 image with a square per ``(x1, y1, x2, y2, label)``: ``spot`` bright,
    ``hole`` dark, on mid-gray noise."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(128, 10, (size, size))
    for x1, y1, x2, y2, label in boxes:
        pixels[int(y1) : int(y2), int(x1) : int(x2)] = 245 if label == "spot" else 10
    return np.clip(pixels, 0, 255).astype(np.uint8)


def layout(k: int, size: int = 64) -> list[tuple]:
    """The boxes of image ``k``: every fourth image has none."""
    if k % 4 == 3:
        return []
    rng = np.random.default_rng(1000 + k)
    side = size // 5
    boxes = []
    for label in ("spot", "hole") if k % 4 == 2 else ("spot",):
        x, y = rng.integers(2, size - side - 2, size=2)
        if any(abs(x - b[0]) < side + 2 and abs(y - b[1]) < side + 2 for b in boxes):
            x = (x + side * 2) % (size - side - 2) + 2
        boxes.append((int(x), int(y), int(x + side), int(y + side), label))
    return boxes


def make_box_csv(root: Path, n: int = 32, size: int = 64) -> Path:
    """``root/boxes.csv`` over ``n`` generated PNGs (see the module docstring); returns it."""
    lines = ["path,x1,y1,x2,y2,label,patient_id"]
    for k in range(n):
        rel = f"img/i{k:03d}.png"
        boxes = layout(k, size)
        write_png(root / rel, box_image(boxes, size, seed=k))
        patient = f"P{k // 2}"
        for x1, y1, x2, y2, label in boxes:
            lines.append(f"{rel},{x1},{y1},{x2},{y2},{label},{patient}")
        if not boxes:
            lines.append(f"{rel},,,,,,{patient}")
    path = root / "boxes.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def train_detect_run(root: Path, epochs: int = 2, n: int = 32) -> Path:
    """A detector trained briefly on :func:`make_box_csv` data under ``root``; its path."""
    from medsight.config import DataConfig, OptimConfig, TrainConfig
    from medsight.training.trainer import train

    data = make_box_csv(root / "data", n=n)
    config = TrainConfig(
        task="detect",
        data=DataConfig(path=str(data), ratios=(0.5, 0.25, 0.25)),
        optim=OptimConfig(epochs=epochs, batch_size=8, ema=0, warmup_epochs=0),
        out=str(root / "run"),
    )
    return train(config, show_progress=False).path


def set_box_thresholds(run: Path, threshold: float) -> None:
    """Give ``run`` a ``metrics.json`` whose ``fp_1`` point decides boxes at ``threshold``
    (what ``medsight evaluate`` would write), so tests control which boxes are shown."""
    classes = json.loads((run / "classes.json").read_text())["classes"]
    point = {"threshold": threshold, "sensitivity": 0.9, "fps_per_image": 1.0}
    metrics = {"split": "test", "n": 8, "thresholds": {c: {"fp_1": point} for c in classes}}
    (run / "metrics.json").write_text(json.dumps(metrics))
