"""Small CNNs for small medical images (28–128 px), trained from scratch, with attention inside.

``medcnn_s``, ``medcnn_m`` and ``medcnn_lite`` are VGG-style stacks of 3×3 conv–BN–ReLU layers
in four stages (``stem``, ``stage1``, ``stage2``, ``stage3``); each stage after the stem starts
with a 2×2 max-pool, skipped when the map is already 1 px high or wide, so any input from 8 px
upwards works (28 px → 28, 14, 7, 4). An attention block
(:func:`~medsight.models.attention.create_attention`) closes each of the last two stages. With
token attention (``self``, ``diff``, ``sparse``) the classifier built around it
(:func:`~medsight.models.zoo.create_model`) also pools the last map by attention
(:class:`~medsight.models.attention.AttentionPool2d`, ``pool="attention"``) instead of
averaging: the blocks' own maps do not localise (their residual gate γ stays small and every
stage-3 token already sees most of the image), the pooling's weights do.

``medcnn_lite`` is the CPU-lean member: its stem also max-pools after its first conv when the
input is 48 px or more (64 px → 32, 16, 8, 4; 28 px keeps its full resolution), its first two
stages are narrower (16 and 48 channels) and it runs channels-last after its first conv. At
64 px it costs 37 M multiply-accumulates to ``medcnn_s``'s 209 M and trains about 5–6× faster
at 64–128 px on a 2-core CPU (``benchmarks/lean_cnn.py``). Depthwise-separable and
inverted-residual stages were measured too: as cheap, but clearly less accurate after a short
training (``benchmarks/README.md``). Its last map is 4 × 4 at 64 px (``medcnn_s``: 8 × 8), coarse
for Grad-CAM there; ``backbone.stage2`` (8 × 8) localises phantom lesions about as well as
``medcnn_s``'s default layer.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsight.errors import ConfigError
from medsight.models.attention import ATTENTION_KINDS, create_attention

__all__ = [
    "CUSTOM_ARCHS",
    "ChannelsLastConv2d",
    "MedCNN",
    "MedCNNConfig",
    "attention_kwargs",
    "create_custom",
    "create_custom_3d",
    "MedCNN3D",
]


@dataclass(frozen=True)
class MedCNNConfig:
    """Widths and conv counts of the four stages (stem first), and the stem's options.

    ``stem_pool_from``: the stem max-pools after its first conv when the input's shorter side has
    at least this many pixels (``None``: never); ``channels_last``: the layers after the first
    conv run in channels-last layout (see :class:`ChannelsLastConv2d`).
    """

    widths: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    stem_pool_from: int | None = None
    channels_last: bool = False


CUSTOM_ARCHS: dict[str, MedCNNConfig] = {
    "medcnn_s": MedCNNConfig(widths=(32, 64, 128, 256), depths=(2, 2, 2, 2)),
    "medcnn_m": MedCNNConfig(widths=(48, 96, 192, 384), depths=(2, 2, 3, 3)),
    "medcnn_lite": MedCNNConfig(
        widths=(16, 48, 128, 256), depths=(2, 2, 2, 2), stem_pool_from=48, channels_last=True
    ),
}

STAGE_NAMES: tuple[str, ...] = ("stem", "stage1", "stage2", "stage3")


class ChannelsLastConv2d(nn.Conv2d):
    """A ``Conv2d`` whose output is in channels-last (NHWC) layout; its weights keep the default
    layout, so state dicts and saved runs do not change.

    Everything after it (convolutions, BatchNorms, pools) then runs channels-last, which oneDNN
    does faster on CPU: about 1.1× for ``medcnn_lite``'s training steps at 64–128 px on a
    2-core machine. Converting the input instead does nothing for one-channel images, whose
    two layouts coincide.
    """

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).contiguous(memory_format=torch.channels_last)


def _conv_bn_relu(
    in_chans: int, out_chans: int, conv: type[nn.Conv2d] = nn.Conv2d
) -> nn.Sequential:
    return nn.Sequential(
        conv(in_chans, out_chans, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_chans),
        nn.ReLU(inplace=True),
    )


class MaybePool(nn.Module):
    """2×2 max-pool (ceil mode, so no border row is lost) unless the map's shorter side is
    below ``min_side`` pixels (default 2: unless the map is already 1 px thin)."""

    def __init__(self, min_side: int = 2):
        super().__init__()
        self.min_side = min_side

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < self.min_side:
            return x
        return F.max_pool2d(x, 2, ceil_mode=True)

    def extra_repr(self) -> str:
        return f"min_side={self.min_side}" if self.min_side != 2 else ""


def attention_kwargs(kind: str, channels: int, layer_index: int = 1) -> dict:
    """Constructor arguments of an attention block ``kind`` on ``channels`` at ``layer_index``.

    Differential blocks get ``layer_index`` (their λ_init schedule); self-attention gets heads
    about 128 channels wide.
    """
    if kind == "diff":
        return {"layer_index": layer_index}
    if kind == "self":
        heads = max(1, channels // 128)
        while channels % heads:
            heads -= 1
        return {"heads": heads}
    return {}


class MedCNN(nn.Module):
    """Four-stage 3×3 CNN; ``forward_features`` gives the last stage's map (B, widths[-1], h, w).

    ``attention`` (one of :data:`~medsight.models.attention.ATTENTION_KINDS`) puts one block at
    the end of each of the last two stages (``stage2.attention``, ``stage3.attention``); the
    differential blocks get ``layer_index`` 1 and 2. ``stem_pool_from`` and ``channels_last``:
    see :class:`MedCNNConfig`.

    Example:
        >>> net = MedCNN(in_chans=1, attention="cbam")
        >>> net.forward_features(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 256, 4, 4])
    """

    def __init__(
        self,
        in_chans: int = 1,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        depths: tuple[int, ...] = (2, 2, 2, 2),
        attention: str = "none",
        stem_pool_from: int | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        if len(widths) != len(STAGE_NAMES) or len(depths) != len(STAGE_NAMES):
            raise ConfigError(
                f"MedCNN needs {len(STAGE_NAMES)} widths and depths, got {widths} and {depths}"
            )
        kind = attention.strip().lower() if isinstance(attention, str) else attention
        if kind not in ATTENTION_KINDS:
            raise ConfigError(
                f"attention {attention!r} is not known; choose one of: {', '.join(ATTENTION_KINDS)}"
            )
        self.attention_kind = kind
        self.num_features = widths[-1]
        previous = in_chans
        n_stages = len(STAGE_NAMES)
        for index, (name, width, depth) in enumerate(zip(STAGE_NAMES, widths, depths)):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            if index > 0:
                layers["pool"] = MaybePool()
            for j in range(depth):
                first = index == 0 and j == 0
                conv = ChannelsLastConv2d if first and channels_last else nn.Conv2d
                layers[f"conv{j + 1}"] = _conv_bn_relu(previous, width, conv)
                previous = width
                if first and stem_pool_from is not None:
                    layers["pool"] = MaybePool(stem_pool_from)
            layer_index = index - (n_stages - 2) + 1  # 1 and 2 for the last two stages
            if kind != "none" and layer_index >= 1:
                layers["attention"] = create_attention(
                    kind, width, **attention_kwargs(kind, width, layer_index)
                )
            self.add_module(name, nn.Sequential(layers))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        for name in STAGE_NAMES:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)


def create_custom(arch: str, in_chans: int = 1, attention: str = "none") -> MedCNN:
    """Build the custom backbone ``arch`` (a key of :data:`CUSTOM_ARCHS`)."""
    if arch not in CUSTOM_ARCHS:
        raise ConfigError(
            f"unknown custom architecture {arch!r}; choose one of: {', '.join(CUSTOM_ARCHS)}"
        )
    cfg = CUSTOM_ARCHS[arch]
    return MedCNN(
        in_chans=in_chans,
        widths=cfg.widths,
        depths=cfg.depths,
        attention=attention,
        stem_pool_from=cfg.stem_pool_from,
        channels_last=cfg.channels_last,
    )


# --- 3-D ------------------------------------------------------------------------------------


class MaybePool3d(nn.Module):
    """2×2×2 max-pool (ceil mode) unless the map's thinnest side is already 1 voxel."""

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-3:]) < 2:
            return x
        return F.max_pool3d(x, 2, ceil_mode=True)


def _conv_bn_relu_3d(in_chans: int, out_chans: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(out_chans),
        nn.ReLU(inplace=True),
    )


#: 3-D members of the custom family: (widths, depths) of the stages ``stem``..``stage3``.
CUSTOM_3D_ARCHS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "medcnn3d_s": ((16, 32, 64, 128), (1, 1, 2, 2)),
    "medcnn3d_m": ((24, 48, 96, 192), (1, 2, 2, 2)),
}


class MedCNN3D(nn.Module):
    """The 3-D sibling of :class:`MedCNN` for volumes of 16³–64³ trained from scratch on a CPU:
    four stages of 3×3×3 conv–BN–ReLU; the stem's first conv has stride 2 and ``stage1`` and
    ``stage2`` start with a 2×2×2 max-pool, so 28³ → 14, 7, 4, 4 and 64³ → 32, 16, 8, 8
    (a stride-1 stem at full resolution costs 3-4× the training time for little gain on
    MedMNIST3D-sized volumes). ``forward_features`` gives ``(B, C, x, y, z)``.

    Example:
        >>> MedCNN3D(1).forward_features(torch.zeros(2, 1, 28, 28, 28)).shape
        torch.Size([2, 128, 4, 4, 4])
    """

    def __init__(
        self,
        in_chans: int = 1,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        depths: tuple[int, ...] = (1, 1, 2, 2),
    ):
        super().__init__()
        self.num_features = widths[-1]
        previous = in_chans
        for index, (name, width, depth) in enumerate(zip(STAGE_NAMES, widths, depths)):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            if index in (1, 2):
                layers["pool"] = MaybePool3d()
            for j in range(depth):
                stride = 2 if index == 0 and j == 0 else 1
                layers[f"conv{j + 1}"] = _conv_bn_relu_3d(previous, width, stride)
                previous = width
            self.add_module(name, nn.Sequential(layers))
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        for name in STAGE_NAMES:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)


def create_custom_3d(arch: str, in_chans: int = 1) -> MedCNN3D:
    """Build the 3-D custom backbone ``arch`` (a key of :data:`CUSTOM_3D_ARCHS`)."""
    if arch not in CUSTOM_3D_ARCHS:
        raise ConfigError(
            f"unknown 3-D custom architecture {arch!r}; choose one of: {', '.join(CUSTOM_3D_ARCHS)}"
        )
    widths, depths = CUSTOM_3D_ARCHS[arch]
    return MedCNN3D(in_chans, widths, depths)
