"""Attention blocks: shapes, identity at initialisation, and the formulas each block promises."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medsight.errors import ConfigError
from medsight.models.attention import (
    ATTENTION_KINDS,
    CBAM,
    AttentionPool2d,
    DifferentialAttention2d,
    SelfAttention2d,
    SparseAttention2d,
    SqueezeExcitation,
    create_attention,
    differential_attention,
    lambda_init_schedule,
    sparse_attention,
)

TOKEN_BLOCKS = {
    "self": SelfAttention2d,
    "diff": DifferentialAttention2d,
    "sparse": SparseAttention2d,
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _qkv(n: int = 9, d: int = 4, dv: int = 8, batch: int = 2, heads: int = 3):
    shape = (batch, heads, n)
    q1, k1, q2, k2 = (torch.randn(*shape, d) for _ in range(4))
    return q1, k1, q2, k2, torch.randn(*shape, dv)


def _switch_on(block: nn.Module) -> nn.Module:
    with torch.no_grad():
        block.gamma.fill_(0.7)
    return block


# --- λ_init schedule -------------------------------------------------------------------------


def test_lambda_init_schedule_matches_the_paper():
    assert lambda_init_schedule(1) == pytest.approx(0.2)
    assert lambda_init_schedule(2) == pytest.approx(0.8 - 0.6 * math.exp(-0.3))
    assert lambda_init_schedule(2) == pytest.approx(0.3555, abs=1e-4)
    assert lambda_init_schedule(100) == pytest.approx(0.8, abs=1e-9)


def test_lambda_init_schedule_rejects_zero_based_index():
    with pytest.raises(ConfigError, match="layer_index=0"):
        lambda_init_schedule(0)


def test_block_uses_schedule_unless_lambda_init_is_given():
    assert DifferentialAttention2d(8, layer_index=2).lambda_init == pytest.approx(
        lambda_init_schedule(2)
    )
    assert DifferentialAttention2d(8, layer_index=2, lambda_init=0.5).lambda_init == 0.5


# --- differential attention: the computation --------------------------------------------------


def test_differential_attention_with_zero_lambda_is_scaled_dot_product_attention():
    q1, k1, q2, k2, v = _qkv()
    out, maps = differential_attention(q1, k1, q2, k2, v, lam=0.0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q1, k1, v))
    torch.testing.assert_close(maps["attention"], maps["positive"])


def test_differential_attention_subtracts_lambda_times_second_map():
    q1, k1, q2, k2, v = _qkv()
    out, _ = differential_attention(q1, k1, q2, k2, v, lam=0.3)
    a1 = torch.softmax(q1 @ k1.transpose(-2, -1) / 2.0, -1)  # √d = 2
    a2 = torch.softmax(q2 @ k2.transpose(-2, -1) / 2.0, -1)
    torch.testing.assert_close(out, (a1 - 0.3 * a2) @ v)
    assert not torch.allclose(out, F.scaled_dot_product_attention(q1, k1, v))


@pytest.mark.parametrize("lam", [0.0, 0.2, 0.8])
def test_component_maps_are_row_stochastic_and_difference_rows_sum_to_one_minus_lambda(lam):
    _, maps = differential_attention(*_qkv(), lam=lam)
    for name in ("positive", "negative"):
        assert (maps[name] >= 0).all()
        torch.testing.assert_close(maps[name].sum(-1), torch.ones(2, 3, 9))
    torch.testing.assert_close(maps["attention"].sum(-1), torch.full((2, 3, 9), 1 - lam))


def _reference_diff_block(block: DifferentialAttention2d, x: torch.Tensor, lam: float):
    """The block written out by hand, with SDPA standing in for attention (valid when λ = 0)."""
    b, c, h, w = x.shape
    heads, d = block.heads, block.head_dim
    t = F.layer_norm((x + block.pos(x)).flatten(2).transpose(1, 2), (c,), *_ln(block))
    q = (t @ block.q.weight.T).reshape(b, h * w, heads, 2, d).permute(0, 2, 3, 1, 4)
    k = (t @ block.k.weight.T).reshape(b, h * w, heads, 2, d).permute(0, 2, 3, 1, 4)
    v = (t @ block.v.weight.T).reshape(b, h * w, heads, 2 * d).transpose(1, 2)
    assert lam == 0.0
    o = F.scaled_dot_product_attention(q[:, :, 0], k[:, :, 0], v)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * block.subln.weight
    o = (o * (1 - block.lambda_init)).transpose(1, 2).reshape(b, h * w, 2 * d * heads)
    z = o @ block.out.weight.T + block.out.bias
    return x + block.gamma * z.transpose(1, 2).reshape(b, c, h, w)


def _ln(block):
    return block.norm.weight, block.norm.bias, block.norm.eps


def test_block_with_lambda_fixed_at_zero_is_standard_attention():
    block = _switch_on(DifferentialAttention2d(16, heads=2, layer_index=3))
    x = torch.randn(2, 16, 5, 6)
    torch.testing.assert_close(block(x, lam=0.0), _reference_diff_block(block, x, 0.0))
    assert not torch.allclose(block(x), _reference_diff_block(block, x, 0.0))


def test_fixed_lambda_attribute_equals_lam_argument():
    block = _switch_on(DifferentialAttention2d(8, heads=1))
    x = torch.randn(1, 8, 5, 5)
    expected = block(x, lam=0.0)
    block.fixed_lambda = 0.0
    torch.testing.assert_close(block(x), expected)


def test_block_maps_rows_sum_to_one_minus_learnt_lambda():
    block = DifferentialAttention2d(8, heads=2, layer_index=2)
    lam = block.current_lambda().item()
    lq1, lk1, lq2, lk2 = (
        p.detach() for p in (block.lambda_q1, block.lambda_k1, block.lambda_q2, block.lambda_k2)
    )
    manual = math.exp(lq1 @ lk1) - math.exp(lq2 @ lk2) + lambda_init_schedule(2)
    assert lam == pytest.approx(manual, rel=1e-5)
    _, maps = block(torch.randn(2, 8, 6, 6), return_attention=True)
    torch.testing.assert_close(maps["attention"].sum(-1), torch.full((2, 2, 36), 1 - lam))
    for name in ("positive", "negative"):
        assert (maps[name] >= 0).all()
        torch.testing.assert_close(maps[name].sum(-1), torch.ones(2, 2, 36))


def test_lambda_vectors_start_small_and_random():
    block = DifferentialAttention2d(512, heads=1)
    assert block.lambda_q1.shape == (256,)
    assert 0.07 < block.lambda_q1.std().item() < 0.13
    assert not torch.equal(block.lambda_q1, block.lambda_k1)


def test_gradients_reach_the_lambda_vectors():
    block = _switch_on(DifferentialAttention2d(8, heads=2))
    block(torch.randn(2, 8, 5, 5)).square().sum().backward()
    for p in (block.lambda_q1, block.lambda_k1, block.lambda_q2, block.lambda_k2):
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", TOKEN_BLOCKS)
def test_gamma_gets_a_gradient_at_initialisation(kind):
    block = create_attention(kind, 8, heads=2)
    block(torch.randn(2, 8, 5, 5)).square().sum().backward()
    assert block.gamma.grad.abs() > 0


def test_default_heads_divide_awkward_widths():
    for channels in (8, 96, 512, 960):
        block = DifferentialAttention2d(channels, pos_encoding=False)
        assert channels % (2 * block.heads) == 0
    assert DifferentialAttention2d(512).heads == 4


def test_heads_that_do_not_split_the_width_are_a_config_error():
    with pytest.raises(ConfigError, match="dim=12"):
        DifferentialAttention2d(12, heads=4)
    with pytest.raises(ConfigError, match="dim=10"):
        SelfAttention2d(10, heads=3)


# --- shapes, identity, maps -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
@pytest.mark.parametrize("size", [(5, 5), (6, 6), (7, 7), (8, 8), (9, 9), (10, 10), (5, 9)])
@pytest.mark.parametrize("channels,batch", [(8, 1), (16, 2), (32, 3)])
def test_output_shape_equals_input_shape(kind, size, channels, batch):
    block = create_attention(kind, channels)
    if hasattr(block, "gamma"):
        _switch_on(block)
    x = torch.randn(batch, channels, *size)
    y = block(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("kind", TOKEN_BLOCKS)
def test_token_blocks_are_exact_identity_at_initialisation(kind):
    block = create_attention(kind, 16, heads=2)
    x = torch.randn(2, 16, 7, 7) * 5
    assert torch.equal(block(x), x)
    assert not torch.equal(_switch_on(block)(x), x)


@pytest.mark.parametrize("kind", TOKEN_BLOCKS)
def test_maps_for_explanation_are_batch_heads_positions_positions(kind):
    block = create_attention(kind, 16, heads=2)
    y, maps = block(torch.randn(3, 16, 5, 7), return_attention=True)
    assert y.shape == (3, 16, 5, 7)
    for m in maps.values():
        assert m.shape == (3, 2, 35, 35)
    torch.testing.assert_close(block.last_attention, maps["attention"])
    assert not block.last_attention.requires_grad


# --- sparse ---------------------------------------------------------------------------------


def test_sparse_attention_keeps_only_weights_above_the_row_mean():
    q, k, _, _, v = _qkv(n=16)
    out, maps = sparse_attention(q, k, v)
    dense = torch.softmax(q @ k.transpose(-2, -1) / 2.0, -1)
    torch.testing.assert_close(maps["dense"], dense)
    kept = maps["attention"] > 0
    assert torch.equal(kept, dense > 1 / 16)
    assert kept.sum(-1).min() >= 1 and (~kept).sum() > 0
    expected = dense * kept / (dense * kept).sum(-1, keepdim=True)
    torch.testing.assert_close(maps["attention"], expected)
    torch.testing.assert_close(maps["attention"].sum(-1), torch.ones(2, 3, 16))
    torch.testing.assert_close(out, expected @ v)


def test_sparse_attention_keeps_a_uniform_row_whole():
    q = torch.zeros(1, 1, 4, 2)
    _, maps = sparse_attention(q, torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 3))
    torch.testing.assert_close(maps["attention"], torch.full((1, 1, 4, 4), 0.25))


def test_sparse_block_maps_keep_only_entries_above_one_over_n():
    _, maps = SparseAttention2d(8, heads=2)(torch.randn(2, 8, 6, 6), return_attention=True)
    assert torch.equal(maps["attention"] > 0, maps["dense"] > 1 / 36)


# --- SE and CBAM --------------------------------------------------------------------------------


def _identity_linear(layer: nn.Linear) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.eye(*layer.weight.shape))
        layer.bias.zero_()


def test_se_by_hand():
    se = SqueezeExcitation(2)
    assert se.fc1.out_features == 2  # never wider than the input
    _identity_linear(se.fc1)
    _identity_linear(se.fc2)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 2.0]], [[-1.0, -3.0], [1.0, -1.0]]]])  # means 2, -1
    expected = torch.stack([x[0, 0] / (1 + math.exp(-2.0)), x[0, 1] * 0.5])[None]
    torch.testing.assert_close(se(x), expected)


def test_se_is_gap_mlp_sigmoid_scale():
    se = SqueezeExcitation(32, reduction=4)
    assert se.fc1.out_features == 8
    x = torch.randn(2, 32, 5, 5)
    s = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean((2, 3))))))
    torch.testing.assert_close(se(x), x * s[:, :, None, None])


def test_cbam_by_hand():
    cbam = CBAM(2, spatial_kernel=3)
    _identity_linear(cbam.mlp[0])
    _identity_linear(cbam.mlp[2])
    with torch.no_grad():
        cbam.spatial.weight.zero_()
        cbam.spatial.weight[0, 0, 1, 1] = 1.0  # channel mean
        cbam.spatial.weight[0, 1, 1, 1] = 0.5  # channel max
    x = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]], [[-1.0, -1.0], [-1.0, -1.0]]]])
    # channel gates: σ(avg + max) after ReLU → σ(4 + 7) and σ(0 + 0)
    xc = torch.stack([x[0, 0] * torch.sigmoid(torch.tensor(11.0)), x[0, 1] * 0.5])
    mean, peak = xc.mean(0), xc.amax(0)
    expected = xc * torch.sigmoid(mean + 0.5 * peak)
    torch.testing.assert_close(cbam(x), expected[None])


def test_cbam_is_channel_then_spatial_attention():
    cbam = CBAM(16, reduction=2)
    x = torch.randn(2, 16, 6, 6)
    mc = torch.sigmoid(cbam.mlp(x.mean((2, 3))) + cbam.mlp(x.amax((2, 3))))
    xc = x * mc[:, :, None, None]
    pooled = torch.cat([xc.mean(1, keepdim=True), xc.amax(1, keepdim=True)], 1)
    torch.testing.assert_close(
        cbam(x), xc * torch.sigmoid(F.conv2d(pooled, cbam.spatial.weight, padding=3))
    )


def test_cbam_even_kernel_is_a_config_error():
    with pytest.raises(ConfigError, match="spatial_kernel=4"):
        CBAM(8, spatial_kernel=4)


# --- factory ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,cls",
    [
        ("none", nn.Identity),
        ("se", SqueezeExcitation),
        ("cbam", CBAM),
        ("self", SelfAttention2d),
        ("diff", DifferentialAttention2d),
        ("sparse", SparseAttention2d),
    ],
)
def test_create_attention_returns_the_named_block(kind, cls):
    assert type(create_attention(kind, 16)) is cls


def test_attention_kinds_lists_every_kind():
    assert ATTENTION_KINDS == ("none", "se", "cbam", "self", "diff", "sparse")


def test_unknown_kind_is_a_config_error_naming_it_and_the_choices():
    with pytest.raises(ConfigError) as info:
        create_attention("transformer", 16)
    message = str(info.value)
    assert "'transformer'" in message
    assert all(kind in message for kind in ATTENTION_KINDS)


def test_option_a_block_does_not_take_is_a_config_error():
    with pytest.raises(ConfigError, match="heads"):
        create_attention("se", 16, heads=2)


def test_create_attention_passes_options_through():
    block = create_attention("diff", 16, heads=2, layer_index=2)
    assert block.heads == 2
    assert block.lambda_init == pytest.approx(lambda_init_schedule(2))


# --- attention pooling -----------------------------------------------------------------------


def _spotlight_pool(kind: str, channels: int = 4) -> AttentionPool2d:
    """A pool whose keys are the normalised features and whose (first) query looks for
    channel 0: positions where channel 0 stands out get the weight."""
    pool = AttentionPool2d(channels, kind=kind, heads=1, pos_encoding=False)
    with torch.no_grad():
        pool.k.weight.zero_()
        parts = pool.query.shape[1]
        for part in range(parts):
            block = slice(part * pool.head_dim, (part + 1) * pool.head_dim)
            pool.k.weight[block, :][: pool.head_dim, : pool.head_dim] = torch.eye(pool.head_dim)
        pool.query.zero_()
        pool.query[0, 0, 0] = 20.0  # q₁ (or q) looks for channel 0; q₂ stays uniform
    return pool


def _one_bright_region(channels: int = 4) -> torch.Tensor:
    x = torch.zeros(1, channels, 6, 6)
    x[0, 1:] = 1.0  # background: the other channels (LayerNorm ignores a common scale)
    x[0, 0, 1:3, 3:5] = 5.0  # the evidence: channel 0 in a 2 × 2 region
    return x + 0.01 * torch.randn_like(x)


@pytest.mark.parametrize("kind", ["self", "diff", "sparse"])
def test_attention_pool_weights_peak_where_the_evidence_is(kind):
    pool = _spotlight_pool(kind)
    x = _one_bright_region()
    pooled = pool(x)
    weights = pool.last_attention[0, 0, 0].reshape(6, 6)
    inside = torch.zeros(6, 6, dtype=torch.bool)
    inside[1:3, 3:5] = True
    assert weights[inside].min() > weights[~inside].max()
    assert weights[inside].sum() > 0.5  # most of the mass, not merely the largest values
    # the pooled vector is the weighted sum of the features themselves
    expected = (x.flatten(2) * weights.flatten()).sum(-1)
    torch.testing.assert_close(pooled, expected)


@pytest.mark.parametrize("kind", ["self", "diff", "sparse"])
def test_attention_pool_with_zero_queries_is_average_pooling(kind):
    pool = AttentionPool2d(16, kind=kind, heads=2)
    x = torch.randn(3, 16, 5, 7)
    scale = 1.0 - pool.current_lambda().item() if kind == "diff" else 1.0
    torch.testing.assert_close(pool(x), x.mean((2, 3)) * scale)


def test_differential_pool_subtracts_lambda_times_the_second_softmax():
    pool = AttentionPool2d(8, kind="diff", heads=1)
    with torch.no_grad():
        pool.query.normal_()
    x = torch.randn(2, 8, 3, 3)
    t = pool.norm((x + pool.pos(x)).flatten(2).transpose(1, 2))
    k = pool.k(t).unflatten(-1, (2, 4))  # (B, N, 2, d)
    a1 = (k[..., 0, :] @ pool.query[0, 0] / 2).softmax(-1)
    a2 = (k[..., 1, :] @ pool.query[0, 1] / 2).softmax(-1)
    lam = pool.current_lambda()
    torch.testing.assert_close(pool.weights(x)[:, 0], a1 - lam * a2)
    torch.testing.assert_close(pool.weights(x).sum(-1), (1 - lam).expand(2, 1))


def test_attention_pool_gets_gradients_at_initialisation():
    pool = AttentionPool2d(16, kind="diff", heads=2)
    x = torch.randn(2, 16, 4, 4)
    (pool(x) * torch.randn(2, 16)).sum().backward()
    assert pool.query.grad.abs().sum() > 0


def test_attention_pool_unknown_kind_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match=r"'cbam'.*self, diff, sparse"):
        AttentionPool2d(16, kind="cbam")
