"""Helpers for the explanation tests: run directories built by hand (no training), tiny data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import write_run


def write_mask_manifest(root: Path, n_lesion: int = 4, n_normal: int = 2, size: int = 16) -> Path:
    """Lesion images (a bright square) with masks, normal images with an empty mask cell, and
    one lesion image whose mask file is missing."""
    from tests.conftest import write_png

    rng = np.random.default_rng(0)
    lines = ["path,label,patient_id,mask"]
    for i in range(n_lesion + n_normal):
        lesion = i < n_lesion
        pixels = rng.integers(40, 90, (size, size)).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        if lesion:
            y, x = (i * 3) % (size - 6), (i * 5) % (size - 6)
            pixels[y : y + 5, x : x + 5] = 230
            mask[y : y + 5, x : x + 5] = 255
        label = "lesion" if lesion else "normal"
        write_png(root / "img" / f"{label}_{i}.png", pixels)
        cell = ""
        if lesion:
            write_png(root / "masks" / f"{label}_{i}.png", mask)
            cell = f"masks/{label}_{i}.png"
        lines.append(f"img/{label}_{i}.png,{label},P{i},{cell}")
    write_png(root / "img" / "lesion_nomask.png", rng.integers(0, 255, (size, size)))
    lines.append("img/lesion_nomask.png,lesion,P99,masks/gone.png")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on shared, busy cores: a second thread only adds synchronisation waits
    # (measured 50x slower backward passes at load 7 on 2 cores).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def mask_data(tmp_path) -> Path:
    return write_mask_manifest(tmp_path / "data")


@pytest.fixture
def tiny_run(tmp_path, mask_data) -> Path:
    return write_run(tmp_path / "run", mask_data, attention="diff")
