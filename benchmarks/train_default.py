"""Default recipe on every real set: `medsight train --data X` with no other flags, then test.

Prints a markdown table: test AUROC / accuracy (95 % bootstrap CI), best epoch, wall time.
Usage: python benchmarks/train_default.py [--sets pneumoniamnist,pneumoniamnist_full,...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from medsight.config import DataConfig, TrainConfig
from medsight.data.sources import load_samples
from medsight.serving.predictor import Predictor
from medsight.training.trainer import classification_metrics, train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {
    "pneumoniamnist": SHARED / "pneumoniamnist" / "pneumoniamnist.npz",
    "pneumoniamnist_full": SHARED / "pneumoniamnist" / "pneumoniamnist_full.npz",
    "medical_mnist": SHARED / "medical-mnist" / "medical_mnist.zip",
    "phantom": None,  # generated with `medsight data synth`
}


def bootstrap_ci(y, probs, positive, key, n=1000, seed=0):
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) < probs.shape[1]:
            continue
        values.append(classification_metrics(y[idx], probs[idx], positive)[key])
    return np.percentile(values, [2.5, 97.5])


def run_set(name: str, path: Path | None, work: Path) -> dict:
    if path is None:
        from medsight.data.synth import write_phantom_dataset

        path = work / "phantom"
        write_phantom_dataset(path, n=1200, size=64, seed=0)
    started = time.perf_counter()
    run = train(TrainConfig(data=DataConfig(path=str(path)), out=str(work / name)))
    seconds = time.perf_counter() - started
    table = load_samples(path)
    splits = run.splits().set_index("sample_id")["split"]
    test = table[table["sample_id"].map(splits) == "test"]
    probs = Predictor.from_run(run.path).predict_table(test)
    y = np.array([run.classes.index(label) for label in test["label"]])
    positive = run.classes.index(run.positive_class)
    metrics = classification_metrics(y, probs, positive)
    history = run.history()
    return {
        "set": name,
        "n_test": len(test),
        "auroc": metrics["auroc"],
        "auroc_ci": bootstrap_ci(y, probs, positive, "auroc"),
        "accuracy": metrics["accuracy"],
        "accuracy_ci": bootstrap_ci(y, probs, positive, "accuracy"),
        "best_epoch": int(history.loc[history["val_auroc"].idxmax(), "epoch"]),
        "epochs": len(history),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sets", default="pneumoniamnist,pneumoniamnist_full,phantom")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets.split(","):
            path = SETS[name]
            if path is not None and not path.exists():
                print(f"skip {name}: {path} not found")
                continue
            rows.append(run_set(name, path, Path(tmp)))
    print("\n| set | test n | AUROC (95 % CI) | accuracy (95 % CI) | best / run epochs | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['set']} | {r['n_test']} | {r['auroc']:.3f} ({r['auroc_ci'][0]:.3f}–"
            f"{r['auroc_ci'][1]:.3f}) | {r['accuracy']:.3f} ({r['accuracy_ci'][0]:.3f}–"
            f"{r['accuracy_ci'][1]:.3f}) | {r['best_epoch']} / {r['epochs']} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
