"""Small sets, several seeds: does the default recipe match the old one where data are few?

One test split is too small to tell two recipes apart (the phantom test split has 180 images:
one image is 0.6 points of accuracy), so each recipe trains once per seed, and a seed fixes the
split and the initialisation for every recipe alike: the comparison is paired. Prints, per set
and recipe, the mean test AUROC / accuracy over the seeds, the per-seed values and wall time.
Usage: python benchmarks/small_sets.py --sets phantom,pneumoniamnist --seeds 0,1,2
       [--recipes default,old,...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from medsight.config import DataConfig, TrainConfig
from medsight.training.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from common import test_metrics  # noqa: E402
from train_default import PHANTOMS, SETS  # noqa: E402

RECIPES: dict[str, dict] = {
    "default": {},
    "old": {"model.name": "medcnn_s", "optim.epochs": 15, "optim.ema": 0},
}


def parse_recipe(text: str) -> tuple[str, dict]:
    """``name`` from :data:`RECIPES`, or ``key=value;key=value`` overrides."""
    if text in RECIPES:
        return text, RECIPES[text]
    overrides = {}
    for part in text.split(";"):
        key, _, value = part.partition("=")
        overrides[key.strip()] = value.strip()
    return text, overrides


def data_path(name: str, work: Path) -> Path:
    path = SETS[name]
    if path is not None:
        return path
    from medsight.data.synth import write_phantom_dataset

    n, size = PHANTOMS[name]
    path = work / f"{name}-data"
    if not (path / "manifest.csv").exists():
        write_phantom_dataset(path, n=n, size=size, seed=0)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sets", default="phantom,pneumoniamnist")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--recipes", default="default|old", help="separated by |")
    parser.add_argument("--work", type=Path, default=Path("/tmp/small-sets"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = [parse_recipe(r) for r in args.recipes.split("|")]
    print(
        "| set | recipe | mean AUROC | mean accuracy | AUROC per seed | accuracy per seed "
        "| mean wall s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.sets.split(","):
        path = data_path(name, args.work)
        for label, overrides in recipes:
            aurocs, accs, secs = [], [], []
            for seed in seeds:
                config = TrainConfig(
                    data=DataConfig(path=str(path)), out=str(args.work / "run"), seed=seed
                )
                started = time.perf_counter()
                run = train(config.with_overrides(overrides), overwrite=True, show_progress=False)
                secs.append(time.perf_counter() - started)
                result = test_metrics(run, path)
                aurocs.append(result["auroc"])
                accs.append(result["accuracy"])
            print(
                f"| {name} | {label} | {np.mean(aurocs):.3f} | {np.mean(accs):.3f} "
                f"| {' '.join(f'{a:.3f}' for a in aurocs)} | {' '.join(f'{a:.3f}' for a in accs)} "
                f"| {np.mean(secs):.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
