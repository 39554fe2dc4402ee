"""Pure-PyTorch reference of every elastic op: the oracle of the tests and the baseline of the benchmarks.

Each function reads the active leading block of the super weights through slicing views
(DESIGN.md section 2) and is written as plainly as possible, so that it is obviously right.
Weights are cast to the activation dtype, which copies only the active slice.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _active(weight: Tensor | None, *sizes: int, dtype: torch.dtype) -> Tensor | None:
    if weight is None:
        return None
    view = weight[tuple(slice(0, s) for s in sizes)]
    return view if view.dtype == dtype else view.to(dtype)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int, activation: str | None = None) -> Tensor:
    """``act(x @ weight[:out, :in].T + bias[:out])`` with ``in = x.shape[-1]``; activation is None or "gelu"."""
    y = F.linear(x, _active(weight, out_features, x.shape[-1], dtype=x.dtype), _active(bias, out_features, dtype=x.dtype))
    return F.gelu(y) if activation == "gelu" else y


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the ``d = x.shape[-1]`` active channels with ``weight[:d]`` and ``bias[:d]``."""
    d = x.shape[-1]
    return F.layer_norm(x, (d,), _active(weight, d, dtype=x.dtype), _active(bias, d, dtype=x.dtype), eps)


def mlp(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    hidden_features: int,
) -> Tensor:
    """``fc2(gelu(fc1(x)))`` with ``W1[:hidden, :e]`` and ``W2[:e, :hidden]``, ``e = x.shape[-1]``."""
    e = x.shape[-1]
    h = linear(x, fc1_weight, fc1_bias, hidden_features, activation="gelu")
    return linear(h, fc2_weight, fc2_bias, e)


def qkv_blocks(qkv_weight: Tensor, head_dim: int) -> int:
    """Number of heads of the super weight in block layout ``[3 * H_max * head_dim, E_max]``."""
    return qkv_weight.shape[0] // (3 * head_dim)


def attention(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    num_heads: int,
    head_dim: int = 64,
) -> Tensor:
    """Multi-head self-attention with ``num_heads`` active heads, block qkv layout, then the output projection.

    x: ``[B, N, e]``. Block j (q, k, v) of the qkv weight holds rows ``j*H_max*Dh : (j+1)*H_max*Dh``;
    its active rows are the first ``num_heads * head_dim``. Output projection ``W_o[:e, :h*Dh]``.
    """
    batch, tokens, e = x.shape
    max_width = qkv_blocks(qkv_weight, head_dim) * head_dim
    width = num_heads * head_dim
    weight_blocks = qkv_weight.view(3, max_width, qkv_weight.shape[1])
    bias_blocks = None if qkv_bias is None else qkv_bias.view(3, max_width)
    q, k, v = (
        linear(x, weight_blocks[j], None if bias_blocks is None else bias_blocks[j], width)
        .view(batch, tokens, num_heads, head_dim)
        .transpose(1, 2)
        for j in range(3)
    )
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
    context = scores.softmax(dim=-1) @ v
    context = context.transpose(1, 2).reshape(batch, tokens, width)
    return linear(context, proj_weight, proj_bias, e)
