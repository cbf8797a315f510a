"""Frozen-backbone embeddings, computed once and cached on disk for ``--mode features``.

The cache key covers the images (source, size, modification time), the preprocessing and the
backbone weights, so a changed file, size or model never reuses stale features. After the first
epoch, training the head touches no image and no backbone.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from medsight.data.datasets import ImageDataset


def feature_cache_key(dataset: ImageDataset, model, pooled: bool) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for source in dataset.table["source"]:
        digest.update(source.encode())
        path = source.split("://", 1)[-1].rsplit("!", 1)[0] if "://" in source else source
        try:
            stat = os.stat(path)
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        except OSError:
            pass
    digest.update(json.dumps(dataset.preprocess.to_dict(), sort_keys=True).encode())
    digest.update(json.dumps(model.config(), sort_keys=True).encode())
    digest.update(b"pooled" if pooled else b"maps")
    for name, tensor in model.backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def extract_features(
    model,
    dataset: ImageDataset,
    *,
    cache_dir: str | Path,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, targets)`` for every image: pooled ``(N, C, 1, 1)`` embeddings, or the full
    feature maps when an attention block sits on top of the backbone (it needs positions)."""
    pooled = model.attention_kind == "none" or isinstance(model.attention, torch.nn.Identity)
    key = feature_cache_key(dataset, model, pooled)
    path = Path(cache_dir) / f"{key}.pt"
    if path.exists():
        cached = torch.load(path, weights_only=True)
        if progress is not None:
            progress(len(dataset))
        return cached["features"], cached["targets"]
    was_training = model.training
    model.eval()
    chunks, targets = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        fmap = model.forward_features(x.to(device))
        if pooled:
            fmap = F.adaptive_avg_pool2d(fmap, 1)
        chunks.append(fmap.float().cpu())
        targets.append(y)
        if progress is not None:
            progress(len(y))
    model.train(was_training)
    features, labels = torch.cat(chunks), torch.cat(targets)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"features": features, "targets": labels}, tmp)
    os.replace(tmp, path)
    return features, labels
