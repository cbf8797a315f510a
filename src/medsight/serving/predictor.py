"""Predict exactly as training did, from a run directory alone.

``Predictor.from_run(RUN)`` rebuilds the network from ``model.json`` + ``model.safetensors``
and the input pipeline from ``preprocess.json``; callers never re-implement preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from medsight.data.datasets import ImageDataset
from medsight.data.imaging import decode
from medsight.errors import ConfigError
from medsight.runs import Run


class Predictor:
    """Class probabilities for raw files, SampleTables or preprocessed batches.

    >>> predictor = Predictor.from_run("runs/phantom")             # doctest: +SKIP
    >>> predictor.predict_files(["scan.dcm"]).round(3)              # doctest: +SKIP
    array([[0.02 , 0.031, 0.949]], dtype=float32)
    """

    def __init__(self, run: Run, model: torch.nn.Module, device: str | torch.device = "cpu"):
        self.run = run
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.classes_ = list(run.classes)
        self.preprocess = run.preprocess
        self.calibration = run.calibration()

    @classmethod
    def from_run(cls, path: str | Path, backend: str = "torch") -> Predictor:
        if backend != "torch":
            raise ConfigError(f"backend {backend!r} is not available yet; use 'torch'")
        run = Run.load(path)
        return cls(run, run.load_model())

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """``(1, C, H, W)``: one preprocessed image."""
        return (1, self.preprocess.channels, *self.preprocess.size)

    @torch.no_grad()
    def logits_array(self, x: np.ndarray) -> np.ndarray:
        """A preprocessed float32 ``(N, C, H, W)`` batch → ``(N, K)`` raw logits."""
        tensor = torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)
        return self.model(tensor).float().cpu().numpy()

    def predict_array(self, x: np.ndarray) -> np.ndarray:
        """A preprocessed float32 ``(N, C, H, W)`` batch → ``(N, K)`` probabilities.

        When the run holds a calibration (``medsight evaluate --calibrate``), it is applied.
        """
        return self.probabilities(self.logits_array(x))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Logits → probabilities, through the run's calibration when it has one."""
        from medsight.evaluation.calibration import apply_calibration

        return apply_calibration(logits, self.calibration)

    def predict_files(self, paths: Sequence[str | Path]) -> np.ndarray:
        """Raw image files (any format medsight reads) → ``(N, K)`` probabilities."""
        batch = np.stack([self.preprocess(decode(str(p))) for p in paths])
        return self.predict_array(batch)

    def predict_table(self, table: pd.DataFrame, batch_size: int = 256) -> np.ndarray:
        """Every row of a SampleTable → ``(N, K)`` probabilities, in row order."""
        return self.probabilities(self.logits_table(table, batch_size))

    def logits_table(self, table: pd.DataFrame, batch_size: int = 256) -> np.ndarray:
        """Every row of a SampleTable → ``(N, K)`` raw logits, in row order."""
        unlabelled = table.assign(label=None)  # labels play no part in prediction
        dataset = ImageDataset(unlabelled, self.preprocess, self.classes_, cache_max_side=0)
        chunks = [self.logits_array(x.numpy()) for x, _ in DataLoader(dataset, batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes_)), np.float32)
