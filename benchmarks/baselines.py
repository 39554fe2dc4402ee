"""AutoFormer-style baselines: how the original supernet code runs a subnet, for the benchmarks to beat.

AutoFormer (Chen et al., ICCV 2021; microsoft/Cream, ``AutoFormer/model/module``) samples a subnet by slicing
the super weights on every call. Its qkv weight keeps q, k and v interleaved (rows ``3i, 3i+1, 3i+2``), so
``qkv_super.sample_weight`` gathers the active rows with three stride-3 slices and ``torch.cat``: a copy of the
weight slice per call, whose backward scatters into a full-size gradient. Attention is explicit
``softmax(q k^T * scale) v`` with the ``N x N`` probabilities in memory. Scale is ``head_dim ** -0.5`` here, as
in this project (AutoFormer derives it from the embed dim, which only changes the numbers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def compiled(fn):
    """``torch.compile`` of a baseline: what a user of AutoFormer-style code would try next, compiled for the one
    shape of a benchmark case (``dynamic=False``) on its first call, outside the timing. Dynamo's caches are cleared
    first: they are kept per code object, and the cases of a suite would otherwise pass its recompile limit and
    silently run the function eagerly."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


class AutoFormerAttention(nn.Module):
    """AutoFormer's ``AttentionSuper`` without relative position encodings: super weights with interleaved qkv
    rows, a subnet chosen by ``set_sample_config(num_heads)`` and the embed dim of the input."""

    def __init__(self, super_embed_dim: int, super_heads: int, head_dim: int = 64, qkv_bias: bool = True):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = nn.Linear(super_embed_dim, 3 * super_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(super_heads * head_dim, super_embed_dim)
        self.sample_heads = super_heads

    def set_sample_config(self, num_heads: int) -> None:
        self.sample_heads = num_heads

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, embed = x.shape
        width = self.sample_heads * self.head_dim
        weight = self.qkv.weight[:, :embed]
        weight = torch.cat([weight[i:3 * width:3, :] for i in range(3)], dim=0)
        bias = None if self.qkv.bias is None else self.qkv.bias[:3 * width]
        qkv = F.linear(x, weight, bias).reshape(batch, tokens, 3, self.sample_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5).softmax(dim=-1)
        context = (attn @ v).transpose(1, 2).reshape(batch, tokens, width)
        return F.linear(context, self.proj.weight[:embed, :width], self.proj.bias[:embed])
