"""Pure-PyTorch reference of every elastic op: the oracle of the tests and the baseline of the benchmarks.

Each function reads the active leading block of the super weights through slicing views
(DESIGN.md section 2) and is written as plainly as possible, so that it is obviously right.
Weights are cast to the activation dtype, which copies only the active slice.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .group_sizes import GroupSizes


def _active(weight: Tensor | None, *sizes: int, dtype: torch.dtype) -> Tensor | None:
    if weight is None:
        return None
    view = weight[tuple(slice(0, s) for s in sizes)]
    return view if view.dtype == dtype else view.to(dtype)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int, activation: str | None = None) -> Tensor:
    """``act(x @ weight[:out, :in].T + bias[:out])`` with ``in = x.shape[-1]``; activation is None or "gelu"."""
    y = F.linear(x, _active(weight, out_features, x.shape[-1], dtype=x.dtype),
                 _active(bias, out_features, dtype=x.dtype))
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


# --- K subnets in one call (DESIGN.md section 3, batched mode) ------------------------------------------
# Activations ``[K, ..., E]``: subnet k's channels past its own size are padding, kept exactly zero, so that
# a matmul over the group's full width gives each subnet the result over its own channels. The supernet's
# weights are shared, so a grouped linear is one GEMM against the widest subnet's slice, then the mask.

def _zero_padding(y: Tensor, sizes: GroupSizes) -> Tensor:
    return y if sizes.uniform else y * sizes.mask(y.dtype, y.dim())


def grouped_linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_sizes: GroupSizes,
                   activation: str | None = None) -> Tensor:
    """``act(x[k] @ weight[:out_k, :in].T + bias[:out_k])`` for each subnet k, zero past ``out_k``.

    x: ``[K, ..., in]`` with each subnet's input padding zero; out: ``[K, ..., out_sizes.width]``.
    """
    width = out_sizes.width
    y = F.linear(x, _active(weight, width, x.shape[-1], dtype=x.dtype), _active(bias, width, dtype=x.dtype))
    if activation == "gelu":
        y = F.gelu(y)
    return _zero_padding(y, out_sizes)


def grouped_layer_norm(x: Tensor, sizes: GroupSizes, weight: Tensor | None, bias: Tensor | None,
                       eps: float = 1e-5) -> Tensor:
    """LayerNorm of each subnet over ITS active channels ``:e_k`` (``weight[:e_k]``, ``bias[:e_k]``); padding stays
    zero.

    x: ``[K, ..., sizes.width]`` with zero padding.
    """
    if sizes.uniform:
        return F.layer_norm(x, (sizes.width,), _active(weight, sizes.width, dtype=x.dtype),
                            _active(bias, sizes.width, dtype=x.dtype), eps)
    # Statistics in float32 (as F.layer_norm keeps them) also for half-precision activations.
    stats = x.float()
    mask = sizes.mask(torch.float32, x.dim())
    count = sizes.table.to(torch.float32).view(mask.shape[:-1] + (1,))
    mean = stats.sum(-1, keepdim=True) / count
    centred = (stats - mean) * mask
    rstd = torch.rsqrt((centred * centred).sum(-1, keepdim=True) / count + eps)
    y = centred * rstd
    if weight is not None:
        y = y * _active(weight, sizes.width, dtype=torch.float32)
    if bias is not None:
        y = y + _active(bias, sizes.width, dtype=torch.float32) * mask
    return y.to(x.dtype)


def grouped_mlp(x: Tensor, sizes: GroupSizes, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
                fc2_bias: Tensor | None, hidden_sizes: GroupSizes) -> Tensor:
    """``fc2(gelu(fc1(x)))`` of each subnet with ``W1[:hidden_k, :e_k]``, ``W2[:e_k, :hidden_k]``."""
    hidden = grouped_linear(x, fc1_weight, fc1_bias, hidden_sizes, activation="gelu")
    return grouped_linear(hidden, fc2_weight, fc2_bias, sizes)


def grouped_attention(x: Tensor, sizes: GroupSizes, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor,
                      proj_bias: Tensor | None, head_counts: GroupSizes, head_dim: int = 64) -> Tensor:
    """Self-attention of each subnet with its ``h_k`` heads (block qkv layout), then ``W_o[:e_k, :h_k*Dh]``.

    x: ``[K, B, N, sizes.width]`` with zero padding. Heads past ``h_k`` are computed on the group's
    widest head count and zeroed before the output projection, so they contribute nothing.
    """
    groups, batch, tokens, embed = x.shape
    heads = head_counts.width
    max_width = qkv_weight.shape[0] // 3
    # The active rows of q, k and v are the leading rows of three blocks: gather them into one small
    # weight so that all three come out of one GEMM.
    weight = _active(qkv_weight.view(3, max_width, qkv_weight.shape[1]), 3, heads * head_dim, embed, dtype=x.dtype)
    bias = None if qkv_bias is None else _active(qkv_bias.view(3, max_width), 3, heads * head_dim, dtype=x.dtype)
    qkv = F.linear(x, weight.reshape(3 * heads * head_dim, embed), None if bias is None else bias.reshape(-1))
    q, k, v = qkv.view(groups * batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    context = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(head_dim))
    context = context.transpose(1, 2).reshape(groups, batch, tokens, heads * head_dim)
    context = _zero_padding(context, head_counts.scaled(head_dim))
    return grouped_linear(context, proj_weight, proj_bias, sizes)
