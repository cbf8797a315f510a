"""How learnable is the phantom dataset? Train a small CNN on it and print a markdown table.

The phantom should be learnable but not trivial: a small CNN should end between 85 % and 99 %
test accuracy, well below 100 % after one epoch, and global brightness alone should not tell
the classes apart.

    python benchmarks/synth_learnability.py            # n=1200, size=64, seed=0
    python benchmarks/synth_learnability.py --seed 1 --epochs 12
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from medsight.data.synth import CLASSES, write_phantom_dataset


def patient_split(
    manifest: pd.DataFrame, seed: int, shares=(0.7, 0.15, 0.15)
) -> dict[str, np.ndarray]:
    """Row indices per split; each patient in one split, stratified by the patient's label."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    patients = manifest.groupby("patient_id")["label"].first()
    for label in CLASSES:
        ids = np.sort(patients[patients == label].index.to_numpy())
        ids = ids[rng.permutation(len(ids))]
        n_train = round(shares[0] * len(ids))
        n_val = round(shares[1] * len(ids))
        parts = {
            "train": ids[:n_train],
            "val": ids[n_train : n_train + n_val],
            "test": ids[n_train + n_val :],
        }
        for name, part in parts.items():
            splits[name] += manifest.index[manifest["patient_id"].isin(part)].tolist()
    return {name: np.asarray(rows) for name, rows in splits.items()}


def small_cnn(num_classes: int) -> nn.Module:
    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

    return nn.Sequential(
        block(1, 32),
        block(32, 64),
        block(64, 96),
        block(96, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])


def brightness_only_accuracy(mean: np.ndarray, y: np.ndarray, split) -> float:
    """Test accuracy of a 1-D Gaussian classifier on each image's mean brightness."""
    tr, te = split["train"], split["test"]
    mu = np.array([mean[tr][y[tr] == c].mean() for c in range(len(CLASSES))])
    sd = np.array([mean[tr][y[tr] == c].std() for c in range(len(CLASSES))])
    prior = np.array([(y[tr] == c).mean() for c in range(len(CLASSES))])
    loglik = -0.5 * ((mean[te, None] - mu) / sd) ** 2 - np.log(sd) + np.log(prior)
    return float((loglik.argmax(1) == y[te]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="data, split and training seed")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest_path = write_phantom_dataset(Path(tmp) / "phantom", args.n, args.size, args.seed)
        generate_s = time.perf_counter() - start
        manifest = pd.read_csv(manifest_path)
        images = np.stack(
            [np.asarray(Image.open(manifest_path.parent / p)) for p in manifest["path"]]
        )
    y = manifest["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    split = patient_split(manifest, args.seed)

    print(f"phantom n={args.n} size={args.size} seed={args.seed}: generated in {generate_s:.2f} s")
    print(
        f"patients {manifest['patient_id'].nunique()}, images per split "
        + ", ".join(f"{k} {len(v)}" for k, v in split.items())
    )
    mean = images.reshape(len(images), -1).mean(1) / 255.0
    print("\n| class | images | mean brightness | std |\n|---|---|---|---|")
    for i, c in enumerate(CLASSES):
        print(f"| {c} | {(y == i).sum()} | {mean[y == i].mean():.4f} | {mean[y == i].std():.4f} |")
    print(f"\nbrightness-only test accuracy: {brightness_only_accuracy(mean, y, split):.3f}")

    x = torch.from_numpy(images).float().unsqueeze(1) / 255.0
    x = (x - x[split["train"]].mean()) / x[split["train"]].std()
    t = torch.from_numpy(y.copy())
    x_tr, y_tr = x[split["train"]], t[split["train"]]
    model = small_cnn(len(CLASSES))
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = args.epochs * -(-len(x_tr) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(args.seed)

    def accuracy(name: str) -> float:
        return float((predict(model, x[split[name]]) == t[split[name]]).float().mean())

    print("\n| epoch | train loss | val acc | test acc | s |\n|---|---|---|---|---|")
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(x_tr), generator=generator)
        total = 0.0
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            xb = x_tr[idx]
            flip = torch.rand(len(idx), generator=generator) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = loss_fn(model(xb), y_tr[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(idx)
        seconds = time.perf_counter() - start
        print(
            f"| {epoch} | {total / len(order):.4f} | {accuracy('val'):.3f} "
            f"| {accuracy('test'):.3f} | {seconds:.1f} |"
        )

    pred = predict(model, x[split["test"]])
    truth = t[split["test"]]
    print(f"\nfinal test accuracy: {float((pred == truth).float().mean()):.3f}")
    print("\n| true \\ predicted | " + " | ".join(CLASSES) + " | recall |")
    print("|---" * (len(CLASSES) + 2) + "|")
    for i, c in enumerate(CLASSES):
        counts = [int(((truth == i) & (pred == j)).sum()) for j in range(len(CLASSES))]
        recall = float((pred[truth == i] == i).float().mean())
        print(f"| {c} | " + " | ".join(map(str, counts)) + f" | {recall:.3f} |")


if __name__ == "__main__":
    main()
