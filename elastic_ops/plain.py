"""Plain PyTorch ViT modules with timm naming: what the elastic layers ``extract()`` and what a subnet exports to.

This file imports only torch, so that it can be copied into a project that runs an exported subnet
without elastic_ops. The modules are TorchScript-able. Attention uses timm's qkv layout ``[3 * h * Dh, e]``
(q, k, v blocks), which is the block layout of the elastic ops.
Optional 2D relative position (AutoFormer's ``RelativePosition2D``): :class:`RelativePosition2D`.
The hybrid (conv / attention / MLP) modules are in ``plain_hybrid.py``, which imports only torch and this file.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {"gelu": nn.GELU, "hardswish": nn.Hardswish, "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU}


def make_activation(name: str) -> nn.Module:
    """The activation module called ``name`` (a key of ``ACTIVATIONS``; GELU is the exact, erf one)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``, as timm's Mlp; ``activation`` names the act (default exact GELU)."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True, activation: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RelativePosition2D(nn.Module):
    """AutoFormer's 2D relative position for keys and values, shared by the heads.

    Patch tokens form a square grid in row-major order after the class token (``tokens = 1 + side * side``).
    Each of ``k_rows, k_cols, v_rows, v_cols: [2 * max_relative_position + 2, head_dim]`` is indexed by the
    row (column) distance ``j - i`` clipped to ``+-max_relative_position`` and shifted to ``1..2 * max + 1``;
    index 0 is for every pair involving the class token. The embedding of a pair is its row entry plus its
    column entry (``[tokens, tokens, head_dim]``), for keys and for values (:func:`relative_attention`).
    Tables are indexed by distance, so one set serves every grid size (patch size).
    """

    def __init__(self, head_dim: int, max_relative_position: int = 14):
        super().__init__()
        if max_relative_position < 1:
            raise ValueError("RelativePosition2D: max_relative_position must be >= 1, got "
                             + str(max_relative_position))
        self.max_relative_position = max_relative_position
        size = 2 * max_relative_position + 2
        self.k_rows = nn.Parameter(torch.empty(size, head_dim))
        self.k_cols = nn.Parameter(torch.empty(size, head_dim))
        self.v_rows = nn.Parameter(torch.empty(size, head_dim))
        self.v_cols = nn.Parameter(torch.empty(size, head_dim))
        for table in (self.k_rows, self.k_cols, self.v_rows, self.v_cols):
            nn.init.trunc_normal_(table, std=0.02)

    def indices(self, tokens: int, device: torch.device) -> Tuple[Tensor, Tensor]:
        """Row and column table indices ``[tokens, tokens]`` (0 on the class token's row and column)."""
        side = int((tokens - 1) ** 0.5 + 0.5)
        if tokens < 2 or side * side != tokens - 1:
            raise ValueError("RelativePosition2D: expected 1 class token plus a square grid of patch tokens, got "
                             + str(tokens) + " tokens")
        patches = torch.arange(side * side, device=device)
        row, col = patches // side, patches % side
        limit = self.max_relative_position
        rows = (row[None, :] - row[:, None]).clamp(-limit, limit) + limit + 1
        cols = (col[None, :] - col[:, None]).clamp(-limit, limit) + limit + 1
        return F.pad(rows, (1, 0, 1, 0)), F.pad(cols, (1, 0, 1, 0))

    def forward(self, tokens: int) -> Tuple[Tensor, Tensor]:
        """Key and value embeddings ``[tokens, tokens, head_dim]`` of every (query, key) pair."""
        rows, cols = self.indices(tokens, self.k_rows.device)
        return self.k_rows[rows] + self.k_cols[cols], self.v_rows[rows] + self.v_cols[cols]


def relative_attention(q: Tensor, k: Tensor, v: Tensor, rel_k: Tensor, rel_v: Tensor, scale: float) -> Tensor:
    """Attention of ``q, k, v: [B, h, N, Dh]`` with relative position embeddings ``rel_k, rel_v: [N, N, Dh]``:
    ``softmax(scale * (q k^T + q . rel_k)) v + sum_j attn_ij rel_v_ij``, as AutoFormer; returns ``[B, h, N, Dh]``."""
    logits = (q @ k.transpose(-2, -1) + torch.einsum("bhid,ijd->bhij", q, rel_k)) * scale
    attn = logits.softmax(dim=-1)
    return attn @ v + torch.einsum("bhij,ijd->bhid", attn, rel_v)


class Attention(nn.Module):
    """Multi-head self-attention of ``x: [B, N, dim]`` with ``num_heads`` heads of ``head_dim`` channels;
    ``relative_position > 0`` adds :class:`RelativePosition2D` with that maximum distance (``rel_pos``)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool = True, proj_bias: bool = True,
                 relative_position: int = 0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=proj_bias)
        self.rel_pos: Optional[RelativePosition2D] = (RelativePosition2D(head_dim, relative_position)
                                                      if relative_position else None)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        rel_pos = self.rel_pos
        if rel_pos is not None:
            rel_k, rel_v = rel_pos(tokens)
            context = relative_attention(q, k, v, rel_k, rel_v, self.scale)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            context = attn.softmax(dim=-1) @ v
        return self.proj(context.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim))


class LayerScale(nn.Module):
    """timm's LayerScale: ``x * gamma``, one learned factor per channel (CaiT)."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``; the layer scales
    ``ls1, ls2`` are :class:`LayerScale` with ``layer_scale`` as initial value, or identities if it is None."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, hidden_features: int, eps: float = 1e-6,
                 qkv_bias: bool = True, relative_position: int = 0, layer_scale: Optional[float] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, head_dim, qkv_bias=qkv_bias, relative_position=relative_position)
        self.ls1 = nn.Identity() if layer_scale is None else LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden_features)
        self.ls2 = nn.Identity() if layer_scale is None else LayerScale(dim, layer_scale)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches of ``[B, C, H, W]`` images to tokens ``[B, N, embed_dim]``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def dense_logits(patch_outputs: Tensor, patch_size: int, num_classes: int) -> Tensor:
    """Per-pixel logits ``[..., num_classes, H, W]`` from a dense head's outputs ``[..., N, num_classes * p * p]`` on a
    square grid of ``N`` patches: each patch token predicts the classes of its own ``p x p`` pixels."""
    lead = list(patch_outputs.shape[:-2])
    tokens, width = patch_outputs.shape[-2], patch_outputs.shape[-1]
    grid = int(tokens ** 0.5 + 0.5)
    if grid * grid != tokens or width != num_classes * patch_size * patch_size:
        raise ValueError("dense_logits: need outputs [..., a square number of patches, num_classes * patch_size^2]")
    x = patch_outputs.reshape(-1, grid, grid, num_classes, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(lead + [num_classes, grid * patch_size, grid * patch_size])


class VisionTransformer(nn.Module):
    """A ViT with a class token and a learned position embedding; blocks may differ in heads and MLP width, and in
    head dim where ``head_dim`` lists one per block (ViTAS's attention widths; an int: every block's).
    ``relative_position > 0`` adds AutoFormer's 2D relative position to every block's attention as well.
    ``global_pool``: after the final norm the classifier reads the class token (``"token"``) or the mean of the patch
    tokens (``"avg"``, AutoFormer's ``--gp``); ``"dense"`` (segmentation): the head maps every patch token to the
    logits of its ``p x p`` pixels (``num_classes * p * p`` outputs), and the output is ``[B, num_classes, H, W]``.
    ``layer_scale``: the blocks' :class:`LayerScale` initial value (None: no layer scale, as in most of timm's ViTs).
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, num_classes: int, embed_dim: int,
                 num_heads: List[int], hidden_features: List[int], head_dim: Union[int, List[int]], eps: float = 1e-6,
                 qkv_bias: bool = True, relative_position: int = 0, global_pool: str = "token",
                 layer_scale: Optional[float] = None):
        super().__init__()
        if len(num_heads) != len(hidden_features):
            raise ValueError(f"VisionTransformer: {len(num_heads)} num_heads but {len(hidden_features)} "
                             "hidden_features")
        head_dims = [head_dim] * len(num_heads) if isinstance(head_dim, int) else list(head_dim)
        if len(head_dims) != len(num_heads):
            raise ValueError(f"VisionTransformer: {len(num_heads)} num_heads but {len(head_dims)} head dims")
        if img_size % patch_size:
            raise ValueError(f"VisionTransformer: img_size {img_size} is not a multiple of patch_size {patch_size}")
        if global_pool not in ("token", "avg", "dense"):
            raise ValueError(f"VisionTransformer: global_pool must be 'token', 'avg' or 'dense', got {global_pool!r}")
        self.img_size = img_size
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.head_dim = head_dim
        self.relative_position = relative_position
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2 + 1, embed_dim))
        self.blocks = nn.ModuleList([
            Block(embed_dim, heads, dim, hidden, eps=eps, qkv_bias=qkv_bias, relative_position=relative_position,
                  layer_scale=layer_scale)
            for heads, dim, hidden in zip(num_heads, head_dims, hidden_features)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.head = nn.Linear(embed_dim, num_classes * (patch_size * patch_size if global_pool == "dense" else 1))

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.global_pool == "dense":
            return dense_logits(self.head(x[:, 1:]), self.patch_embed.proj.kernel_size[0], self.num_classes)
        return self.head(x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(dim=1))


__all__ = ["ACTIVATIONS", "Attention", "Block", "LayerScale", "Mlp", "PatchEmbed", "RelativePosition2D",
           "VisionTransformer", "dense_logits", "make_activation", "relative_attention"]
