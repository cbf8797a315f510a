"""The model's own attention, rendered as a spatial heat-map.

Token-attention blocks (``self``, ``diff``, ``sparse`` in :mod:`medsight.models.attention`)
treat the h·w positions of a feature map as tokens and keep their latest maps
(B, heads, h·w, h·w). A map averaged over heads and queries says how much attention each
position *receives*; reshaped to (h, w) and upsampled to the input it is an explanation the
model computed itself, with no gradient. For differential attention the map is A₁ − λA₂, so
positions the two softmaxes agree on (common-mode noise) cancel. It does not depend on the
class: every class reads the same attended features.

A model whose head pools by attention (``pool="attention"``,
:class:`~medsight.models.attention.AttentionPool2d`, the default for custom CNNs with token
attention) keeps one more map: the pooling's weights, one learnt query per head over the last
map's positions. That block is the last, so it is the default: its weights are exactly how much
each position's features count in the logits, and they are what localises
(``benchmarks/README.md``, "Attention that attends"). Runs without it read the last block's map
as before.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsight.errors import ConfigError
from medsight.models.attention import (
    AttentionPool2d,
    DifferentialAttention2d,
    SelfAttention2d,
    SparseAttention2d,
)

__all__ = [
    "ATTENTION_MAP_KINDS",
    "TOKEN_BLOCKS",
    "attention_maps",
    "default_block",
    "no_attention_message",
    "token_blocks",
]

#: Block classes that keep attention maps (an attention-pooling head's one query included).
TOKEN_BLOCKS = (SelfAttention2d, DifferentialAttention2d, SparseAttention2d, AttentionPool2d)
#: ``attention=`` settings whose models have such blocks.
ATTENTION_MAP_KINDS = ("self", "diff", "sparse")


def token_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every token-attention block in ``model``, in forward order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TOKEN_BLOCKS)]


def no_attention_message(model: nn.Module) -> str:
    """Why ``attention`` cannot explain ``model``, and which models it can."""
    spec = getattr(model, "spec", None)
    kind = getattr(model, "attention_kind", None)
    what = f"model {spec.name} with attention {kind!r}" if spec else type(model).__name__
    return (
        f"method 'attention' needs a model with token-attention maps, and {what} has none;"
        f" it applies to models trained with attention {', '.join(ATTENTION_MAP_KINDS)}"
        " (e.g. medcnn_s with --attention diff, or any backbone with --attention self);"
        " se and cbam blocks only reweight channels/positions. Use a CAM method instead"
        " (gradcam works on every model)"
    )


def default_block(model: nn.Module) -> str:
    """The last token-attention block: the one closest to the classifier (the head's attention
    pooling when the model has one)."""
    blocks = token_blocks(model)
    if not blocks:
        raise ConfigError(no_attention_message(model))
    return blocks[-1][0]


def attention_maps(model: nn.Module, x: torch.Tensor, block: str | None = None) -> np.ndarray:
    """Attention received per position, upsampled to the input: float32 ``(N, H, W)``.

    Runs ``model`` on ``x`` once and reads ``block``'s map (default :func:`default_block`),
    mean over heads and queries. Values are not normalised (differential maps can be negative).
    """
    name = block or default_block(model)
    module = model.get_submodule(name)
    if not isinstance(module, TOKEN_BLOCKS):
        raise ConfigError(f"{name!r} is not a token-attention block; it keeps no attention map")
    grid: list[tuple[int, int]] = []

    def remember_grid(mod, args):
        grid.append(tuple(args[0].shape[-2:]))

    handle = module.register_forward_pre_hook(remember_grid)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    maps = module.last_attention
    if maps is None or not grid:
        raise ConfigError(f"block {name!r} did not run in the forward pass; choose another one")
    h, w = grid[-1]
    # (B, heads, queries, keys) → (B, keys); an attention pool has one query per head
    received = maps.float().mean(dim=(1, 2))
    spatial = received.reshape(-1, 1, h, w)
    up = F.interpolate(spatial, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    return up[:, 0].cpu().numpy().astype(np.float32)
