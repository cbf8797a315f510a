"""Default recipe on every real set: `medsight train --data X` with no other flags, then test.

Prints a markdown table: test AUROC / accuracy (95 % bootstrap CI), the network the recipe
chose, validations, wall time. ``--recipe old`` runs the recipe before `--model auto` and
`epochs: auto` (medcnn_s, 15 epochs) for comparison; ``--time 5m`` adds a wall-clock budget.
Usage: python benchmarks/train_default.py [--sets pneumoniamnist,phantom,phantom128,...]
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

TIME_FIELD = "optim.time"  # the config field of --time

SETS = {
    "pneumoniamnist": SHARED / "pneumoniamnist" / "pneumoniamnist.npz",
    "pneumoniamnist_full": SHARED / "pneumoniamnist" / "pneumoniamnist_full.npz",
    "medical_mnist": SHARED / "medical-mnist" / "medical_mnist.zip",
    "phantom": None,  # generated with `medsight data synth` (1,200 images, 64 px)
    "phantom128": None,  # the same generator at 128 px, 3,000 images
}
PHANTOMS = {"phantom": (1200, 64), "phantom128": (3000, 128)}
#: The default recipe before the network and the epoch count were chosen from the data.
OLD_RECIPE = {"model.name": "medcnn_s", "optim.epochs": 15, "optim.ema": 0}


def run_set(name: str, path: Path | None, work: Path, overrides: dict) -> dict:
    if path is None:
        from medsight.data.synth import write_phantom_dataset

        n, size = PHANTOMS[name]
        path = work / f"{name}-data"
        if not (path / "manifest.csv").exists():
            write_phantom_dataset(path, n=n, size=size, seed=0)
    started = time.perf_counter()
    config = TrainConfig(data=DataConfig(path=str(path)), out=str(work / name))
    run = train(config.with_overrides(overrides), overwrite=True, show_progress=False)
    seconds = time.perf_counter() - started
    result = test_metrics(run, path)
    history = run.history()
    when = "epoch_fraction" if "epoch_fraction" in history else "epoch"
    return {
        "set": name,
        **result,
        "model": run.config.model.name + (" (ImageNet)" if run.config.model.pretrained else ""),
        "best_epoch": float(history.loc[history["val_auroc"].idxmax(), when]),
        "epochs": float(history[when].max()),
        "validations": len(history),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sets", default="pneumoniamnist,pneumoniamnist_full,phantom")
    parser.add_argument("--epochs", type=int, help="override the epoch count")
    parser.add_argument("--recipe", choices=["default", "old"], default="default")
    parser.add_argument("--time", help="wall-clock budget, e.g. 5m")
    parser.add_argument("--model", help="a network instead of the recipe's choice")
    parser.add_argument("--work", type=Path, help="keep data and runs here (default: a temp dir)")
    args = parser.parse_args()
    overrides = dict(OLD_RECIPE) if args.recipe == "old" else {}
    if args.epochs:
        overrides["optim.epochs"] = args.epochs
    if args.time:
        overrides[TIME_FIELD] = args.time
    if args.model:
        overrides["model.name"] = args.model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for name in args.sets.split(","):
            path = SETS[name]
            if path is not None and not path.exists():
                print(f"skip {name}: {path} not found")
                continue
            rows.append(run_set(name, path, work, overrides))
            print(rows[-1], flush=True)
    extra = "".join(f", --{k} {getattr(args, k)}" for k in ("time", "model") if getattr(args, k))
    print(f"\nrecipe: {args.recipe}{extra}")
    print(
        "| set | network | test n | AUROC (95 % CI) | accuracy (95 % CI) | best / run epochs "
        "| validations | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['set']} | {r['model']} | {r['n_test']} | {fmt(r['auroc'], r['auroc_ci'])} | "
            f"{fmt(r['accuracy'], r['accuracy_ci'])} | {r['best_epoch']:g} / {r['epochs']:g} | "
            f"{r['validations']} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
