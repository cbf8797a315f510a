"""What medsight knows about a model besides its architecture, as data (timm's ``PretrainedCfg``
idea). A leaf: the zoo fills the registry with these, everything else reads them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """One registered model: its family, architecture, input size and normalisation.

    ``mean``/``std`` are the normalisation its pretrained weights expect; ``offline_weights`` is
    True when an installed weight package provides genuine pretrained weights.
    """

    name: str
    family: str  # "timm" | "torchvision" | "custom" | "monai" | "detector"
    arch: str
    default_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    offline_weights: bool
    description: str = ""
    #: 2 for images ``(B, C, H, W)``, 3 for volumes ``(B, C, X, Y, Z)``.
    dims: int = 2
