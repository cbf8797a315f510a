"""Default recipe on every real set: `medsight train --data X` with no other flags, then test.

Prints a markdown table: test AUROC / accuracy (95 % bootstrap CI), best epoch, wall time.
Usage: python benchmarks/train_default.py [--sets pneumoniamnist,pneumoniamnist_full,...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from medsight.config import DataConfig, TrainConfig
from medsight.training.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, fmt, test_metrics  # noqa: E402

SETS = {
    "pneumoniamnist": SHARED / "pneumoniamnist" / "pneumoniamnist.npz",
    "pneumoniamnist_full": SHARED / "pneumoniamnist" / "pneumoniamnist_full.npz",
    "medical_mnist": SHARED / "medical-mnist" / "medical_mnist.zip",
    "phantom": None,  # generated with `medsight data synth`
}


def run_set(name: str, path: Path | None, work: Path, epochs: int | None = None) -> dict:
    if path is None:
        from medsight.data.synth import write_phantom_dataset

        path = work / "phantom-data"
        write_phantom_dataset(path, n=1200, size=64, seed=0)
    started = time.perf_counter()
    config = TrainConfig(data=DataConfig(path=str(path)), out=str(work / name))
    if epochs:
        config = config.with_overrides({"optim.epochs": epochs})
    run = train(config)
    seconds = time.perf_counter() - started
    result = test_metrics(run, path)
    history = run.history()
    return {
        "set": name,
        **result,
        "best_epoch": int(history.loc[history["val_auroc"].idxmax(), "epoch"]),
        "epochs": len(history),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sets", default="pneumoniamnist,pneumoniamnist_full,phantom")
    parser.add_argument("--epochs", type=int, help="override the default epoch count (large sets)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets.split(","):
            path = SETS[name]
            if path is not None and not path.exists():
                print(f"skip {name}: {path} not found")
                continue
            rows.append(run_set(name, path, Path(tmp), args.epochs))
    print("\n| set | test n | AUROC (95 % CI) | accuracy (95 % CI) | best / run epochs | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['set']} | {r['n_test']} | {fmt(r['auroc'], r['auroc_ci'])} | "
            f"{fmt(r['accuracy'], r['accuracy_ci'])} | {r['best_epoch']} / {r['epochs']} | "
            f"{r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
