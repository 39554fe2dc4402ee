"""Elastic layers of hybrid conv / attention / MLP networks beyond the conv blocks (``elastic_ops.conv``): UniNet's MLP
operator and attention block, its downsampling modules (DSMs) between stages, and ElasticViT's attention with
V-scale (DESIGN.md section 9).

Activation layouts, one per kind of layer: conv layers and the input of every DSM are feature maps ``[B, C, H, W]``;
the attention and MLP blocks, and the output of the attention DSMs, are tokens ``[B, H * W, C]`` of a square grid in
row-major order. A supernet converts where a stage of the other kind follows, with ``to_tokens`` and ``to_grid``
(``elastic_ops.plain_hybrid``; views, the copy happens where the next op needs contiguous memory), as UniNet does.

Linear layers, LayerNorm and MLPs run through the elastic ops on leading slices of the super weights; attention
between two different token sets, and attention with a bias, runs in torch (``scaled_dot_product_attention``) on the
activations. ``extract()`` returns the modules of ``elastic_ops.plain_hybrid`` holding copies of the active weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import plain, plain_hybrid
from .conv import ElasticBatchNorm2d, ElasticComposite, ElasticConv2d, ElasticDepthwiseConv2d
from .functional import elastic_linear, elastic_mlp
from .group_sizes import GroupSizes
from .nn import ElasticBlock, ElasticLayerNorm, ElasticLinear, ElasticMlp, QkGroup, drop_path, empty_module
from .plain_hybrid import heads_first, max_pool, to_grid, to_tokens


def linear_rows(x: Tensor, linear: ElasticLinear, start: int, rows: int) -> Tensor:
    """``x`` through rows ``start : start + rows`` of ``linear`` (a block of a stacked projection such as qkv), in place
    on the super weight; the input width is ``x.shape[-1]``."""
    bias = None if linear.bias is None else linear.bias[start:]
    return elastic_linear(x, linear.weight[start:], bias, rows)


def extract_row_blocks(linear: ElasticLinear, blocks: list[tuple[int, int]], in_features: int) -> nn.Linear:
    """An ``nn.Linear`` over the first ``in_features`` columns of the row blocks ``(start, rows)`` of ``linear``, one
    after another: a stacked projection (qkv, kv) of the active heads, whose blocks are not one leading slice."""
    rows = [slice(start, start + count) for start, count in blocks]
    extracted = empty_module(lambda: nn.Linear(in_features, sum(count for _, count in blocks),
                                               bias=linear.bias is not None), linear.weight)
    with torch.no_grad():
        extracted.weight.copy_(torch.cat([linear.weight[block, :in_features] for block in rows]))
        if linear.bias is not None:
            extracted.bias.copy_(torch.cat([linear.bias[block] for block in rows]))
    return extracted


def attention_context(q: Tensor, k: Tensor, v: Tensor, num_heads: int, bias: Tensor | None = None) -> Tensor:
    """Multi-head attention of ``q [B, N_q, h * d]`` to ``k [B, N, h * d]``, ``v [B, N, h * d_v]`` with scale
    ``d ** -0.5`` and an optional additive ``bias [h, N_q, N]``; returns ``[B, N_q, h * d_v]``."""
    context = F.scaled_dot_product_attention(heads_first(q, num_heads), heads_first(k, num_heads),
                                             heads_first(v, num_heads), attn_mask=bias)
    return context.transpose(1, 2).flatten(2)


# --- token blocks: [B, side * side, C] -> the same --------------------------------------------------------------

class ElasticMixerBlock(ElasticComposite):
    """MLP-Mixer's block, UniNet's MLP operator (:class:`elastic_ops.plain_hybrid.MixerBlock`, timm's names), on tokens
    ``[B, grid_size^2, embed_dim]``: elastic ``embed_dim``, channel-MLP width ``hidden_features`` and ``grid_size``.

    The token MLP mixes the tokens of the stage's grid, whose side follows the input resolution, so it is elastic over
    tokens too: its weights are laid out on the largest grid (``mlp_tokens.fc1.weight: [token_hidden, max_grid^2]``,
    row-major) and a grid of side ``g`` uses their top-left ``g x g`` block (and the same rows of ``fc2``), so a grid
    position has the same weights at every resolution. That block is not a leading slice: for ``g < max_grid`` it is
    gathered into a ``[token_hidden, g^2]`` weight copy (weights are small; activations are not copied). The token
    MLP's hidden width ``token_hidden`` is fixed.
    """

    def __init__(self, embed_dim: int, hidden_features: int, max_grid: int, token_hidden: int, eps: float = 1e-6,
                 drop_path: float = 0.0, device=None, dtype=None):
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"ElasticMixerBlock: drop_path must be in [0, 1), got {drop_path}")
        self.max_grid, self.token_hidden, self.drop_path = max_grid, token_hidden, drop_path
        self.norm1 = ElasticLayerNorm(embed_dim, eps=eps, device=device, dtype=dtype)
        self.mlp_tokens = plain.Mlp(max_grid * max_grid, token_hidden).to(device, dtype)
        self.norm2 = ElasticLayerNorm(embed_dim, eps=eps, device=device, dtype=dtype)
        self.mlp_channels = ElasticMlp(embed_dim, hidden_features, device=device, dtype=dtype)
        self.active = self.max_config()

    def max_config(self) -> dict[str, int]:
        return {**self.mlp_channels.max_config(), "grid_size": self.max_grid}

    def child_configs(self, config: dict[str, int]) -> dict[str, dict[str, int]]:
        embed_dim = config["embed_dim"]
        return {"norm1": {"dim": embed_dim}, "norm2": {"dim": embed_dim},
                "mlp_channels": {"embed_dim": embed_dim, "hidden_features": config["hidden_features"]}}

    def token_weights(self, grid_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``fc1.weight, fc1.bias, fc2.weight, fc2.bias`` of the token MLP on a ``grid_size x grid_size`` grid."""
        fc1, fc2, side = self.mlp_tokens.fc1, self.mlp_tokens.fc2, self.max_grid
        return (fc1.weight.unflatten(1, (side, side))[:, :grid_size, :grid_size].flatten(1), fc1.bias,
                fc2.weight.unflatten(0, (side, side))[:grid_size, :grid_size].flatten(0, 1),
                fc2.bias.unflatten(0, (side, side))[:grid_size, :grid_size].flatten())

    def forward(self, x: Tensor, embed_dim: int | None = None, hidden_features: int | None = None,
                grid_size: int | None = None) -> Tensor:
        config = self.resolve(embed_dim=embed_dim, hidden_features=hidden_features, grid_size=grid_size)
        self.check_width(x, config["embed_dim"], "embed_dim")
        grid = config["grid_size"]
        if x.dim() != 3 or x.shape[1] != grid * grid:
            raise ValueError(f"ElasticMixerBlock: input has shape {tuple(x.shape)} but the active grid_size is {grid} "
                             f"([batch, {grid * grid}, embed_dim]); call set_active(grid_size=...) or pass it to "
                             f"forward")
        children = self.child_configs(config)
        mixed = elastic_mlp(self.norm1(x, **children["norm1"]).transpose(1, 2), *self.token_weights(grid),
                            self.token_hidden)
        x = x + drop_path(mixed.transpose(1, 2), self.drop_path, self.training)
        channels = self.mlp_channels(self.norm2(x, **children["norm2"]), **children["mlp_channels"])
        return x + drop_path(channels, self.drop_path, self.training)

    def extract(self) -> plain_hybrid.MixerBlock:
        config = self.active
        grid = config["grid_size"]
        block = self.extract_children(empty_module(lambda: plain_hybrid.MixerBlock(
            config["embed_dim"], grid * grid, self.token_hidden, config["hidden_features"], eps=self.norm1.eps),
            self.norm1.weight))
        tokens = block.mlp_tokens
        with torch.no_grad():
            for target, source in zip((tokens.fc1.weight, tokens.fc1.bias, tokens.fc2.weight, tokens.fc2.bias),
                                      self.token_weights(grid)):
                target.copy_(source)
        return block


class ElasticPositionalAttentionBlock(ElasticBlock):
    """UniNet's attention block (:class:`elastic_ops.plain_hybrid.PositionalAttentionBlock`) on tokens
    ``[B, side * side, embed_dim]``: ``x + pos_embed(x)``, a 3x3 depthwise conv with bias over the active channels of
    the token grid (a conditional position encoding), then :class:`elastic_ops.nn.ElasticBlock`'s pre-norm attention
    and MLP (elastic ``embed_dim``, ``num_heads`` of a fixed ``head_dim``, ``hidden_features``). The defaults are
    UniNet's: head dim 32, LayerNorm eps 1e-5, qkv bias, layer scale initialised to 1e-6.
    """

    two_sided = False  # its positional conv reads leading channels

    def __init__(self, embed_dim: int, num_heads: int, hidden_features: int, head_dim: int = 32, eps: float = 1e-5,
                 qkv_bias: bool = True, drop_path: float = 0.0, layer_scale: float | None = 1e-6, device=None,
                 dtype=None):
        super().__init__(embed_dim, num_heads, hidden_features, head_dim=head_dim, eps=eps, qkv_bias=qkv_bias,
                         drop_path=drop_path, device=device, dtype=dtype, layer_scale=layer_scale)
        self.pos_embed = ElasticDepthwiseConv2d(embed_dim, 3, bias=True, device=device, dtype=dtype)

    def set_active(self, **config: int | None):
        super().set_active(**config)
        self.pos_embed.set_active(channels=self.active["embed_dim"])
        return self

    def forward(self, x: Tensor, embed_dim: int | None = None, num_heads: int | None = None,
                hidden_features: int | None = None) -> Tensor:
        channels = self.resolve(embed_dim=embed_dim)["embed_dim"]
        self.check_width(x, channels, "embed_dim")
        x = x + to_tokens(self.pos_embed(to_grid(x), channels=channels))
        return super().forward(x, embed_dim, num_heads, hidden_features)

    def grouped_forward(self, x: Tensor, sizes: GroupSizes, heads: GroupSizes, hidden: GroupSizes,
                        qk_groups: tuple[QkGroup, ...] | None = None) -> Tensor:
        """K subnets on ``x [K, B, N, sizes.width]`` (zero past each subnet's width), as
        :meth:`elastic_ops.nn.ElasticBlock.grouped_forward`; the conv's bias is masked off each subnet's padding."""
        position = to_tokens(self.pos_embed(to_grid(x.flatten(0, 1)), channels=sizes.width)).view_as(x)
        x = x + position * sizes.mask(x.dtype, 4)
        return super().grouped_forward(x, sizes, heads, hidden, qk_groups)

    def extract(self) -> plain_hybrid.PositionalAttentionBlock:
        self.set_active()
        config = self.active
        block = empty_module(lambda: plain_hybrid.PositionalAttentionBlock(
            config["embed_dim"], config["num_heads"], self.attn.head_dim, config["hidden_features"], eps=self.norm1.eps,
            qkv_bias=self.attn.qkv.bias is not None, layer_scale=self.layer_scale), self.attn.qkv.weight)
        for name, module in super().extract().named_children():
            setattr(block, name, module)
        block.pos_embed = self.pos_embed.extract()
        return block


QKV_LAYOUTS = ("blocks", "per_head")  # ElasticVScaleAttention's ways of reading heads from the qkv rows


class ElasticVScaleAttention(ElasticComposite):
    """ElasticViT's attention (:class:`elastic_ops.plain_hybrid.VScaleAttention`) on tokens ``[B, side * side, e]``:
    elastic ``embed_dim``, ``num_heads`` and ``v_scale``; q and k heads of ``head_dim`` channels, v heads of
    ``v_scale * head_dim``.

    ``qkv.weight: [2 * H * head_dim + H * head_dim * V, E]`` holds the q block, the k block and the v block (``H``,
    ``V``, ``E``: the largest heads, v scale and embed dim); the active rows are the leading ``h * head_dim`` of the q
    and k blocks and the leading ``h * head_dim * v`` of the v block, and ``proj.weight[:e, :h * head_dim * v]``.
    ``value_conv``: a 3x3 depthwise conv (no bias) on v over the token grid, ``v_conv.weight[:h * head_dim * v]``;
    ``max_grid > 0``: a learned bias per head and 2D offset (``rel_pos_bias.table[:, :h]``) for grids of side up to
    ``max_grid``; ``activation`` (None for none) on the attention output before the projection. The defaults are
    ElasticViT's: head dim 16, no qkv bias, the v conv, Hardswish.

    ``qkv_layout``: how the active rows' outputs make heads. ``blocks``: head ``i`` takes rows ``i * head_dim ..`` of
    each block. ``per_head`` (ElasticViT's ``SuperAttention``, which views its qkv output as ``(B, N, heads, -1)``):
    the active rows of the q, k and v blocks, one block after another, are read head by head, head ``i`` taking the
    ``i``-th ``2 * head_dim + v_scale * head_dim`` of them as its q, k and v. Which super row serves which head then
    depends on the heads and v scale, so no one order of the rows holds every subnet's heads as slices: the layout
    regroups the three blocks' outputs each call (a copy of the qkv activations; the weights are read in place).
    """

    def __init__(self, embed_dim: int, num_heads: int, v_scale: int, head_dim: int = 16, qkv_bias: bool = False,
                 value_conv: bool = True, max_grid: int = 0, activation: str | None = "hardswish",
                 qkv_layout: str = "blocks", device=None, dtype=None):
        super().__init__()
        if qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f"ElasticVScaleAttention: qkv_layout must be one of {', '.join(QKV_LAYOUTS)}, got "
                             f"{qkv_layout!r}")
        factory = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.v_scale, self.head_dim = embed_dim, num_heads, v_scale, head_dim
        self.max_grid, self.activation, self.qkv_layout = max_grid, activation, qkv_layout
        v_width = num_heads * head_dim * v_scale
        self.qkv = ElasticLinear(embed_dim, 2 * num_heads * head_dim + v_width, bias=qkv_bias, **factory)
        self.v_conv = ElasticDepthwiseConv2d(v_width, 3, **factory) if value_conv else None
        self.rel_pos_bias = (plain_hybrid.RelativePositionBias(max_grid, num_heads).to(device, dtype) if max_grid
                             else None)
        self.act = nn.Identity() if activation is None else plain.make_activation(activation)
        self.proj = ElasticLinear(v_width, embed_dim, **factory)
        self.active = self.max_config()

    def max_config(self) -> dict[str, int]:
        return {"embed_dim": self.embed_dim, "num_heads": self.num_heads, "v_scale": self.v_scale}

    def child_configs(self, config: dict[str, int]) -> dict[str, dict[str, int]]:
        # qkv's active rows are three blocks, not one leading slice: extract() takes them itself.
        v_width = config["num_heads"] * self.head_dim * config["v_scale"]
        children = {"v_conv": {"channels": v_width},
                    "proj": {"in_features": v_width, "out_features": config["embed_dim"]}}
        return {name: child for name, child in children.items() if getattr(self, name) is not None}

    def forward(self, x: Tensor, embed_dim: int | None = None, num_heads: int | None = None,
                v_scale: int | None = None) -> Tensor:
        config = self.resolve(embed_dim=embed_dim, num_heads=num_heads, v_scale=v_scale)
        self.check_width(x, config["embed_dim"], "embed_dim")
        if x.dim() != 3:
            raise ValueError(f"ElasticVScaleAttention: input must be [batch, tokens, embed_dim], got {tuple(x.shape)}")
        heads, children = config["num_heads"], self.child_configs(config)
        qk_width, max_qk_width = heads * self.head_dim, self.num_heads * self.head_dim
        q, k = linear_rows(x, self.qkv, 0, qk_width), linear_rows(x, self.qkv, max_qk_width, qk_width)
        v = linear_rows(x, self.qkv, 2 * max_qk_width, children["proj"]["in_features"])
        if self.qkv_layout == "per_head":
            widths = [self.head_dim, self.head_dim, self.head_dim * config["v_scale"]]
            q, k, v = (t.flatten(2) for t in torch.cat([q, k, v], -1).unflatten(-1, (heads, -1)).split(widths, -1))
        if self.v_conv is not None:
            v = to_tokens(self.v_conv(to_grid(v), **children["v_conv"]))
        bias = None
        if self.rel_pos_bias is not None:
            index = plain_hybrid.relative_position_index(plain_hybrid.grid_side(x.shape[1]), self.max_grid, x.device)
            bias = self.rel_pos_bias.table[:, :heads][index].permute(2, 0, 1).to(x.dtype)
        return self.proj(self.act(attention_context(q, k, v, heads, bias)), **children["proj"])

    def active_row_blocks(self, heads: int, v_scale: int) -> list[tuple[int, int]]:
        """The super rows ``(start, rows)`` that make the block layout's q, k and v heads of a subnet, in order."""
        qk_width, max_qk_width = heads * self.head_dim, self.num_heads * self.head_dim
        blocks = [(0, qk_width), (max_qk_width, qk_width), (2 * max_qk_width, qk_width * v_scale)]
        if self.qkv_layout == "blocks":
            return blocks
        # the active rows in order; on the CPU, also where the modules are built on the meta device (a rebuilt export)
        rows = torch.cat([torch.arange(start, start + count, device="cpu") for start, count in blocks])
        widths = [self.head_dim, self.head_dim, self.head_dim * v_scale]
        regrouped = torch.cat([part.flatten() for part in rows.view(heads, -1).split(widths, -1)])
        return [(row, 1) for row in regrouped.tolist()]

    def extract(self) -> plain_hybrid.VScaleAttention:
        config = self.active
        heads, v_scale = config["num_heads"], config["v_scale"]
        attn = self.extract_children(empty_module(lambda: plain_hybrid.VScaleAttention(
            config["embed_dim"], heads, self.head_dim, v_scale, qkv_bias=self.qkv.bias is not None,
            value_conv=self.v_conv is not None, max_grid=self.max_grid, activation=self.activation), self.qkv.weight))
        attn.qkv = extract_row_blocks(self.qkv, self.active_row_blocks(heads, v_scale), config["embed_dim"])
        if self.rel_pos_bias is not None:
            with torch.no_grad():
                attn.rel_pos_bias.table.copy_(self.rel_pos_bias.table[:, :heads])
        return attn


class ElasticSampleLayerNorm(ElasticLayerNorm):
    """ElasticViT's ``LNSuper`` (:class:`elastic_ops.plain_hybrid.SampleLayerNorm`) on tokens ``[B, N, dim]`` of the
    first ``dim`` channels: each sample normalised over its tokens and channels together, then ``weight[:dim]`` and
    ``bias[:dim]`` per channel (broadcast over the tokens as views, no copy)."""

    two_sided = False

    def forward(self, x: Tensor, dim: int | None = None) -> Tensor:
        dim = self.resolve(dim=dim)["dim"]
        self.check_width(x, dim, "dim")
        shape = x.shape[1:]
        return F.layer_norm(x, shape, self.weight[:dim].expand(shape), self.bias[:dim].expand(shape), self.eps)

    def grouped_forward(self, x: Tensor, sizes: GroupSizes) -> Tensor:
        raise NotImplementedError("ElasticSampleLayerNorm: one subnet at a time (its statistics span the tokens)")

    def extract(self) -> plain_hybrid.SampleLayerNorm:
        dim = self.active["dim"]
        norm = empty_module(lambda: plain_hybrid.SampleLayerNorm(dim, eps=self.eps), self.weight)
        with torch.no_grad():
            norm.weight.copy_(self.weight[:dim])
            norm.bias.copy_(self.bias[:dim])
        return norm


TOKEN_NORMS = {"token": ElasticLayerNorm, "sample": ElasticSampleLayerNorm}  # plain_hybrid.token_norm's kinds


class ElasticVScaleBlock(ElasticComposite):
    """ElasticViT's transformer layer pair (:class:`elastic_ops.plain_hybrid.VScaleBlock`) on tokens:
    ``x + attn(norm1(x))`` with :class:`ElasticVScaleAttention`, then ``x + mlp(norm2(x))`` with ``activation`` in the
    MLP too; elastic ``embed_dim``, ``num_heads``, ``v_scale`` and ``hidden_features``. ``norm``: the LayerNorms'
    kind, ``token`` (each token over its channels) or ``sample`` (ElasticViT's ``LNSuper``, each sample over its
    tokens and channels: :class:`ElasticSampleLayerNorm`); ``qkv_layout``: :class:`ElasticVScaleAttention`'s."""

    def __init__(self, embed_dim: int, num_heads: int, v_scale: int, hidden_features: int, head_dim: int = 16,
                 eps: float = 1e-5, qkv_bias: bool = False, value_conv: bool = True, max_grid: int = 0,
                 activation: str = "hardswish", drop_path: float = 0.0, norm: str = "token", qkv_layout: str = "blocks",
                 device=None, dtype=None):
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"ElasticVScaleBlock: drop_path must be in [0, 1), got {drop_path}")
        if norm not in TOKEN_NORMS:
            raise ValueError(f"ElasticVScaleBlock: norm must be one of {', '.join(TOKEN_NORMS)}, got {norm!r}")
        factory = dict(device=device, dtype=dtype)
        self.drop_path, self.norm = drop_path, norm
        self.norm1 = TOKEN_NORMS[norm](embed_dim, eps=eps, **factory)
        self.attn = ElasticVScaleAttention(embed_dim, num_heads, v_scale, head_dim, qkv_bias=qkv_bias,
                                           value_conv=value_conv, max_grid=max_grid, activation=activation,
                                           qkv_layout=qkv_layout, **factory)
        self.norm2 = TOKEN_NORMS[norm](embed_dim, eps=eps, **factory)
        self.mlp = ElasticMlp(embed_dim, hidden_features, activation=activation, **factory)
        self.active = self.max_config()

    def max_config(self) -> dict[str, int]:
        return {**self.attn.max_config(), "hidden_features": self.mlp.max_config()["hidden_features"]}

    def child_configs(self, config: dict[str, int]) -> dict[str, dict[str, int]]:
        embed_dim = config["embed_dim"]
        return {"norm1": {"dim": embed_dim},
                "attn": {"embed_dim": embed_dim, "num_heads": config["num_heads"], "v_scale": config["v_scale"]},
                "norm2": {"dim": embed_dim},
                "mlp": {"embed_dim": embed_dim, "hidden_features": config["hidden_features"]}}

    def forward(self, x: Tensor, embed_dim: int | None = None, num_heads: int | None = None,
                v_scale: int | None = None, hidden_features: int | None = None) -> Tensor:
        children = self.child_configs(self.resolve(embed_dim=embed_dim, num_heads=num_heads, v_scale=v_scale,
                                                   hidden_features=hidden_features))
        x = x + drop_path(self.attn(self.norm1(x, **children["norm1"]), **children["attn"]), self.drop_path,
                          self.training)
        return x + drop_path(self.mlp(self.norm2(x, **children["norm2"]), **children["mlp"]), self.drop_path,
                             self.training)

    def extract(self) -> plain_hybrid.VScaleBlock:
        config, attn = self.active, self.attn
        return self.extract_children(empty_module(lambda: plain_hybrid.VScaleBlock(
            config["embed_dim"], config["num_heads"], attn.head_dim, config["v_scale"], config["hidden_features"],
            eps=self.norm1.eps, qkv_bias=attn.qkv.bias is not None, value_conv=attn.v_conv is not None,
            max_grid=attn.max_grid, activation=self.mlp.activation, norm=self.norm), self.norm1.weight))


# --- UniNet's downsampling modules (DSMs) between stages: feature map [B, C, H, W] in ---------------------------

class ElasticSeparableDownsample(ElasticComposite):
    """UniNet's local downsampling path (:class:`elastic_ops.plain_hybrid.SeparableDownsample`): a 3x3 depthwise
    conv with ``stride`` and bias, BatchNorm, a 1x1 conv with bias; elastic ``in_channels`` and ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.conv_dw = ElasticDepthwiseConv2d(in_channels, 3, stride, bias=True, **factory)
        self.bn = ElasticBatchNorm2d(in_channels, **factory)
        self.conv_pw = ElasticConv2d(in_channels, out_channels, **factory)
        self.active = self.max_config()

    def max_config(self) -> dict[str, int]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels}

    def child_configs(self, config: dict[str, int]) -> dict[str, dict[str, int]]:
        return {"conv_dw": {"channels": config["in_channels"]}, "bn": {"num_features": config["in_channels"]},
                "conv_pw": {"in_channels": config["in_channels"], "out_channels": config["out_channels"]}}

    def forward(self, x: Tensor, in_channels: int | None = None, out_channels: int | None = None) -> Tensor:
        children = self.child_configs(self.resolve(in_channels=in_channels, out_channels=out_channels))
        return self.conv_pw(self.bn(self.conv_dw(x, **children["conv_dw"]), **children["bn"]), **children["conv_pw"])

    def extract(self) -> plain_hybrid.SeparableDownsample:
        return self.extract_children(empty_module(lambda: plain_hybrid.SeparableDownsample(
            self.active["in_channels"], self.active["out_channels"], self.stride), self.conv_dw.weight))


def _pooled(x: Tensor, stride: int) -> Tensor:
    """The input of a DSM's shortcut conv: UniNet's max-pool, none at stride 1."""
    return x if stride == 1 else max_pool(x, stride)


class ElasticLocalDSM(ElasticComposite):
    """UniNet's local DSM (:class:`elastic_ops.plain_hybrid.LocalDSM`), feature maps in and out:
    ``downsample(x) + shortcut(max_pool(x))``; elastic ``in_channels`` and ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2, device=None, dtype=None):
        super().__init__()
        self.stride = stride
        self.downsample = ElasticSeparableDownsample(in_channels, out_channels, stride, device=device, dtype=dtype)
        self.shortcut = ElasticConv2d(in_channels, out_channels, device=device, dtype=dtype)
        self.active = self.max_config()

    def max_config(self) -> dict[str, int]:
        return self.downsample.max_config()

    def child_configs(self, config: dict[str, int]) -> dict[str, dict[str, int]]:
        return {"downsample": dict(config), "shortcut": dict(config)}

    def forward(self, x: Tensor, in_channels: int | None = None, out_channels: int | None = None) -> Tensor:
        config = self.resolve(in_channels=in_channels, out_channels=out_channels)
        self.check_channels(x, config["in_channels"], "in_channels")
        return self.downsample(x, **config) + self.shortcut(_pooled(x, self.stride), **config)

    def extract(self) -> plain_hybrid.LocalDSM:
        return self.extract_children(empty_module(lambda: plain_hybrid.LocalDSM(
            self.active["in_channels"], self.active["out_channels"], self.stride), self.shortcut.weight))


class ElasticAttentionDSM(ElasticComposite):
    """What the attention DSMs share (:class:`elastic_ops.plain_hybrid.AttentionDSM`): keys and values from all input
    tokens (``kv_norm``, then ``kv``: the k block, then the v block, ``H * head_dim`` rows each), ``num_heads`` of a
    fixed ``head_dim``, the projection ``proj`` to ``out_channels`` and the shortcut of :class:`ElasticLocalDSM`.
    Elastic ``in_channels``, ``out_channels`` and ``num_heads``; feature map in, tokens out. Subclasses give the
    queries."""

    plain_type: type[plain_hybrid.AttentionDSM]

    def __init__(self, in_channels: int, out_channels: int, num_heads: int, head_dim: int = 32, stride: int = 2,
                 qkv_bias: bool = True, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.in_channels, self.out_channels, self.num_heads = in_channels, out_channels, num_heads
        self.head_dim, self.stride = head_dim, stride
        self.kv_norm = ElasticLayerNorm(in_channels, eps=eps, **factory)
        self.kv = ElasticLinear(in_channels, 2 * num_heads * head_dim, bias=qkv_bias, **factory)
        self.proj = ElasticLinear(num_heads * head_dim, out_channels, **factory)
        self.shortcut = ElasticConv2d(in_channels, out_channels, **factory)

    def max_config(self) -> dict[str, int]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "num_heads": self.num_heads}

    def child_configs(self, config: dict[str, int]) -> dict[str, dict[str, int]]:
        # kv's active rows are two blocks, not one leading slice: extract() takes them itself.
        in_channels, out_channels = config["in_channels"], config["out_channels"]
        return {"kv_norm": {"dim": in_channels},
                "proj": {"in_features": config["num_heads"] * self.head_dim, "out_features": out_channels},
                "shortcut": {"in_channels": in_channels, "out_channels": out_channels}}

    def queries(self, x: Tensor, config: dict[str, int]) -> Tensor:
        """The queries ``[B, H' * W', heads * head_dim]`` of the output tokens."""
        raise NotImplementedError

    def forward(self, x: Tensor, in_channels: int | None = None, out_channels: int | None = None,
                num_heads: int | None = None) -> Tensor:
        config = self.resolve(in_channels=in_channels, out_channels=out_channels, num_heads=num_heads)
        self.check_channels(x, config["in_channels"], "in_channels")
        children = self.child_configs(config)
        width = config["num_heads"] * self.head_dim
        tokens = self.kv_norm(to_tokens(x), **children["kv_norm"])
        k = linear_rows(tokens, self.kv, 0, width)
        v = linear_rows(tokens, self.kv, self.num_heads * self.head_dim, width)
        context = attention_context(self.queries(x, config), k, v, config["num_heads"])
        shortcut = self.shortcut(_pooled(x, self.stride), **children["shortcut"])
        return self.proj(context, **children["proj"]) + to_tokens(shortcut)

    def extract(self) -> plain_hybrid.AttentionDSM:
        config = self.active
        dsm = self.extract_children(empty_module(lambda: self.plain_type(
            config["in_channels"], config["out_channels"], config["num_heads"], self.head_dim, self.stride,
            qkv_bias=self.kv.bias is not None, eps=self.kv_norm.eps), self.kv.weight))
        width = config["num_heads"] * self.head_dim
        dsm.kv = extract_row_blocks(self.kv, [(0, width), (self.num_heads * self.head_dim, width)],
                                    config["in_channels"])
        return dsm


class ElasticLocalGlobalDSM(ElasticAttentionDSM):
    """UniNet's local-global DSM (:class:`elastic_ops.plain_hybrid.LocalGlobalDSM`): queries from the local path
    ``q`` (an :class:`ElasticSeparableDownsample` to ``heads * head_dim`` channels) and ``q_norm``, keys and values from
    all input tokens (:class:`ElasticAttentionDSM`). UniNet has ``heads * head_dim == out_channels``."""

    plain_type = plain_hybrid.LocalGlobalDSM

    def __init__(self, in_channels: int, out_channels: int, num_heads: int, head_dim: int = 32, stride: int = 2,
                 qkv_bias: bool = True, eps: float = 1e-5, device=None, dtype=None):
        super().__init__(in_channels, out_channels, num_heads, head_dim, stride, qkv_bias, eps, device, dtype)
        width = num_heads * head_dim
        self.q = ElasticSeparableDownsample(in_channels, width, stride, device=device, dtype=dtype)
        self.q_norm = ElasticLayerNorm(width, eps=eps, device=device, dtype=dtype)
        self.active = self.max_config()

    def child_configs(self, config: dict[str, int]) -> dict[str, dict[str, int]]:
        width = config["num_heads"] * self.head_dim
        return {**super().child_configs(config), "q": {"in_channels": config["in_channels"], "out_channels": width},
                "q_norm": {"dim": width}}

    def queries(self, x: Tensor, config: dict[str, int]) -> Tensor:
        children = self.child_configs(config)
        return self.q_norm(to_tokens(self.q(x, **children["q"])), **children["q_norm"])


class ElasticGlobalDSM(ElasticAttentionDSM):
    """A global DSM (:class:`elastic_ops.plain_hybrid.GlobalDSM`): the queries are every ``stride``-th input token in
    each direction, normalised by ``kv_norm`` and projected by the linear ``q``; keys and values come from all input
    tokens (:class:`ElasticAttentionDSM`), as in LeViT's subsampling attention."""

    plain_type = plain_hybrid.GlobalDSM

    def __init__(self, in_channels: int, out_channels: int, num_heads: int, head_dim: int = 32, stride: int = 2,
                 qkv_bias: bool = True, eps: float = 1e-5, device=None, dtype=None):
        super().__init__(in_channels, out_channels, num_heads, head_dim, stride, qkv_bias, eps, device, dtype)
        self.q = ElasticLinear(in_channels, num_heads * head_dim, bias=qkv_bias, device=device, dtype=dtype)
        self.active = self.max_config()

    def child_configs(self, config: dict[str, int]) -> dict[str, dict[str, int]]:
        return {**super().child_configs(config),
                "q": {"in_features": config["in_channels"], "out_features": config["num_heads"] * self.head_dim}}

    def queries(self, x: Tensor, config: dict[str, int]) -> Tensor:
        children = self.child_configs(config)
        strided = to_tokens(x[:, :, ::self.stride, ::self.stride])
        return self.q(self.kv_norm(strided, **children["kv_norm"]), **children["q"])


__all__ = ["ElasticAttentionDSM", "ElasticGlobalDSM", "ElasticLocalDSM", "ElasticLocalGlobalDSM", "ElasticMixerBlock",
           "ElasticPositionalAttentionBlock", "ElasticSampleLayerNorm", "ElasticSeparableDownsample",
           "ElasticVScaleAttention", "ElasticVScaleBlock", "TOKEN_NORMS", "attention_context", "extract_row_blocks",
           "linear_rows"]
