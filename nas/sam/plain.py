"""A plain SAM image encoder subnet: what a SAM encoder supernet's subnet extracts and exports to.

This file imports only torch and ``elastic_ops.plain`` (which imports only torch), so that an exported subnet runs
without the elastic ops. The computation is segment-anything's ``ImageEncoderViT`` (tokens kept flat, ``[B, g * g,
E]``): windowed attention zero-padded to a multiple of the window as SAM pads, the decomposed relative position over
the unscaled q, no final norm but the neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d); blocks may differ in heads
and MLP width. With ``num_classes > 0`` a dense head maps each neck position to the logits of its ``p x p`` pixels.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elastic_ops.plain import Mlp, PatchEmbed, dense_logits


class LayerNorm2d(nn.Module):
    """SAM's LayerNorm over the channels of ``[B, C, H, W]``."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels)), eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class WindowAttention(nn.Module):
    """SAM's attention on a ``grid x grid`` token grid: within ``window_size`` windows (0: over the whole grid) with
    the decomposed relative position (tables ``[2 s - 1, head_dim]``, ``s`` the window's or grid's side)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, grid: int, window_size: int):
        super().__init__()
        self.num_heads, self.head_dim, self.grid = num_heads, head_dim, grid
        self.window_size = window_size if window_size > 0 else grid
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * self.window_size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * self.window_size - 1, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        grid, w, heads, head_dim = self.grid, self.window_size, self.num_heads, self.head_dim
        pad = (w - grid % w) % w
        side = grid + pad
        n = side // w
        windows = F.pad(x.reshape(batch, grid, grid, dim), (0, 0, 0, pad, 0, pad))
        windows = windows.reshape(batch, n, w, n, w, dim).transpose(2, 3).reshape(batch * n * n, w * w, dim)
        q, k, v = self.qkv(windows).reshape(-1, w * w, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * head_dim ** -0.5) @ k.transpose(-2, -1) + self.decomposed_rel_pos(q)
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(-1, w * w, heads * head_dim)
        out = self.proj(out).reshape(batch, n, n, w, w, dim).transpose(2, 3).reshape(batch, side, side, dim)
        return out[:, :grid, :grid].reshape(batch, tokens, dim)

    def decomposed_rel_pos(self, q: Tensor) -> Tensor:
        """``q . rel_pos_h[i_q - i_k + s - 1] + q . rel_pos_w[j_q - j_k + s - 1]`` for ``q [b, heads, s * s, Dh]``."""
        s = self.window_size
        index = torch.arange(s, device=q.device)
        offsets = index[:, None] - index[None, :] + s - 1
        grid_q = q.reshape(q.shape[0], q.shape[1], s, s, q.shape[3])
        rows = torch.einsum("bnhwc,hkc->bnhwk", grid_q, self.rel_pos_h[offsets])
        cols = torch.einsum("bnhwc,wkc->bnhwk", grid_q, self.rel_pos_w[offsets])
        return (rows.unsqueeze(-1) + cols.unsqueeze(-2)).reshape(q.shape[0], q.shape[1], s * s, s * s)


class SamBlock(nn.Module):
    """SAM's pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (``mlp.fc1``/``fc2``: SAM's
    ``lin1``/``lin2``)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, hidden_features: int, grid: int, window_size: int,
                 eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, num_heads, head_dim, grid, window_size)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden_features)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SamNeck(nn.Module):
    """SAM's neck: 1x1 conv (no bias), LayerNorm2d, 3x3 conv (no bias, padding 1), LayerNorm2d."""

    def __init__(self, embed_dim: int, out_chans: int):
        super().__init__()
        self.conv1 = nn.Conv2d(embed_dim, out_chans, 1, bias=False)
        self.norm1 = LayerNorm2d(out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False)
        self.norm2 = LayerNorm2d(out_chans)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(self.conv2(self.norm1(self.conv1(x))))


class SamEncoder(nn.Module):
    """SAM's image encoder with per-block heads, MLP widths and windows (``window_sizes[i]`` 0: global attention);
    returns the neck's ``[B, out_chans, g, g]``, or with ``num_classes > 0`` per-pixel logits ``[B, num_classes, H,
    W]``."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, num_classes: int, embed_dim: int,
                 num_heads: List[int], hidden_features: List[int], window_sizes: List[int], head_dim: int,
                 out_chans: int, eps: float = 1e-6):
        super().__init__()
        if not len(num_heads) == len(hidden_features) == len(window_sizes):
            raise ValueError(f"SamEncoder: {len(num_heads)} num_heads, {len(hidden_features)} hidden_features and "
                             f"{len(window_sizes)} window_sizes")
        if img_size % patch_size:
            raise ValueError(f"SamEncoder: img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.num_classes, self.head_dim = img_size, patch_size, num_classes, head_dim
        self.eps = eps
        self.grid = img_size // patch_size
        self.window_sizes = list(window_sizes)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, embed_dim))
        self.blocks = nn.ModuleList([
            SamBlock(embed_dim, heads, head_dim, hidden, self.grid, window, eps)
            for heads, hidden, window in zip(num_heads, hidden_features, window_sizes)
        ])
        self.neck = SamNeck(embed_dim, out_chans)
        self.head = nn.Linear(out_chans, num_classes * patch_size * patch_size) if num_classes > 0 else nn.Identity()

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        features = self.neck(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.grid, self.grid))
        if self.num_classes == 0:
            return features
        return dense_logits(self.head(features.flatten(2).transpose(1, 2)), self.patch_size, self.num_classes)

    def kwargs(self) -> dict:
        """The constructor arguments that build this encoder again."""
        return {"img_size": self.img_size, "patch_size": self.patch_size,
                "in_chans": self.patch_embed.proj.in_channels, "num_classes": self.num_classes,
                "embed_dim": self.pos_embed.shape[-1], "num_heads": [b.attn.num_heads for b in self.blocks],
                "hidden_features": [b.mlp.fc1.out_features for b in self.blocks], "window_sizes": self.window_sizes,
                "head_dim": self.head_dim, "out_chans": self.neck.conv1.out_channels,
                "eps": self.eps}


__all__ = ["LayerNorm2d", "SamBlock", "SamEncoder", "SamNeck", "WindowAttention"]
