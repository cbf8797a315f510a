"""Does transfer learning pay? ImageNet-pretrained vs from-scratch on PneumoniaMNIST.

mobilenet_v2 and tf_efficientnet_lite0 (genuine ImageNet weights from requirements-weights.txt)
in `features`, `finetune` and `full` modes, against the same architectures trained from random
weights; 28-px images are upsampled to 64 px. Prints test AUROC / accuracy with 95 % CIs.
Usage: python benchmarks/transfer_pneumonia.py [--epochs 8] [--size 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from medsight.training.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, fmt, test_metrics  # noqa: E402

DATA = SHARED / "pneumoniamnist" / "pneumoniamnist.npz"
RECIPES = [  # (mode, pretrained, head learning rate)
    ("scratch", False, 3e-3),
    ("features", True, 1e-2),
    ("finetune", True, 3e-3),
    ("full", True, 1e-3),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--models", default="mobilenet_v2,tf_efficientnet_lite0")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for mode, pretrained, lr in RECIPES:
                config = TrainConfig(
                    data=DataConfig(path=str(DATA), image_size=args.size),
                    model=ModelConfig(name=model, pretrained=pretrained),
                    optim=OptimConfig(mode=mode, epochs=args.epochs, lr=lr, patience=99),
                    out=f"{tmp}/{model}-{mode}",
                )
                started = time.perf_counter()
                run = train(config, show_progress=False)
                seconds = time.perf_counter() - started
                rows.append((model, mode, pretrained, test_metrics(run, DATA), seconds))
    print("\n| model | mode | ImageNet | test AUROC (95 % CI) | test accuracy | wall s |")
    print("|---|---|---|---|---|---|")
    for model, mode, pretrained, m, seconds in rows:
        print(
            f"| {model} | {mode} | {'yes' if pretrained else 'no'} | "
            f"{fmt(m['auroc'], m['auroc_ci'])} | {fmt(m['accuracy'], m['accuracy_ci'])} | "
            f"{seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
