"""DynamicTemporalAttention: shapes, masking, gradients, window modes, errors."""

from __future__ import annotations

import re

import pytest
import torch

from kdc_kernels.nn import DynamicTemporalAttention


@pytest.mark.parametrize("window", ["adaptive", "fixed", "none"])
@pytest.mark.parametrize("rel_bias", [True, False])
def test_shapes_and_gradients(window, rel_bias):
    layer = DynamicTemporalAttention(32, 4, max_rel_dist=5, window=window, rel_bias=rel_bias)
    x = torch.randn(3, 11, 32, requires_grad=True)
    lengths = torch.tensor([11, 4, 1])
    y = layer(x, lengths)
    assert y.shape == x.shape
    (y * torch.randn_like(y)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name in ("rel_bias", "sigma_logit", "sigma_proj.weight"):
            assert p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert (layer.rel_bias is not None) == rel_bias


def test_bias_table_is_zero_initialised():
    layer = DynamicTemporalAttention(16, 2, max_rel_dist=3)
    assert layer.rel_bias.shape == (2, 7) and torch.all(layer.rel_bias == 0)


@pytest.mark.parametrize("cutoff", [None, 2.0])
def test_padded_positions_never_influence_valid_outputs(cutoff):
    layer = DynamicTemporalAttention(24, 3, max_rel_dist=4, cutoff=cutoff)
    layer.rel_bias.data.normal_()
    x = torch.randn(2, 9, 24)
    lengths = torch.tensor([9, 5])
    y = layer(x, lengths)
    x2 = x.clone()
    x2[1, 5:] = torch.randn(4, 24) * 100
    y2 = layer(x2, lengths)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    assert torch.all(y[1, 5:] == 0)
    # and a valid sequence gives the same result alone as padded in a batch
    alone = layer(x[1:, :5], torch.tensor([5]))
    torch.testing.assert_close(alone[0], y[1, :5], atol=1e-5, rtol=1e-5)


def test_window_widths_follow_the_spec():
    layer = DynamicTemporalAttention(8, 2, window="adaptive", sigma_min=1.0)
    x = torch.randn(2, 6, 8)
    lengths = torch.tensor([6, 3])
    sigma = layer.window_widths(x, lengths)
    gate = torch.sigmoid(layer.sigma_proj(x)).transpose(1, 2)
    want = 1.0 + (lengths.float()[:, None, None] - 1.0) * gate
    torch.testing.assert_close(sigma, want)
    fixed = DynamicTemporalAttention(8, 2, window="fixed")
    s = fixed.window_widths(x, None)
    torch.testing.assert_close(s, torch.full((2, 2, 6), 1.0 + 5.0 * 0.5))
    assert DynamicTemporalAttention(8, 2, window="none").window_widths(x, None) is None


def test_plain_attention_without_window_or_bias_matches_manual():
    torch.manual_seed(1)
    layer = DynamicTemporalAttention(8, 2, window="none", rel_bias=False).eval()
    x = torch.randn(1, 5, 8)
    q, k, v = layer.qkv(x).view(1, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
    want = layer.norm(x + layer.out_proj(att.transpose(1, 2).reshape(1, 5, 8)))
    torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-5)


def test_extra_repr_lists_the_configuration():
    text = repr(DynamicTemporalAttention(16, 4, window="fixed", cutoff=3.0, dropout=0.1))
    for part in ("dim=16", "num_heads=4", "max_rel_dist=32", "window='fixed'", "cutoff=3.0", "dropout=0.1"):
        assert part in text


@pytest.mark.parametrize("kwargs,message", [
    (dict(dim=10, num_heads=4), "dim must be divisible by num_heads"),
    (dict(dim=0, num_heads=1), "dim must be a positive int"),
    (dict(dim=8, num_heads=2, window="gauss"), "window must be one of"),
    (dict(dim=8, num_heads=2, max_rel_dist=-1), "max_rel_dist must be an int >= 0"),
    (dict(dim=8, num_heads=2, sigma_min=0.0), "sigma_min must be a finite number > 0"),
    (dict(dim=8, num_heads=2, window="none", cutoff=2.0), "cutoff needs a window"),
    (dict(dim=8, num_heads=2, dropout=1.5), "dropout must lie in [0, 1)"),
])
def test_invalid_construction(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DynamicTemporalAttention(**kwargs)


def test_invalid_forward_input():
    layer = DynamicTemporalAttention(8, 2)
    with pytest.raises(ValueError, match=r"x must be a tensor \[B, L, dim\] with dim = 8"):
        layer(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="lengths must lie in"):
        layer(torch.randn(2, 5, 8), torch.tensor([6, 1]))
