"""The reference ops against plain PyTorch modules whose weights are the active slices."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from elastic_ops import reference


def _plain_linear(weight, bias, out_features, in_features):
    layer = nn.Linear(in_features, out_features, bias=bias is not None).double()
    with torch.no_grad():
        layer.weight.copy_(weight[:out_features, :in_features])
        if bias is not None:
            layer.bias.copy_(bias[:out_features])
    return layer


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_nn_linear_on_slices(activation, with_bias):
    weight, bias = torch.randn(13, 11, dtype=torch.float64), torch.randn(13, dtype=torch.float64)
    bias = bias if with_bias else None
    x = torch.randn(2, 5, 7, dtype=torch.float64)
    expected = _plain_linear(weight, bias, 9, 7)(x)
    expected = F.gelu(expected) if activation else expected
    torch.testing.assert_close(reference.linear(x, weight, bias, 9, activation), expected)


def test_layer_norm_matches_nn_layer_norm_on_first_channels():
    weight, bias = torch.randn(17, dtype=torch.float64), torch.randn(17, dtype=torch.float64)
    x = torch.randn(3, 4, 10, dtype=torch.float64)
    norm = nn.LayerNorm(10).double()
    with torch.no_grad():
        norm.weight.copy_(weight[:10])
        norm.bias.copy_(bias[:10])
    torch.testing.assert_close(reference.layer_norm(x, weight, bias), norm(x))
    # Statistics over the active channels only, written out by hand.
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(reference.layer_norm(x, None, None), (x - mean) / torch.sqrt(var + 1e-5))


def test_mlp_matches_two_linears_and_exact_gelu():
    w1, b1 = torch.randn(24, 10, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    w2, b2 = torch.randn(10, 24, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    fc1, fc2 = _plain_linear(w1, b1, 15, 6), _plain_linear(w2, b2, 6, 15)
    expected = fc2(0.5 * fc1(x) * (1 + torch.erf(fc1(x) / math.sqrt(2))))
    torch.testing.assert_close(reference.mlp(x, w1, b1, w2, b2, 15), expected)


def test_attention_matches_multihead_attention_on_block_layout_slices():
    head_dim, max_heads, max_embed = 8, 4, 40
    heads, embed = 3, 29
    qkv_w = torch.randn(3 * max_heads * head_dim, max_embed, dtype=torch.float64)
    qkv_b = torch.randn(3 * max_heads * head_dim, dtype=torch.float64)
    proj_w = torch.randn(max_embed, max_heads * head_dim, dtype=torch.float64)
    proj_b = torch.randn(max_embed, dtype=torch.float64)
    x = torch.randn(2, 7, embed, dtype=torch.float64)

    # Plain multi-head attention assembled from the active rows of each of the q, k, v blocks.
    width, max_width = heads * head_dim, max_heads * head_dim
    q, k, v = (
        (x @ qkv_w[j * max_width : j * max_width + width, :embed].T + qkv_b[j * max_width : j * max_width + width])
        .view(2, 7, heads, head_dim)
        .permute(0, 2, 1, 3)
        for j in range(3)
    )
    context = F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3).reshape(2, 7, width)
    expected = context @ proj_w[:embed, :width].T + proj_b[:embed]
    got = reference.attention(x, qkv_w, qkv_b, proj_w, proj_b, heads, head_dim)
    torch.testing.assert_close(got, expected)


def test_reference_gradients_pass_gradcheck():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(9, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: reference.mlp(*a, 7), (x, w1, b1, w2, b2), fast_mode=True)
    g = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reference.layer_norm, (x, g, b), fast_mode=True)
    qkv_w = torch.randn(3 * 2 * 4, 6, dtype=torch.float64, requires_grad=True)
    proj_w = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, qw, pw: reference.attention(x, qw, None, pw, None, 1, 4), (x, qkv_w, proj_w), fast_mode=True
    )


def test_gradient_outside_active_slice_is_zero():
    weight = torch.randn(8, 8, requires_grad=True)
    reference.linear(torch.randn(4, 5), weight, None, 3).sum().backward()
    assert torch.count_nonzero(weight.grad[3:]) == 0 and torch.count_nonzero(weight.grad[:, 5:]) == 0
    assert torch.count_nonzero(weight.grad[:3, :5]) == 15
