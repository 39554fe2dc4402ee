"""Plain PyTorch modules of the hybrid (conv / attention / MLP) networks: what the layers of ``elastic_ops.conv``
and ``elastic_ops.hybrid`` ``extract()``.

Like ``plain.py`` this imports only torch (and ``plain.py``), so that the two files can be copied into a project that
runs an exported subnet without elastic_ops, and the modules are TorchScript-able. Convolutions and BatchNorm are
torch's own ``nn.Conv2d`` and ``nn.BatchNorm2d``.

Activation layouts: conv layers take and return feature maps ``[B, C, H, W]``; attention and MLP blocks take and
return tokens ``[B, H * W, C]`` of a square grid in row-major order. :func:`to_tokens` and :func:`to_grid` convert
between the two.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .plain import Block, Mlp, make_activation


def to_tokens(x: Tensor) -> Tensor:
    """Feature map ``[B, C, H, W]`` to tokens ``[B, H * W, C]`` in row-major order (a view)."""
    return x.flatten(2).transpose(1, 2)


def grid_side(tokens: int) -> int:
    """The side of the square grid of ``tokens`` tokens."""
    side = int(tokens ** 0.5 + 0.5)
    if side * side != tokens:
        raise ValueError("expected the tokens of a square grid, got " + str(tokens) + " tokens")
    return side


def to_grid(x: Tensor) -> Tensor:
    """Tokens ``[B, side * side, C]`` of a square grid to a feature map ``[B, C, side, side]`` (a view)."""
    side = grid_side(x.shape[1])
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def max_pool(x: Tensor, stride: int) -> Tensor:
    """UniNet's pooling on shortcuts: 3x3 max-pool with padding 1 (at stride 1 too, as its conv blocks do)."""
    return F.max_pool2d(x, 3, stride, 1)


def avg_pool(x: Tensor) -> Tensor:
    """ElasticViT's pooling on stride-2 shortcuts: 2x2 average, zero-padded by one on an odd side (zeros counted)."""
    return F.avg_pool2d(x, 2, 2, padding=[x.shape[2] % 2, x.shape[3] % 2])


def heads_first(x: Tensor, num_heads: int) -> Tensor:
    """``[B, N, heads * d]`` to ``[B, heads, N, d]``."""
    return x.reshape(x.shape[0], x.shape[1], num_heads, -1).transpose(1, 2)


def dot_product_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Optional[Tensor] = None) -> Tensor:
    """``softmax(q k^T * scale + bias) v`` of ``[B, heads, N, d]`` tensors, back to ``[B, N, heads * d_v]``."""
    logits = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        logits = logits + bias
    context = logits.softmax(dim=-1) @ v
    return context.transpose(1, 2).flatten(2)


def relative_position_index(side: int, max_side: int, device: torch.device) -> Tensor:
    """``[side^2, side^2]`` rows of a ``(2 * max_side - 1)^2`` table of 2D offsets, one per (query, key) pair of a
    ``side x side`` grid: the offset ``(dy, dx)`` is row ``(dy + max_side - 1) * (2 * max_side - 1) + dx + max_side
    - 1``."""
    if not 1 <= side <= max_side:
        raise ValueError("the token grid side " + str(side) + " is outside 1.." + str(max_side) + " (max_grid)")
    coords = torch.arange(side, device=device)
    rows, cols = coords.repeat_interleave(side), coords.repeat(side)
    dy = rows[:, None] - rows[None, :] + max_side - 1
    dx = cols[:, None] - cols[None, :] + max_side - 1
    return dy * (2 * max_side - 1) + dx


class RelativePositionBias(nn.Module):
    """A learned attention bias per head for each 2D offset between two tokens of a square grid whose side is at most
    ``max_side`` (Swin, ElasticViT): ``table: [(2 * max_side - 1)^2, num_heads]``. Indexed by offset, one table serves
    every grid size (input resolution)."""

    def __init__(self, max_side: int, num_heads: int):
        super().__init__()
        self.max_side = max_side
        self.table = nn.Parameter(torch.empty((2 * max_side - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.table, std=0.02)

    def forward(self, side: int) -> Tensor:
        """The bias ``[num_heads, side^2, side^2]`` of a ``side x side`` grid."""
        return self.table[relative_position_index(side, self.max_side, self.table.device)].permute(2, 0, 1)


# --- convolution blocks: [B, C, H, W] -> [B, C', H', W'] -----------------------------------------------------------

class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation as MobileNetV3, OFA and UniNet have it, with timm's names:
    ``x * hardsigmoid(conv_expand(relu(conv_reduce(mean of x over H, W))))``."""

    def __init__(self, channels: int, reduced_channels: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced_channels, 1)
        self.act1 = nn.ReLU()
        self.conv_expand = nn.Conv2d(reduced_channels, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * self.gate(scale)


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual (MBConv) with timm's names: ``conv_pw, bn1, act`` (expand to
    ``in_channels * expand_ratio``), ``conv_dw, bn2, act`` (depthwise, ``kernel_size``, ``stride``), ``se``,
    ``conv_pwl, bn3`` (project), plus a residual; absent parts are ``nn.Identity`` (as in timm).

    ``expand_ratio`` 1 has no expand conv (MobileNetV2); ``input_norm`` puts a BatchNorm ``bn_in`` before the expand
    conv (UniNet). ``se_channels``: the reduced width of the :class:`SqueezeExcite`, 0 for none. The residual is the
    identity when the block keeps the shape (stride 1, ``in_channels == out_channels``); otherwise ``shortcut_pool``
    says what it is: ``"none"``, no residual (MobileNetV2); ``"max"``, :func:`max_pool` then a 1x1 conv with bias
    (UniNet); ``"avg"``, :func:`avg_pool` at stride 2, then a bias-free 1x1 conv if the width changes (ElasticViT).
    """

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int = 3, stride: int = 1,
                 activation: str = "relu6", se_channels: int = 0, input_norm: bool = False,
                 shortcut_pool: str = "none"):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = expand_ratio > 1
        self.stride = stride
        self.bn_in = nn.BatchNorm2d(in_channels) if self.expand and input_norm else nn.Identity()
        self.conv_pw = nn.Conv2d(in_channels, hidden, 1, bias=False) if self.expand else nn.Identity()
        self.bn1 = nn.BatchNorm2d(hidden) if self.expand else nn.Identity()
        self.act = make_activation(activation)
        self.conv_dw = nn.Conv2d(hidden, hidden, kernel_size, stride, kernel_size // 2, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.se = SqueezeExcite(hidden, se_channels) if se_channels else nn.Identity()
        self.conv_pwl = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.identity_residual = stride == 1 and in_channels == out_channels
        self.shortcut_pool = shortcut_pool
        project = not self.identity_residual and (shortcut_pool == "max" or
                                                  (shortcut_pool == "avg" and in_channels != out_channels))
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, bias=shortcut_pool == "max") if project
                         else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.bn1(self.conv_pw(self.bn_in(x)))) if self.expand else x
        h = self.se(self.act(self.bn2(self.conv_dw(h))))
        h = self.bn3(self.conv_pwl(h))
        if self.identity_residual:
            return x + h
        if self.shortcut_pool == "none":
            return h
        if self.shortcut_pool == "max":
            return self.shortcut(max_pool(x, self.stride)) + h
        return self.shortcut(x if self.stride == 1 else avg_pool(x)) + h


# --- token blocks: [B, side * side, C] -> the same --------------------------------------------------------------

class MixerBlock(nn.Module):
    """MLP-Mixer's block with timm's names on tokens ``[B, tokens, dim]``: ``x + mlp_tokens(norm1(x)^T)^T``, then
    ``x + mlp_channels(norm2(x))``; both MLPs use exact GELU."""

    def __init__(self, dim: int, tokens: int, token_hidden: int, hidden_features: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp_tokens = Mlp(tokens, token_hidden)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp_channels = Mlp(dim, hidden_features)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class PositionalAttentionBlock(Block):
    """UniNet's attention block on tokens ``[B, side * side, dim]``: ``x + pos_embed(x)`` with ``pos_embed`` a 3x3
    depthwise conv on the token grid (a conditional position encoding), then the pre-norm :class:`Block`."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, hidden_features: int, eps: float = 1e-5,
                 qkv_bias: bool = True, layer_scale: Optional[float] = None):
        super().__init__(dim, num_heads, head_dim, hidden_features, eps=eps, qkv_bias=qkv_bias, layer_scale=layer_scale)
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + to_tokens(self.pos_embed(to_grid(x)))
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VScaleAttention(nn.Module):
    """ElasticViT's attention on tokens ``[B, side * side, dim]``: q and k heads of ``head_dim`` channels, v heads of
    ``v_scale * head_dim``; ``qkv`` rows are the q, k and v blocks one after another.

    ``value_conv``: a 3x3 depthwise conv (no bias) on v over the token grid; ``max_grid > 0``: a
    :class:`RelativePositionBias` for grids of side up to ``max_grid``; ``activation`` (None for none) acts on the
    attention output before the projection (LeViT).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, v_scale: int, qkv_bias: bool = False,
                 value_conv: bool = True, max_grid: int = 0, activation: Optional[str] = "hardswish"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.qk_width = num_heads * head_dim
        self.v_width = num_heads * head_dim * v_scale
        self.qkv = nn.Linear(dim, 2 * self.qk_width + self.v_width, bias=qkv_bias)
        self.value_conv = value_conv
        self.v_conv = (nn.Conv2d(self.v_width, self.v_width, 3, padding=1, groups=self.v_width, bias=False)
                       if value_conv else nn.Identity())
        self.rel_pos_bias: Optional[RelativePositionBias] = (RelativePositionBias(max_grid, num_heads)
                                                              if max_grid else None)
        self.act = nn.Identity() if activation is None else make_activation(activation)
        self.proj = nn.Linear(self.v_width, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).split([self.qk_width, self.qk_width, self.v_width], dim=-1)
        if self.value_conv:
            v = to_tokens(self.v_conv(to_grid(v)))
        bias: Optional[Tensor] = None
        rel_pos_bias = self.rel_pos_bias
        if rel_pos_bias is not None:
            bias = rel_pos_bias(grid_side(x.shape[1]))
        context = dot_product_attention(heads_first(q, self.num_heads), heads_first(k, self.num_heads),
                                        heads_first(v, self.num_heads), self.scale, bias)
        return self.proj(self.act(context))


class SampleLayerNorm(nn.Module):
    """ElasticViT's ``LNSuper``: each sample of tokens ``[B, N, dim]`` normalised over its tokens and channels
    together (``F.layer_norm(x, x.shape[1:])``), then scaled and shifted per channel by ``weight`` and ``bias``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[1:]
        return F.layer_norm(x, shape, self.weight.expand(shape), self.bias.expand(shape), self.eps)


def token_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """The LayerNorm of tokens ``kind`` names: ``token`` (each token over its channels, ``nn.LayerNorm``) or
    ``sample`` (each sample over its tokens and channels, :class:`SampleLayerNorm`)."""
    if kind == "token":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "sample":
        return SampleLayerNorm(dim, eps=eps)
    raise ValueError("norm must be 'token' or 'sample', got " + repr(kind))


class VScaleBlock(nn.Module):
    """ElasticViT's transformer layer pair: ``x + attn(norm1(x))`` (:class:`VScaleAttention`), then
    ``x + mlp(norm2(x))`` with ``activation`` in the MLP too; ``norm``: the LayerNorms' kind (:func:`token_norm`;
    ElasticViT's own is ``sample``)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, v_scale: int, hidden_features: int, eps: float = 1e-5,
                 qkv_bias: bool = False, value_conv: bool = True, max_grid: int = 0, activation: str = "hardswish",
                 norm: str = "token"):
        super().__init__()
        self.norm1 = token_norm(norm, dim, eps)
        self.attn = VScaleAttention(dim, num_heads, head_dim, v_scale, qkv_bias=qkv_bias, value_conv=value_conv,
                                    max_grid=max_grid, activation=activation)
        self.norm2 = token_norm(norm, dim, eps)
        self.mlp = Mlp(dim, hidden_features, activation=activation)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --- UniNet's downsampling modules (DSMs) between stages: [B, C, H, W] in ---------------------------------------

class SeparableDownsample(nn.Module):
    """UniNet's local downsampling path: ``conv_pw(bn(conv_dw(x)))``, a 3x3 depthwise conv with ``stride`` and bias,
    BatchNorm, and a 1x1 conv with bias to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        self.conv_dw = nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels)
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv_pw = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_pw(self.bn(self.conv_dw(x)))


class LocalDSM(nn.Module):
    """UniNet's local DSM, feature map in and out: ``downsample(x) + shortcut(max_pool(x))``, the shortcut a 1x1 conv
    with bias (no pooling at stride 1)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.downsample = SeparableDownsample(in_channels, out_channels, stride)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(x) + self.shortcut(x if self.stride == 1 else max_pool(x, self.stride))


class AttentionDSM(nn.Module):
    """What the attention DSMs share: keys and values from all input tokens (``kv_norm``, then ``kv`` with the k rows
    before the v rows), ``num_heads`` heads of ``head_dim``, the projection ``proj`` to ``out_channels``, and the
    shortcut of :class:`LocalDSM`. Feature map ``[B, C, H, W]`` in, tokens ``[B, H' * W', out_channels]`` out."""

    def __init__(self, in_channels: int, out_channels: int, num_heads: int, head_dim: int = 32, stride: int = 2,
                 qkv_bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.stride = stride
        self.num_heads = num_heads
        self.scale = head_dim ** -0.5
        self.kv_norm = nn.LayerNorm(in_channels, eps=eps)
        self.kv = nn.Linear(in_channels, 2 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, out_channels)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def attend(self, q: Tensor, x: Tensor) -> Tensor:
        """The queries ``q [B, H' * W', heads * head_dim]`` attend to every token of ``x``; projected, plus the
        shortcut."""
        k, v = self.kv(self.kv_norm(to_tokens(x))).chunk(2, dim=-1)
        context = dot_product_attention(heads_first(q, self.num_heads), heads_first(k, self.num_heads),
                                        heads_first(v, self.num_heads), self.scale)
        return self.proj(context) + to_tokens(self.shortcut(x if self.stride == 1 else max_pool(x, self.stride)))


class LocalGlobalDSM(AttentionDSM):
    """UniNet's local-global DSM: queries from the local path (``q``, a :class:`SeparableDownsample` to the attention
    width, then ``q_norm``), keys and values from all input tokens (:class:`AttentionDSM`)."""

    def __init__(self, in_channels: int, out_channels: int, num_heads: int, head_dim: int = 32, stride: int = 2,
                 qkv_bias: bool = True, eps: float = 1e-5):
        super().__init__(in_channels, out_channels, num_heads, head_dim, stride, qkv_bias, eps)
        self.q = SeparableDownsample(in_channels, num_heads * head_dim, stride)
        self.q_norm = nn.LayerNorm(num_heads * head_dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.attend(self.q_norm(to_tokens(self.q(x))), x)


class GlobalDSM(AttentionDSM):
    """A global DSM: queries from every ``stride``-th token in each direction (normalised by ``kv_norm``, then the
    linear ``q``), keys and values from all input tokens (:class:`AttentionDSM`), as LeViT's subsampling attention."""

    def __init__(self, in_channels: int, out_channels: int, num_heads: int, head_dim: int = 32, stride: int = 2,
                 qkv_bias: bool = True, eps: float = 1e-5):
        super().__init__(in_channels, out_channels, num_heads, head_dim, stride, qkv_bias, eps)
        self.q = nn.Linear(in_channels, num_heads * head_dim, bias=qkv_bias)

    def forward(self, x: Tensor) -> Tensor:
        strided = x[:, :, ::self.stride, ::self.stride]
        return self.attend(self.q(self.kv_norm(to_tokens(strided))), x)


# --- whole networks: stem, layers, head --------------------------------------------------------------------------

class ConvNormAct(nn.Module):
    """A conv without bias (padding ``k // 2``), BatchNorm and an activation: the stem of UniNet and ElasticViT."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, activation: str):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = make_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class ClassifierHead(nn.Module):
    """A 1x1 conv to ``features`` channels (no bias), BatchNorm and the activation, global average pooling, then with
    ``pre_logits`` > 0 a linear layer to that width and the activation (MobileNetV3, ElasticViT), dropout and the
    classifier; feature map in, logits out. UniNet's head has no pre-logits layer."""

    def __init__(self, in_channels: int, features: int, num_classes: int, pre_logits: int = 0,
                 activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, features, 1, bias=False)
        self.bn = nn.BatchNorm2d(features)
        self.act = make_activation(activation)
        self.pre_logits = nn.Linear(features, pre_logits) if pre_logits else nn.Identity()
        self.pre_act = make_activation(activation) if pre_logits else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(pre_logits or features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.act(self.bn(self.conv(x))).mean((2, 3))
        return self.classifier(self.dropout(self.pre_act(self.pre_logits(pooled))))


class ToTokens(nn.Module):
    """Feature map to tokens (:func:`to_tokens`), between a conv layer and a token layer."""

    def forward(self, x: Tensor) -> Tensor:
        return to_tokens(x)


class ToGrid(nn.Module):
    """Tokens of a square grid to a feature map (:func:`to_grid`), between a token layer and a conv layer."""

    def forward(self, x: Tensor) -> Tensor:
        return to_grid(x)


class HybridNetwork(nn.Module):
    """A hybrid conv / attention / MLP network: ``stem``, then ``layers`` (conv blocks and DSMs, token blocks, with
    :class:`ToTokens` and :class:`ToGrid` where the layout changes), then ``head``. Images of another size than
    ``resolution`` are first resized to it (bicubic), as ElasticViT's supernet does, so that one data set serves
    subnets of every resolution."""

    def __init__(self, resolution: int, stem: nn.Module, layers: list[nn.Module], head: nn.Module):
        super().__init__()
        self.resolution = resolution
        self.stem = stem
        self.layers = nn.Sequential(*layers)
        self.head = head

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.layers(self.stem(resize(images, self.resolution))))


def resize(images: Tensor, resolution: int) -> Tensor:
    """``images`` at ``resolution x resolution`` (bicubic, no antialiasing, as ElasticViT), unchanged if they are."""
    if images.shape[-2] == resolution and images.shape[-1] == resolution:
        return images
    return F.interpolate(images, size=[resolution, resolution], mode="bicubic", align_corners=False)


__all__ = ["AttentionDSM", "ClassifierHead", "ConvNormAct", "GlobalDSM", "HybridNetwork", "InvertedResidual",
           "LocalDSM", "LocalGlobalDSM", "MixerBlock", "PositionalAttentionBlock", "RelativePositionBias",
           "SampleLayerNorm", "SeparableDownsample", "SqueezeExcite", "ToGrid", "ToTokens", "VScaleAttention",
           "VScaleBlock", "avg_pool", "dot_product_attention", "grid_side", "heads_first", "max_pool",
           "relative_position_index", "resize", "to_grid", "to_tokens", "token_norm"]
