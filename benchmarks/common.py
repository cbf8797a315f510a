"""Helpers shared by the benchmark scripts: test-split metrics with bootstrap intervals."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from medsight.data.sources import load_samples
from medsight.inference import Predictor
from medsight.runs import Run
from medsight.tasks.classify_metrics import headline_scores as classification_metrics

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def reset_peak_rss() -> None:
    """Start a new peak-memory measurement for this process (Linux: clear_refs 5 resets VmHWM)."""
    # Not Linux, or not allowed: the peak then covers the whole process.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM) since start or :func:`reset_peak_rss`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bootstrap_ci(y, probs, positive, key, n=1000, seed=0):
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) < probs.shape[1]:
            continue
        values.append(classification_metrics(y[idx], probs[idx], positive)[key])
    return np.percentile(values, [2.5, 97.5])


def test_metrics(run: Run, data: str | Path) -> dict:
    """AUROC and accuracy (with 95 % bootstrap CIs) of ``run`` on its own test split."""
    table = load_samples(data)
    splits = run.splits().set_index("sample_id")["split"]
    test = table[table["sample_id"].map(splits) == "test"]
    probs = Predictor.from_run(run.path).predict_table(test)
    y = np.array([run.classes.index(label) for label in test["label"]])
    positive = run.classes.index(run.positive_class)
    metrics = classification_metrics(y, probs, positive)
    return {
        "n_test": len(test),
        "auroc": metrics["auroc"],
        "auroc_ci": bootstrap_ci(y, probs, positive, "auroc"),
        "accuracy": metrics["accuracy"],
        "accuracy_ci": bootstrap_ci(y, probs, positive, "accuracy"),
    }


def fmt(value: float, ci) -> str:
    return f"{value:.3f} ({ci[0]:.3f}–{ci[1]:.3f})"
