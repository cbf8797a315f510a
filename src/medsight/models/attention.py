"""Attention blocks for CNN feature maps: each maps a (B, C, H, W) tensor to one of the same shape.

They fit inside a small custom CNN or on top of any backbone's last feature map; build one by
name with :func:`create_attention` (``none``, ``se``, ``cbam``, ``self``, ``diff``, ``sparse``).
The token-attention blocks (``self``, ``diff``, ``sparse``) treat the H·W positions as tokens,
add their output through a learnable scale γ that starts at 0 (so a pretrained network is
unchanged until training moves γ), and can return their attention maps (B, heads, H·W, H·W)
for explanation.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsight.config import Attention
from medsight.errors import ConfigError

__all__ = [
    "ATTENTION_KINDS",
    "AttentionPool2d",
    "CBAM",
    "DifferentialAttention2d",
    "SelfAttention2d",
    "SparseAttention2d",
    "SqueezeExcitation",
    "create_attention",
    "differential_attention",
    "lambda_init_schedule",
    "sparse_attention",
]

Maps = dict[str, Tensor]


def _hidden_width(channels: int, reduction: int) -> int:
    # A floor of 8 keeps narrow layers from a 1- or 2-unit bottleneck, but never widens the input.
    return max(channels // reduction, min(channels, 8))


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al., 2018): rescale each channel by a gate from global context.

    s = σ(W₂ · ReLU(W₁ · GAP(x) + b₁) + b₂),   y = x · s   (s broadcast over H, W)

    W₁ maps C → max(C // reduction, min(C, 8)) units, W₂ maps back to C.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = _hidden_width(channels, reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return x * s[:, :, None, None]


class CBAM(nn.Module):
    """Convolutional block attention module (Woo et al., 2018): channel, then spatial attention.

    M_c = σ(MLP(AvgPool(x)) + MLP(MaxPool(x))),          x' = x · M_c   (per channel)
    M_s = σ(conv_k×k([mean_c(x'); max_c(x')])),          y = x' · M_s   (per position)

    The MLP (C → max(C // reduction, min(C, 8)) → C, ReLU between) is shared by both descriptors.
    """

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7):
        super().__init__()
        if spatial_kernel < 1 or spatial_kernel % 2 == 0:
            raise ConfigError(
                f"CBAM spatial_kernel={spatial_kernel} must be a positive odd number (e.g. 7)"
                " so the spatial map keeps the input's size"
            )
        hidden = _hidden_width(channels, reduction)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        m_c = torch.sigmoid(self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3))))
        x = x * m_c[:, :, None, None]
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


def lambda_init_schedule(layer_index: int) -> float:
    """λ_init for the differential-attention block at depth ``layer_index`` (1-based).

    λ_init = 0.8 − 0.6 · exp(−0.3 · (l − 1)):  0.2 for l = 1, ≈0.356 for l = 2, → 0.8 deep down.
    """
    if layer_index < 1:
        raise ConfigError(f"layer_index={layer_index} must be 1 or more (it counts from 1)")
    return 0.8 - 0.6 * math.exp(-0.3 * (layer_index - 1))


def _attention_weights(q: Tensor, k: Tensor) -> Tensor:
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    # float32 softmax: under autocast, half-precision logits of large maps lose the small weights.
    return scores.softmax(-1, dtype=torch.float32).type_as(q)


def differential_attention(
    q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, v: Tensor, lam: float | Tensor
) -> tuple[Tensor, Maps]:
    """Differential attention (Ye et al., 2024, arXiv 2410.05258), no causal mask.

    A₁ = softmax(Q₁K₁ᵀ/√d),   A₂ = softmax(Q₂K₂ᵀ/√d),   out = (A₁ − λ·A₂) · V

    ``q1, k1, q2, k2``: (..., N, d); ``v``: (..., N, d_v); ``lam``: a scalar. Returns ``out``
    (..., N, d_v) and the maps ``{"attention": A₁ − λA₂, "positive": A₁, "negative": A₂}``.
    Rows of A₁ and A₂ sum to 1, so rows of the differential map sum to 1 − λ; with λ = 0 this
    is ordinary scaled-dot-product attention with Q₁, K₁.
    """
    a1 = _attention_weights(q1, k1)
    a2 = _attention_weights(q2, k2)
    diff = a1 - lam * a2
    return diff @ v, {"attention": diff, "positive": a1, "negative": a2}


def sparse_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Maps]:
    """Softmax attention that keeps only above-average weights (ablation of differential attention).

    A = softmax(QKᵀ/√d),   M = [A > 1/N],   Â = A·M / Σⱼ(A·M),   out = Â · V

    1/N is each row's mean. Kept weights are renormalised to sum to 1 so the output stays a
    weighted average of the values, as in dense attention; a row with nothing above its mean
    (exactly uniform) is kept whole. Returns ``out`` and ``{"attention": Â, "dense": A}``.
    """
    dense = _attention_weights(q, k)
    keep = dense > 1.0 / dense.shape[-1]
    keep = keep | ~keep.any(-1, keepdim=True)
    sparse = dense * keep
    sparse = sparse / sparse.sum(-1, keepdim=True)
    return sparse @ v, {"attention": sparse, "dense": dense}


def _split_heads(t: Tensor, heads: int) -> Tensor:
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, N, h·d) → (B, h, N, d)


def _merge_heads(t: Tensor) -> Tensor:
    return t.transpose(1, 2).flatten(2)  # (B, h, N, d) → (B, N, h·d)


def _check_split(block: str, dim: int, parts: int, what: str) -> None:
    if parts < 1 or dim % parts:
        raise ConfigError(
            f"{block}: dim={dim} does not split into {what} = {parts} equal parts;"
            " choose heads (or dim=) so that it does"
        )


class _RMSNorm(nn.Module):
    # Our own: nn.RMSNorm needs torch ≥ 2.4 and the project supports 2.2.
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(
            x
        ) * self.weight


class _TokenAttention2d(nn.Module):
    """Frame shared by the token blocks: positions become tokens, attend, project, add through γ.

    t = LayerNorm(tokens(x + dwconv₃ₓ₃(x))),   y = x + γ · W_o · attend(W_q t, W_k t, W_v t)

    γ starts at 0, so y = x exactly until training moves it: the block can be put on a
    pretrained backbone without changing what it computes. The depthwise 3×3 convolution is a
    position encoding (attention alone ignores where a token is); the pre-norm keeps attention
    logits sensible whatever the scale of the incoming features.
    """

    def __init__(self, channels: int, dim: int, pos_encoding: bool):
        super().__init__()
        self.pos = (
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels) if pos_encoding else None
        )
        self.norm = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, dim, bias=False)
        self.k = nn.Linear(channels, dim, bias=False)
        self.v = nn.Linear(channels, dim, bias=False)
        self.out = nn.Linear(dim, channels)
        self.gamma = nn.Parameter(torch.zeros(()))
        #: Detached maps of the latest forward pass, (B, heads, H·W, H·W), for explanation.
        self.last_attention: Tensor | None = None

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> tuple[Tensor, Maps]:
        raise NotImplementedError

    def _run(self, x: Tensor, return_attention: bool, **kwargs) -> Tensor | tuple[Tensor, Maps]:
        b, c, h, w = x.shape
        t = x if self.pos is None else x + self.pos(x)
        t = self.norm(t.flatten(2).transpose(1, 2))
        out, maps = self._attend(self.q(t), self.k(t), self.v(t), **kwargs)
        y = x + self.gamma * self.out(out).transpose(1, 2).reshape(b, c, h, w)
        self.last_attention = maps["attention"].detach()
        return (y, maps) if return_attention else y

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Maps]:
        """``y`` (same shape as ``x``), or ``(y, maps)`` with ``maps["attention"]`` (B, h, N, N)."""
        return self._run(x, return_attention)


class SelfAttention2d(_TokenAttention2d):
    """Non-local / SAGAN-style self-attention over the H·W positions of a feature map.

    per head: A = softmax(QKᵀ/√d),   y = x + γ · W_o · concat_heads(A · V),   γ initialised to 0

    ``dim`` is the width of Q, K and V (default ``channels``), split over ``heads``; set
    ``pos_encoding=False`` for the plain non-local block. Maps: ``{"attention": A}``.
    """

    def __init__(
        self, channels: int, heads: int = 1, dim: int | None = None, pos_encoding: bool = True
    ):
        dim = dim or channels
        _check_split("SelfAttention2d", dim, heads, "heads")
        super().__init__(channels, dim, pos_encoding)
        self.heads = heads

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Maps]:
        h = self.heads
        a = _attention_weights(_split_heads(q, h), _split_heads(k, h))
        return _merge_heads(a @ _split_heads(v, h)), {"attention": a}


def _default_heads(dim: int) -> int:
    # Heads about 128 wide (64 per differential component, as in the paper) that divide dim.
    heads = max(1, dim // 128)
    while heads > 1 and dim % (2 * heads):
        heads -= 1
    return heads


class DifferentialAttention2d(_TokenAttention2d):
    """Differential attention (DIFF Transformer, Ye et al., 2024) over a feature map's positions.

    Tokens are the H·W positions (after a depthwise 3×3 position encoding and LayerNorm). Per head,
    with head dim d: Q = [Q₁, Q₂], K = [K₁, K₂] (each d wide), V is 2d wide, and

        λ        = exp(λ_q1 · λ_k1) − exp(λ_q2 · λ_k2) + λ_init
        head     = (1 − λ_init) · RMSNorm((softmax(Q₁K₁ᵀ/√d) − λ · softmax(Q₂K₂ᵀ/√d)) · V)
        y        = x + γ · W_o · concat(head₁ … head_h)

    λ_q1, λ_k1, λ_q2, λ_k2 are learnable d-vectors ~ N(0, 0.1²) shared by the heads;
    λ_init = :func:`lambda_init_schedule` (``layer_index``, 1-based) unless ``lambda_init``
    is given.
    Unlike the paper's transformer layer the residual is scaled by γ, initialised to 0, so the
    block is an exact identity at first and can sit on a pretrained backbone.

    ``dim`` (default ``channels``) is the width of Q, K and V and must be divisible by 2·heads;
    ``heads`` defaults to about dim / 128. ``forward(x, return_attention=True, lam=None)``
    returns ``(y, maps)`` with ``maps["attention"]`` = A₁ − λA₂ and the components
    ``"positive"`` (A₁) and ``"negative"`` (A₂), each (B, heads, H·W, H·W). ``lam`` (or the
    attribute ``fixed_lambda``) replaces the learnt λ, e.g. λ = 0 for plain attention.

    Example:
        >>> block = DifferentialAttention2d(64, heads=2, layer_index=3)
        >>> y, maps = block(torch.randn(1, 64, 7, 7), return_attention=True)
        >>> maps["attention"].shape
        torch.Size([1, 2, 49, 49])
    """

    def __init__(
        self,
        channels: int,
        heads: int | None = None,
        layer_index: int = 1,
        lambda_init: float | None = None,
        dim: int | None = None,
        pos_encoding: bool = True,
    ):
        dim = dim or channels
        heads = heads or _default_heads(dim)
        _check_split("DifferentialAttention2d", dim, 2 * heads, "2·heads")
        super().__init__(channels, dim, pos_encoding)
        self.heads = heads
        self.head_dim = d = dim // (2 * heads)
        self.lambda_init = (
            lambda_init_schedule(layer_index) if lambda_init is None else float(lambda_init)
        )
        self.lambda_q1 = nn.Parameter(torch.empty(d).normal_(0.0, 0.1))
        self.lambda_k1 = nn.Parameter(torch.empty(d).normal_(0.0, 0.1))
        self.lambda_q2 = nn.Parameter(torch.empty(d).normal_(0.0, 0.1))
        self.lambda_k2 = nn.Parameter(torch.empty(d).normal_(0.0, 0.1))
        self.subln = _RMSNorm(2 * d)
        #: When set, used instead of the learnt λ (tests, ablations).
        self.fixed_lambda: float | None = None

    def current_lambda(self) -> Tensor:
        """The learnt λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init (a 0-d tensor)."""
        return (
            torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
            - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2))
            + self.lambda_init
        )

    def forward(
        self, x: Tensor, return_attention: bool = False, lam: float | Tensor | None = None
    ) -> Tensor | tuple[Tensor, Maps]:
        """``y``, or ``(y, maps)``; ``lam`` overrides λ for this call."""
        if lam is None:
            lam = self.current_lambda() if self.fixed_lambda is None else self.fixed_lambda
        return self._run(x, return_attention, lam=lam)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, lam: float | Tensor) -> tuple[Tensor, Maps]:
        h, d = self.heads, self.head_dim
        # Head i's two components sit side by side (2i, 2i+1), the paper's layout.
        q = q.unflatten(-1, (h, 2, d)).transpose(1, 2)  # (B, h, N, 2, d)
        k = k.unflatten(-1, (h, 2, d)).transpose(1, 2)
        out, maps = differential_attention(
            q[..., 0, :], k[..., 0, :], q[..., 1, :], k[..., 1, :], _split_heads(v, h), lam
        )
        # The norm evens out the heads' scales; (1 − λ_init) matches the gradient flow of
        # ordinary attention, as in the paper.
        return _merge_heads(self.subln(out) * (1.0 - self.lambda_init)), maps


class SparseAttention2d(_TokenAttention2d):
    """Sparse ablation of :class:`DifferentialAttention2d`: one softmax, above-mean weights only.

    per head: A = softmax(QKᵀ/√d), Â = A·[A > 1/N] renormalised per row (:func:`sparse_attention`),
    y = x + γ · W_o · concat_heads(Â · V), γ initialised to 0. Same tokens, position encoding,
    head count and widths as the differential block. Maps: ``{"attention": Â, "dense": A}``.
    """

    def __init__(
        self,
        channels: int,
        heads: int | None = None,
        dim: int | None = None,
        pos_encoding: bool = True,
    ):
        dim = dim or channels
        heads = heads or _default_heads(dim)
        _check_split("SparseAttention2d", dim, heads, "heads")
        super().__init__(channels, dim, pos_encoding)
        self.heads = heads

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Maps]:
        h = self.heads
        out, maps = sparse_attention(_split_heads(q, h), _split_heads(k, h), _split_heads(v, h))
        return _merge_heads(out), maps


class AttentionPool2d(nn.Module):
    """Attention pooling: a learnt query per head attends over the map's positions, and the
    pooled vector is the attention-weighted sum of the features themselves.

    Replaces global average pooling before a classifier. Tokens are the H·W positions, with the
    token blocks' depthwise 3×3 position encoding and LayerNorm; only the keys are learnt, the
    values are the features ``x`` (each head pools its C / heads channels), so the pooling
    weights are exactly how much each position contributes to the logits. ``kind`` sets the
    weights, per head, over the N positions, with keys K and learnt queries q (q₁, q₂):

        self:    a = softmax(q·Kᵀ/√d)
        diff:    a = softmax(q₁·K₁ᵀ/√d) − λ · softmax(q₂·K₂ᵀ/√d)   (λ as in
                 :class:`DifferentialAttention2d`; rows sum to 1 − λ)
        sparse:  a = softmax(q·Kᵀ/√d) kept above 1/N, renormalised (:func:`sparse_attention`)

    ``pooled[h] = Σₙ a[h, n] · x[h-th channel slice, n]``, shape (B, C). ``heads`` defaults to
    1 for ``diff`` (about dim / 128 otherwise) and ``layer_index`` to 1 (λ_init = 0.2): on the
    demo's phantoms two heads, or λ_init ≈ 0.47, point at the lesion on about half the images
    (5 seeds), one head with λ_init = 0.2 on 0.64 of them (16 seeds, 0.25–0.82;
    ``benchmarks/README.md``, "Attention that attends"). With the queries at 0
    the weights are uniform (1/N, or (1 − λ)/N for ``diff``), i.e. average pooling. The weights
    of the latest forward pass are kept in ``last_attention`` (B, heads, 1, H·W): one query,
    read by :func:`medsight.explain.attention_maps.attention_maps` like a block's maps.

    Example:
        >>> pool = AttentionPool2d(64, kind="diff", heads=2)
        >>> pool(torch.randn(3, 64, 8, 8)).shape
        torch.Size([3, 64])
    """

    def __init__(
        self,
        channels: int,
        kind: str = "diff",
        heads: int | None = None,
        layer_index: int = 1,
        pos_encoding: bool = True,
    ):
        super().__init__()
        kind = kind.strip().lower() if isinstance(kind, str) else kind
        if kind not in POOL_KINDS:
            raise ConfigError(
                f"AttentionPool2d kind={kind!r} is not known;"
                f" choose one of: {', '.join(POOL_KINDS)}"
            )
        parts = 2 if kind == "diff" else 1
        heads = heads or (1 if kind == "diff" else _default_heads(channels))
        _check_split("AttentionPool2d", channels, parts * heads, f"{parts}·heads")
        self.kind = kind
        self.heads = heads
        self.head_dim = d = channels // (parts * heads)
        self.pos = (
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels) if pos_encoding else None
        )
        self.norm = nn.LayerNorm(channels)
        self.k = nn.Linear(channels, channels, bias=False)
        # Queries start at 0: uniform weights, so training starts from average pooling.
        self.query = nn.Parameter(torch.zeros(heads, parts, d))
        if kind == "diff":
            self.lambda_init = lambda_init_schedule(layer_index)
            self.lambda_q1 = nn.Parameter(torch.empty(d).normal_(0.0, 0.1))
            self.lambda_k1 = nn.Parameter(torch.empty(d).normal_(0.0, 0.1))
            self.lambda_q2 = nn.Parameter(torch.empty(d).normal_(0.0, 0.1))
            self.lambda_k2 = nn.Parameter(torch.empty(d).normal_(0.0, 0.1))
        #: Detached weights of the latest forward pass, (B, heads, 1, H·W), for explanation.
        self.last_attention: Tensor | None = None

    def current_lambda(self) -> Tensor:
        """``diff``: the learnt λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init (a 0-d tensor)."""
        if self.kind != "diff":
            raise ConfigError(f"AttentionPool2d kind={self.kind!r} has no λ; only 'diff' has")
        return (
            torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
            - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2))
            + self.lambda_init
        )

    def weights(self, x: Tensor) -> Tensor:
        """The pooling weights of ``x`` (B, C, H, W): (B, heads, H·W)."""
        t = x if self.pos is None else x + self.pos(x)
        t = self.norm(t.flatten(2).transpose(1, 2))  # (B, N, C)
        h, d = self.heads, self.head_dim
        k = self.k(t).unflatten(-1, (h, -1, d)).permute(0, 2, 3, 1, 4)  # (B, h, parts, N, d)
        q = self.query.type_as(k)[None, :, :, None, :]  # (1, h, parts, 1, d)
        if self.kind == "diff":
            a1 = _attention_weights(q[:, :, 0], k[:, :, 0])
            a2 = _attention_weights(q[:, :, 1], k[:, :, 1])
            a = a1 - self.current_lambda().type_as(a1) * a2
        elif self.kind == "sparse":
            a = sparse_attention(q[:, :, 0], k[:, :, 0], k[:, :, 0])[1]["attention"]
        else:
            a = _attention_weights(q[:, :, 0], k[:, :, 0])
        return a[:, :, 0]  # (B, h, N)

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        a = self.weights(x)
        self.last_attention = a.detach()[:, :, None]
        values = x.flatten(2).unflatten(1, (self.heads, -1))  # (B, h, C/h, N)
        return (values * a[:, :, None].type_as(values)).sum(-1).reshape(b, c)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, heads={self.heads}"


#: Kinds of attention pooling (:class:`AttentionPool2d`): the token-attention kinds.
POOL_KINDS: tuple[str, ...] = ("self", "diff", "sparse")

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "none": lambda channels, **kwargs: nn.Identity(),
    "se": SqueezeExcitation,
    "cbam": CBAM,
    "self": SelfAttention2d,
    "diff": DifferentialAttention2d,
    "sparse": SparseAttention2d,
}
#: The kinds, in the order of :data:`medsight.config.Attention` (the one list; a kind added
#: there needs a builder here).
ATTENTION_KINDS: tuple[str, ...] = get_args(Attention)


def create_attention(kind: str, channels: int, **kwargs) -> nn.Module:
    """Build the attention block named ``kind`` (one of :data:`ATTENTION_KINDS`) for ``channels``.

    Extra keyword arguments go to the block's constructor; ``"none"`` gives ``nn.Identity``.

    Example:
        >>> block = create_attention("diff", 64, heads=2, layer_index=3)
        >>> block(torch.zeros(1, 64, 7, 7)).shape
        torch.Size([1, 64, 7, 7])
    """
    builder = _BUILDERS.get(kind.strip().lower()) if isinstance(kind, str) else None
    if builder is None:
        raise ConfigError(
            f"attention kind {kind!r} is not known; choose one of: {', '.join(ATTENTION_KINDS)}"
        )
    try:
        inspect.signature(builder).bind(channels, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"attention {kind!r}: {exc}") from None
    return builder(channels, **kwargs)
