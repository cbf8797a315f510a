"""Data-parallel training on this CPU: one process against two gloo processes (``--nproc 2``),
the same phantom, network, global batch and epochs; training images/s and validation AUROC.

    python benchmarks/ddp_cpu.py OUT_DIR [--epochs 3] [--repeats 2]

Runs alternate (1, 2, 1, 2, ...) so that a noisy machine slows both alike.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd


def train(data: Path, out: Path, epochs: int, nproc: int) -> dict:
    command = [sys.executable, "-m", "medsight", "train", "--data", str(data), "--out", str(out)]
    command += ["--overwrite", "--model", "medcnn_s", "--attention", "diff"]
    command += ["--epochs", str(epochs), "--batch-size", "64", "--device", "cpu"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - started
    history = pd.read_csv(out / "history.csv")
    return {
        "processes": nproc,
        "train_images_per_s": history["images_seen"].iloc[-1] / history["train_seconds"].sum(),
        "epoch_seconds": history["seconds"].sum() / epochs,
        "wall_seconds": wall,
        "val_auroc": float(history["val_auroc"].iloc[-1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    data = args.out / "phantom"
    if not data.exists():
        subprocess.run([sys.executable, "-m", "medsight", "data", "synth", str(data)], check=True)
    rows = []
    for repeat in range(args.repeats):
        for nproc in (1, 2):
            row = train(data, args.out / f"run-{nproc}", args.epochs, nproc)
            rows.append({"repeat": repeat, **row})
            print(row, flush=True)
    table = pd.DataFrame(rows)
    summary = table.groupby("processes").median(numeric_only=True).drop(columns="repeat")
    one = summary.loc[1, "train_images_per_s"]
    summary["speed-up"] = summary["train_images_per_s"] / one
    print(summary.round(3).to_string())
    (args.out / "ddp_cpu.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
