"""Is the map faithful to the model? Deletion/insertion curves and the randomisation check.

**Deletion / insertion** (Petsiuk et al., RISE, 2018): remove the pixels the map ranks highest
first (replace them by black) and follow the probability of the explained class; a faithful map
makes it fall fast (low deletion AUC). Insertion starts from a blurred copy and puts the
original pixels back in the same order; the probability should rise fast (high insertion AUC).
AUCs are over the fraction of pixels changed, in [0, 1].

**Model-randomisation sanity check** (Adebayo et al., "Sanity checks for saliency maps", 2018):
the same method on a copy of the model with re-initialised weights must give a *different* map;
a map that barely changes (Spearman rank correlation near 1) shows the image, not the model.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from scipy import ndimage, stats
from torch import nn

from medsight.stats import bootstrap_ci

__all__ = [
    "deletion_insertion",
    "deletion_insertion_summary",
    "randomised_copy",
    "rank_correlation",
    "sanity_check",
    "sanity_summary",
]

#: Points on the deletion/insertion curves (0 %, 1/STEPS, …, 100 % of the pixels changed).
STEPS = 16
#: The insertion start: Gaussian blur this wide (fraction of the image side) removes the detail
#: a classifier reads while keeping the image's overall brightness.
BLUR = 1 / 8


def _black(x: torch.Tensor, preprocess: Any) -> torch.Tensor:
    if preprocess is not None:
        zero = torch.zeros(x.shape[1], *([1] * (x.ndim - 2)), dtype=x.dtype)
        return preprocess.normalize(zero).to(x.device).expand_as(x[0])
    return x[0].amin().expand_as(x[0])


@torch.no_grad()
def deletion_insertion(
    model: nn.Module,
    x: np.ndarray,
    heatmap: np.ndarray,
    target: int,
    *,
    preprocess: Any = None,
    steps: int = STEPS,
    seed: int = 0,
    activation: str = "softmax",
) -> dict[str, float]:
    """Deletion and insertion AUCs of one map: ``{"deletion_auc", "insertion_auc"}``.

    ``x`` is one preprocessed image ``(1, C, H, W)`` (or volume ``(1, C, X, Y, Z)``),
    ``heatmap`` its ``(H, W)`` (``(X, Y, Z)``) map, ``target``
    the explained class (or finding: ``activation="sigmoid"``, outputs that are independent
    probabilities). Ties in the map are broken at random (seeded), not in raster order,
    so a flat map scores like a random one.
    """
    model = model.eval()
    device = next(model.parameters()).device
    image = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
    spatial = tuple(image.shape[2:])
    heat = np.asarray(heatmap, dtype=np.float64).ravel()
    jitter = np.random.default_rng(seed).random(heat.size) * 1e-9
    order = np.lexsort((jitter, -heat))  # hottest first
    rank = np.empty(heat.size, dtype=np.int64)
    rank[order] = np.arange(heat.size)
    rank_t = torch.as_tensor(rank.reshape(spatial), device=device)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = torch.as_tensor(np.rint(fractions * heat.size).astype(np.int64), device=device)
    counts = counts.view(-1, *([1] * len(spatial)))
    changed = (rank_t[None] < counts).unsqueeze(1)  # (steps+1, 1, *spatial)
    black = _black(image, preprocess)
    sigma = BLUR * max(spatial)
    blurred = torch.as_tensor(
        np.stack([ndimage.gaussian_filter(ch, sigma) for ch in image[0].cpu().numpy()]),
        device=device,
    )
    deleted = torch.where(changed, black, image[0])
    inserted = torch.where(changed, image[0], blurred)
    logits = model(torch.cat([deleted, inserted])).float()
    probs = logits.sigmoid() if activation == "sigmoid" else logits.softmax(-1)
    probs = probs[:, target].cpu().numpy()
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    return {
        "deletion_auc": float(trapezoid(probs[: steps + 1], fractions)),
        "insertion_auc": float(trapezoid(probs[steps + 1 :], fractions)),
    }


def deletion_insertion_summary(
    model: nn.Module,
    x: np.ndarray,
    maps: np.ndarray,
    targets: list[int],
    preprocess: Any = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    activation: str = "softmax",
) -> dict[str, Any]:
    """Mean deletion and insertion AUC over a batch, each ``{"value", "ci"}``, and ``n_images``."""

    per = [
        deletion_insertion(
            model, x[i : i + 1], maps[i], targets[i], preprocess=preprocess, activation=activation
        )
        for i in range(len(x))
    ]
    return {
        "deletion_auc": bootstrap_ci([p["deletion_auc"] for p in per], n_bootstrap, seed),
        "insertion_auc": bootstrap_ci([p["insertion_auc"] for p in per], n_bootstrap, seed),
        "n_images": len(per),
    }


def randomised_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with every weight re-initialised (seeded), in eval mode.

    Modules with ``reset_parameters`` (convolutions, linear layers, norms) use their own
    initialisation; parameters they do not own (attention scales, λ vectors) are redrawn from
    N(0, 0.1²), so no trained value survives.
    """
    twin = copy.deepcopy(model)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        reset: set[int] = set()
        for module in twin.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
                reset.update(id(p) for p in module.parameters(recurse=False))
        with torch.no_grad():
            for param in twin.parameters():
                if id(param) not in reset:
                    param.normal_(0.0, 0.1)
    finally:
        torch.random.set_rng_state(generator_state)
    return twin.eval()


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation of two maps' pixels; None when either is flat."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.size != b.size:
        raise ValueError(f"maps differ in size: {a.size} vs {b.size} pixels")
    if np.ptp(a) <= 1e-12 or np.ptp(b) <= 1e-12:
        return None
    return float(stats.spearmanr(a, b).statistic)


def sanity_check(
    explainer: Any, x: np.ndarray, targets: list[int] | None = None, *, seed: int = 0, maps=None
) -> list[float | None]:
    """Per-image Spearman correlation between ``explainer``'s maps and those of the same method
    and layer on a randomised copy of its model. Near 0: the map depends on the weights (pass);
    near 1: it does not (fail). ``maps`` are the trained model's maps when already computed."""
    from medsight.explain.cam import Explainer

    if maps is None:
        maps = explainer.explain_batch(x, targets)
    twin = Explainer(
        randomised_copy(explainer.model, seed),
        explainer.method,
        explainer.layer,
        classes=explainer.classes,
        preprocess=explainer.preprocess,
    )
    try:
        random_maps = twin.explain_batch(x, targets)
    finally:
        twin.close()
    return [rank_correlation(a, b) for a, b in zip(maps, random_maps)]


#: A map passes the model-randomisation check (Adebayo et al., 2018) when its mean Spearman ρ
#: with the same method's map on re-initialised weights stays below this: above it, most of
#: the map survives without the trained model, so it shows the image more than the model.
SANITY_MAX_RHO = 0.5


def passes_sanity(sanity: dict | None) -> bool | None:
    """Whether a :func:`sanity_summary` passes (:data:`SANITY_MAX_RHO`); None when it was not
    measured or is undefined (flat maps)."""
    value = ((sanity or {}).get("spearman") or {}).get("value")
    return None if value is None else bool(value < SANITY_MAX_RHO)


def sanity_summary(
    explainer: Any,
    x: np.ndarray,
    maps: np.ndarray,
    targets: list[int],
    seed: int = 0,
    n_bootstrap: int = 1000,
) -> dict[str, Any]:
    """Mean Spearman correlation trained vs randomised, ``{"value", "ci"}``, ``n_images`` and
    whether it ``passes`` (:func:`passes_sanity`)."""

    values = sanity_check(explainer, x, targets, seed=seed, maps=maps)
    summary = {"spearman": bootstrap_ci(values, n_bootstrap, seed), "n_images": len(values)}
    summary["passes"] = passes_sanity(summary)
    return summary
