"""Plain PyTorch ViT modules with timm naming: what the elastic layers ``extract()`` and what a subnet exports to.

This file imports only torch, so that it can be copied into a project that runs an exported subnet
without elastic_ops. The modules are TorchScript-able. Attention uses timm's qkv layout ``[3 * h * Dh, e]``
(q, k, v blocks), which is the block layout of the elastic ops.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))`` with exact (erf) GELU, as timm's Mlp."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention of ``x: [B, N, dim]`` with ``num_heads`` heads of ``head_dim`` channels."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        context = attn.softmax(dim=-1) @ v
        return self.proj(context.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, hidden_features: int, eps: float = 1e-6,
                 qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, head_dim, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden_features)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches of ``[B, C, H, W]`` images to tokens ``[B, N, embed_dim]``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """A ViT with a class token and a learned position embedding; blocks may differ in heads and MLP width."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, num_classes: int, embed_dim: int,
                 num_heads: List[int], hidden_features: List[int], head_dim: int, eps: float = 1e-6,
                 qkv_bias: bool = True):
        super().__init__()
        if len(num_heads) != len(hidden_features):
            raise ValueError(f"VisionTransformer: {len(num_heads)} num_heads but {len(hidden_features)} hidden_features")
        if img_size % patch_size:
            raise ValueError(f"VisionTransformer: img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.head_dim = head_dim
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2 + 1, embed_dim))
        self.blocks = nn.ModuleList([
            Block(embed_dim, heads, head_dim, hidden, eps=eps, qkv_bias=qkv_bias)
            for heads, hidden in zip(num_heads, hidden_features)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


__all__ = ["Attention", "Block", "Mlp", "PatchEmbed", "VisionTransformer"]
