"""Trainer overhead vs a bare PyTorch loop, the decoded-image cache, `features` vs `full`.

Both sides of each ratio run in the same process, one after the other, on the phantom set at
64 px (PNG files; training split, augmentation off so only the machinery differs), with the peak
resident memory of each. Prints markdown.
Usage: python benchmarks/trainer_speed.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from medsight.data.datasets import ImageDataset
from medsight.data.sources import load_samples
from medsight.data.synth import write_phantom_dataset
from medsight.models import create_model
from medsight.tasks.classify import class_weights
from medsight.training.optim import build_scheduler
from medsight.training.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from common import peak_rss_mib, reset_peak_rss  # noqa: E402


def medsight_run(
    data: Path, out: Path, model: str, epochs: int, cache: bool = True, **extra
) -> tuple[float, float]:
    """(train images/s, whole-epoch seconds) over the epochs after the first."""
    optim = {"epochs": epochs, "augment": "none", "patience": 99, "batch_size": 64, **extra}
    model_cfg = {"name": model}
    if "pretrained" in optim:
        model_cfg["pretrained"] = optim.pop("pretrained")
    config = TrainConfig(
        data=DataConfig(path=str(data), image_size=64, cache=cache),
        model=ModelConfig(**model_cfg),
        optim=OptimConfig(**optim),
        out=str(out),
    )
    run = train(config, show_progress=False)
    history = run.history().iloc[1:]
    n_train = int((run.splits()["split"] == "train").sum())
    return n_train / history["train_seconds"].mean(), history["seconds"].mean()


def bare_loop(data: Path, model_name: str, epochs: int, batch_size: int = 64) -> float:
    """A plain loop over in-memory tensors: same model, optimiser, schedule and loss."""
    table = load_samples(data)
    from medsight.data.splits import assign_splits

    table = assign_splits(table, seed=0)
    train_rows = table[table["split"] == "train"]
    classes = sorted(table["label"].unique())
    from medsight.data.transforms import Preprocess

    dataset = ImageDataset(train_rows, Preprocess(size=(64, 64)), classes)
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.as_tensor(dataset.targets)
    torch.manual_seed(0)
    model = create_model(model_name, len(classes), in_chans=1, drop_rate=0.1)
    optimizer = torch.optim.AdamW(model.param_groups(3e-3, 3e-3, 1e-4), lr=3e-3)
    steps = len(x) // batch_size
    scheduler = build_scheduler(
        "onecycle", optimizer, total_steps=epochs * steps, warmup_steps=steps
    ).scheduler
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_weights(np.bincount(y.numpy())))
    times = []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(x))
        for b in range(steps):
            idx = order[b * batch_size : (b + 1) * batch_size]
            loss = loss_fn(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        times.append(time.perf_counter() - start)
    return steps * batch_size / np.mean(times[1:])


def cache_table(tmp: Path, data_64: Path, epochs: int) -> None:
    """Epoch time with the decoded-image cache vs decoding every PNG every epoch.

    Training at 64 px from 64-px PNGs (decoding is cheap) and from 512-px PNGs resized to 64
    (decoding costs about 2.6 ms an image here), with a small and a very small network.
    """
    data_512 = write_phantom_dataset(tmp / "phantom_512", n=300, size=512, seed=0).parent
    print(
        "\n| PNG side → 64 px | model | cache | workers | epoch s (after the first) | img/s "
        "| speed-up vs no cache (auto workers) | peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for side, data in ((512, data_512), (64, data_64)):
        for model in ("mobilenetv3_small_100", "medcnn_s"):
            rows = []
            for cache, workers in ((True, None), (False, None), (False, 0)):
                reset_peak_rss()
                out = tmp / f"cache_{side}_{model}_{cache}_{workers}"
                ips, epoch = medsight_run(data, out, model, epochs, cache, workers=workers)
                used = "0" if cache or workers == 0 else "auto (2)"
                rows.append((cache, used, ips, epoch, peak_rss_mib()))
            base = rows[1][3]
            for cache, used, ips, epoch, rss in rows:
                print(
                    f"| {side} | {model} | {'yes' if cache else 'no'} | {used} | {epoch:.2f} "
                    f"| {ips:.0f} | {base / epoch:.2f}× | {rss:.0f} |"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sections", default="overhead,cache,features")
    args = parser.parse_args()
    sections = args.sections.split(",")
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_phantom_dataset(tmp / "phantom", n=1200, size=64, seed=0).parent
        if "overhead" in sections:
            print(
                "| model @ 64 px | medsight train img/s | bare loop img/s | ratio | peak RSS MiB |"
            )
            print("|---|---|---|---|---|")
            for name in ("medcnn_s", "resnet18"):
                reset_peak_rss()
                ours, _ = medsight_run(data, tmp / f"run_{name}", name, args.epochs)
                rss = peak_rss_mib()
                bare = bare_loop(data, name, args.epochs)
                print(f"| {name} | {ours:.0f} | {bare:.0f} | {ours / bare:.2f} | {rss:.0f} |")

        if "cache" in sections:
            cache_table(tmp, data, args.epochs)

        if "features" not in sections:
            return
        print("\n| mobilenet_v2 (ImageNet) @ 64 px | epoch s (after the first) | peak RSS MiB |")
        print("|---|---|---|")
        reset_peak_rss()
        _, full = medsight_run(data, tmp / "full", "mobilenet_v2", args.epochs, pretrained=True)
        full_rss = peak_rss_mib()
        reset_peak_rss()
        _, feats = medsight_run(
            data, tmp / "feat", "mobilenet_v2", args.epochs, pretrained=True, mode="features"
        )
        print(
            f"| full | {full:.2f} | {full_rss:.0f} |\n| features | {feats:.3f} "
            f"| {peak_rss_mib():.0f} |"
        )
        print(f"\nfeatures is {full / feats:.0f}x faster per epoch than full")


if __name__ == "__main__":
    main()
