"""Archive scoring throughput: the local engine (one process) vs Ray with 1 and 2 model workers.

Writes N generated 64×64 grayscale PNGs in 10 subfolders and a 1-epoch medcnn_s run at 64 px
on a phantom set (the weights do not matter for speed), then scores the folder with
``score_archive`` (ONNX Runtime) into a fresh Parquet dataset per engine, the engines taking
turns for ``--rounds`` rounds (best kept). Ray is started once, before the timed runs (its
start-up is reported apart), so the Ray figures include the actors' start (loading the run, an
ONNX session each) but not the cluster's. Every engine's probabilities are compared with the
local engine's. Prints a markdown table.

Usage: python benchmarks/batch_predict.py [--n 10000] [--work DIR] [--batch-size 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"batch{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (64, 64), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:05d}.png")
    return root


def make_run(root: Path) -> Path:
    from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
    from medsight.data.synth import write_phantom_dataset
    from medsight.export import export_run
    from medsight.training.trainer import train

    data = write_phantom_dataset(root / "phantom", n=60, size=64, seed=0).parent
    config = TrainConfig(
        data=DataConfig(path=str(data), image_size=64),
        model=ModelConfig(name="medcnn_s"),
        optim=OptimConfig(epochs=1, batch_size=16, augment="none"),
        out=str(root / "run"),
    )
    train(config, show_progress=False)
    export_run(root / "run")
    return root / "run"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from medsight.workflows.batch import read_scored, score_archive

    work = args.work or Path(tempfile.mkdtemp(prefix="batch_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    images = work / "images"
    if not images.is_dir():
        t = time.perf_counter()
        make_images(images, args.n)
        print(f"wrote {args.n} PNGs in {time.perf_counter() - t:.1f} s")
    run = work / "run" if (work / "run" / "model.onnx").exists() else make_run(work)

    results: dict[str, list] = {}

    def score(label: str, **options) -> None:
        out = work / f"{label.replace(' ', '_')}.parquet"
        shutil.rmtree(out, ignore_errors=True)
        summary = score_archive(run, images, out, batch_size=args.batch_size, **options)
        assert summary["scored"] == args.n and summary["errors"] == 0, summary
        rows = read_scored(out).set_index("file")
        rows = rows[[c for c in rows.columns if c.startswith("p_")]]
        results.setdefault(label, []).append((summary, rows))
        print(f"{label}: {summary['images_per_s']:.0f} images/s ({summary['seconds']:.1f} s)")

    import ray

    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t
    try:
        for _ in range(args.rounds):  # engines take turns, so a busy spell hits each of them
            score("local")
            score("ray 1 worker", engine="ray", workers=1)
            score("ray 2 workers", engine="ray", workers=2)
    finally:
        ray.shutdown()

    best = {label: max(s["images_per_s"] for s, _ in runs) for label, runs in results.items()}
    reference = results["local"][0][1]
    print(
        f"\n{args.n} PNGs 64×64, medcnn_s at 64 px, ONNX Runtime, batch {args.batch_size}; "
        f"{os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}; Ray started "
        f"once in {ray_start:.1f} s (not counted); best of {args.rounds} round(s)\n"
    )
    print("| engine | images/s (best) | each round | vs local | max abs Δp vs local |")
    print("|---|---:|---|---:|---:|")
    for label, runs in results.items():
        rounds = ", ".join(f"{s['images_per_s']:.0f}" for s, _ in runs)
        diff = max(
            float(np.abs(rows.loc[reference.index] - reference).to_numpy().max())
            for _, rows in runs
        )
        print(
            f"| {label} | {best[label]:.0f} | {rounds} | {best[label] / best['local']:.2f}× | "
            f"{diff:.1e} |"
        )


if __name__ == "__main__":
    main()
