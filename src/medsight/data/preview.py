"""A labelled montage of a few images per class (or per finding, for several findings per
image): people would rather look than read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medsight.data.findings import is_multilabel, positives
from medsight.data.imaging import decode
from medsight.data.sources import class_names
from medsight.errors import ConfigError, DataError, ImageDecodeError


def make_montage(
    table: pd.DataFrame,
    out: str | Path,
    *,
    per_class: int = 8,
    seed: int = 0,
    tile_inches: float = 1.3,
) -> int:
    """Write a grid (one row per class, ``per_class`` images each) to ``out``; return images shown.

    A multi-label table gets one row per finding, of images showing that finding (with or
    without others). Unreadable images are skipped (the next candidate of the row is used
    instead).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if per_class < 1:
        raise ConfigError(f"per_class must be at least 1, got {per_class}")
    labelled = table["label"].notna().any()
    groups = class_names(table) if labelled else ["(unlabelled)"]
    if is_multilabel(table):
        present = positives(table["label"], groups) == 1
        members = {name: present[:, k] for k, name in enumerate(groups)}
    else:
        members = {name: (table["label"] == name).to_numpy() for name in groups}
    rng = np.random.default_rng(seed)
    picked: dict[str, list] = {}
    for name in groups:
        rows = table[members[name]] if labelled else table
        order = rng.permutation(len(rows))
        images = []
        for i in order:
            if len(images) == per_class:
                break
            row = rows.iloc[int(i)]
            try:
                images.append((row["sample_id"], decode(row["source"])))
            except ImageDecodeError:
                continue
        picked[name] = images
    if not any(picked.values()):
        raise DataError("no image could be decoded for the preview; run `medsight data check`")

    columns = max(len(v) for v in picked.values())
    fig, axes = plt.subplots(
        len(groups),
        columns,
        figsize=(columns * tile_inches, len(groups) * tile_inches + 0.3),
        squeeze=False,
    )
    for r, name in enumerate(groups):
        counts = int(members[name].sum()) if labelled else len(table)
        for c in range(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(picked[name]):
                sample_id, image = picked[name][c]
                pixels = image.pixels
                if image.channels == "L":
                    ax.imshow(pixels[0], cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(np.clip(pixels.transpose(1, 2, 0), 0, 1))
                name_shown = Path(sample_id).name
                if len(name_shown) > 18:
                    name_shown = "…" + name_shown[-17:]
                ax.set_title(name_shown, fontsize=6, color="#555555")
            if c == 0:
                ax.set_ylabel(
                    f"{name}\n(n={counts:,})",
                    fontsize=9,
                    rotation=0,
                    ha="right",
                    va="center",
                    labelpad=8,
                )
    noun = "findings" if is_multilabel(table) else "classes"
    kinds = f"{len(groups)} {noun}" if labelled else "unlabelled"
    fig.suptitle(f"{len(table):,} images, {kinds}", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return sum(len(v) for v in picked.values())
