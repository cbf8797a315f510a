"""medcnn_lite against medcnn_s on the CPU: training speed and multiply-accumulates per image.

Speed: forward + backward + AdamW step on one batch of 64 random one-channel images, 3 classes,
at 28, 64 and 128 px, two torch threads. At each size the models take turns in blocks (3 rounds
of about ``--seconds`` each, after an untimed warm-up step per block) and the median step time
is kept, so the ratios hold on a shared machine. The row ``medcnn_lite, NCHW`` is the same network
with channels-last switched off, to show what that layout is worth here.

MACs: one forward pass of one image counted with ``torch.utils.flop_counter.FlopCounterMode``
(convolutions, matrix products; MACs = FLOPs / 2).

``--accuracy`` also trains both with the real trainer (``optim.epochs`` 8, everything else the
default recipe) on the phantom set (``medsight data synth``, 1,200 images, 64 px) and, when it is
there, PneumoniaMNIST (28 px), and scores each run on its own test split.

Usage: python benchmarks/lean_cnn.py [--sizes 28,64,128] [--seconds 1.5] [--accuracy [--no-speed]]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medsight.models import create_model
from medsight.models.custom import ChannelsLastConv2d

MODELS = ("medcnn_s", "medcnn_lite", "medcnn_lite, NCHW")
BATCH = 64
CLASSES = 3


def build(label: str) -> nn.Module:
    name, _, variant = label.partition(", ")
    torch.manual_seed(0)
    model = create_model(name, CLASSES, in_chans=1)
    if variant == "NCHW":  # the same weights and layers, channels-last switched off
        for module in model.modules():
            if isinstance(module, ChannelsLastConv2d):
                module.__class__ = nn.Conv2d
    return model


def macs_per_image(model: nn.Module, size: int) -> int:
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 1, size, size))
    model.train()
    return counter.get_total_flops() // 2


def train_step_fn(model: nn.Module, size: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(BATCH, 1, size, size)
    y = torch.randint(0, CLASSES, (BATCH,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def images_per_second(steps: dict, seconds: float, rounds: int = 3) -> dict[str, float]:
    """Median images/s of each training step, the steps taking turns in timed blocks."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            step()  # warm-up, not counted
            start = time.perf_counter()
            while len(samples[name]) < 2 or time.perf_counter() - start < seconds:
                t0 = time.perf_counter()
                step()
                samples[name].append(time.perf_counter() - t0)
    return {name: BATCH / statistics.median(values) for name, values in samples.items()}


def speed_table(sizes: list[int], seconds: float) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}\n")
    print("| px | model | MACs / image | vs medcnn_s | params | train img/s | vs medcnn_s |")
    print("|---|---|---|---|---|---|---|")
    for size in sizes:
        models = {label: build(label) for label in MODELS}
        macs = {label: macs_per_image(model, size) for label, model in models.items()}
        speed = images_per_second(
            {label: train_step_fn(model, size) for label, model in models.items()}, seconds
        )
        for label, model in models.items():
            params = sum(p.numel() for p in model.parameters())
            print(
                f"| {size} | {label} | {macs[label] / 1e6:.1f} M | "
                f"{macs[label] / macs['medcnn_s']:.2f}× | {params / 1e6:.2f} M | "
                f"{speed[label]:.0f} | {speed[label] / speed['medcnn_s']:.2f}× |",
                flush=True,
            )


def accuracy_table(epochs: int, sets: list[str], pneumonia: Path | None) -> None:
    from medsight.config import DataConfig, TrainConfig
    from medsight.data.synth import write_phantom_dataset
    from medsight.training.trainer import train

    sys.path.insert(0, str(Path(__file__).parent))
    from common import SHARED, fmt, test_metrics

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = {
            "phantom": lambda: write_phantom_dataset(work / "phantom", n=1200, size=64, seed=0),
            "pneumoniamnist": lambda: pneumonia or SHARED / "pneumoniamnist" / "pneumoniamnist.npz",
        }
        for set_name in sets:
            path = paths[set_name]()
            if not path.exists():
                print(f"skip {set_name}: {path} not found")
                continue
            data = path.parent if path.name == "manifest.csv" else path
            for model in MODELS[:2]:
                config = TrainConfig(data=DataConfig(path=str(data)), out=str(work / "run"))
                config = config.with_overrides({"model.name": model, "optim.epochs": epochs})
                started = time.perf_counter()
                run = train(config, overwrite=True, show_progress=False)
                seconds = time.perf_counter() - started
                rows.append((set_name, model, test_metrics(run, data), seconds))
    print(
        f"\n| set | model | test n | AUROC (95 % CI) | accuracy (95 % CI) | train s ({epochs} ep) |"
    )
    print("|---|---|---|---|---|---|")
    for set_name, model, r, seconds in rows:
        print(
            f"| {set_name} | {model} | {r['n_test']} | {fmt(r['auroc'], r['auroc_ci'])} | "
            f"{fmt(r['accuracy'], r['accuracy_ci'])} | {seconds:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="28,64,128")
    parser.add_argument("--seconds", type=float, default=1.5, help="per timed block (3 each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accuracy", action="store_true", help="also train both (minutes)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--no-speed", action="store_true", help="only the accuracy table")
    parser.add_argument("--sets", default="phantom,pneumoniamnist")
    parser.add_argument(
        "--pneumonia", type=Path, help="pneumoniamnist.npz (default: ../shared/data/...)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.no_speed:
        speed_table([int(s) for s in args.sizes.split(",")], args.seconds)
    if args.accuracy:
        accuracy_table(args.epochs, args.sets.split(","), args.pneumonia)


if __name__ == "__main__":
    main()
