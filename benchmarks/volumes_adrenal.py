"""AdrenalMNIST3D (28³ or 64³ shape masks, official splits): the default 3-D recipe, then test.

Trains `medsight train --data adrenalmnist3d.npz` with no other flag (``--recipe`` adds overrides,
e.g. ``model.name=monai_resnet18_3d`` or ``optim.time=9m``), evaluates the official test split
(298 volumes) with 95 % bootstrap CIs, and prints one markdown row per recipe: test AUROC and
accuracy, the network, epochs, wall time, peak resident memory of this process and the machine's
load average during the run (other jobs share the 2 cores). The published MedMNIST v2 figures
for the same split are printed below the table for comparison.
Usage: python benchmarks/volumes_adrenal.py [--size 28|64] [--npz FILE] [--recipe default]
       [--recipe 'model.name=monai_resnet18_3d;optim.time=9m'] [--threads 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from medsight.config import DataConfig, TrainConfig
from medsight.training.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, fmt, peak_rss_mib, reset_peak_rss, test_metrics  # noqa: E402

DATA = {
    28: SHARED / "adrenalmnist3d" / "adrenalmnist3d.npz",
    64: SHARED / "adrenalmnist3d" / "adrenalmnist3d_64.npz",
}

#: MedMNIST v2 (Yang et al., Scientific Data 10:41, 2023), Table 4, AdrenalMNIST3D test split,
#: as recalled (AUC, ACC); see benchmarks/README.md for how far they were checked.
PUBLISHED = {
    "ResNet-18 + 2.5D": (0.718, 0.772),  # ACC recalled as 0.766 elsewhere
    "ResNet-18 + 3D": (0.827, 0.721),
    "ResNet-18 + ACS": (0.839, 0.754),
    "ResNet-50 + 3D": (0.828, 0.745),
}


def parse_recipe(text: str) -> dict:
    if text == "default":
        return {}
    overrides = {}
    for part in text.split(";"):
        key, _, value = part.partition("=")
        overrides[key.strip()] = value.strip()
    return overrides


def run_recipe(path: Path, overrides: dict, out: Path) -> dict:
    reset_peak_rss()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    config = TrainConfig(data=DataConfig(path=str(path)), out=str(out))
    run = train(config.with_overrides(overrides), overwrite=True, show_progress=False)
    seconds = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    result = test_metrics(run, path)
    history = run.history()
    return {
        **result,
        "model": run.config.model.name,
        "size": "×".join(map(str, run.preprocess.size)),
        "epochs": float(history["epoch_fraction"].max()),
        "seconds": seconds,
        "peak_mib": peak_rss_mib(),
        "load": (load_before, load_after),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=28, choices=sorted(DATA))
    parser.add_argument("--recipe", action="append", default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench/adrenal3d"))
    parser.add_argument("--npz", type=Path, default=None, help="the .npz (default: ../shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.npz or DATA[args.size]
    if not path.exists():
        raise SystemExit(f"{path} is missing (../shared/data/adrenalmnist3d)")
    print("| recipe | network | input | test AUROC (95 % CI) | test ACC (95 % CI) | epochs "
          "| wall | peak RSS | load avg (start→end) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for i, text in enumerate(args.recipe or ["default"]):
        r = run_recipe(path, parse_recipe(text), args.work / f"run{args.size}-{i}")
        print(
            f"| {text} | {r['model']} | {r['size']} | {fmt(r['auroc'], r['auroc_ci'])} | "
            f"{fmt(r['accuracy'], r['accuracy_ci'])} | {r['epochs']:g} | "
            f"{r['seconds'] / 60:.1f} min | {r['peak_mib']:.0f} MiB | "
            f"{r['load'][0]:.1f}→{r['load'][1]:.1f} |",
            flush=True,
        )
    print(f"\n{torch.get_num_threads()} torch threads, {os.cpu_count()} cores; n_test = 298")
    print("MedMNIST v2 Table 4, AdrenalMNIST3D (AUC, ACC): " + "; ".join(
        f"{name} {auc:.3f} / {acc:.3f}" for name, (auc, acc) in PUBLISHED.items()
    ))  # fmt: skip


if __name__ == "__main__":
    main()
