"""Drop-in elastic layers: nn.Modules that hold the super weights and run an active configuration through the elastic
ops.

Each layer has an active configuration (a few ints, all at their maximum after construction), set with
``set_active(...)`` or overridden for one call by keyword arguments of ``forward``. The parameters keep
their full super size; the ops read the active leading block in place (DESIGN.md section 2).
``grouped_forward`` runs K subnets at once on stacked activations ``[K, ..., E]`` whose padding past each
subnet's size is zero, with a ``GroupSizes`` per elastic dimension (DESIGN.md section 3, batched mode), through the
grouped ops; it is for inference (no drop-path).
``extract()`` returns the plain PyTorch module (``elastic_ops.plain``, ``nn.Linear``, ``nn.LayerNorm``)
of the active configuration, holding copies of the active weights. Parameter names follow torch and timm,
so at full width a layer's ``state_dict`` loads into the plain module and back.

Two-sided width sharing (BCNet, as ViTAS trains): each elastic width of the ViT layers may be read from the leading
channels (``"left"``, the default) or the trailing ones (``"right"``): ``set_side(...)`` per dimension, or one side
for all. A right-side block is the strided view ``W[-out:, -in:]`` of the super weight, passed to the same ops (no
copy); its gradient lands in place in the same view of ``param.grad`` (``elastic_ops._weight_grads``). The grouped
(K subnet) passes read leading slices only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import plain
from ._validate import FLOAT_DTYPES
from .functional import (
    elastic_attention,
    elastic_layer_norm,
    elastic_linear,
    elastic_mlp,
    grouped_attention,
    grouped_layer_norm,
    grouped_linear,
    grouped_mlp,
)
from .group_sizes import GroupSizes


def drop_path(x: Tensor, prob: float, training: bool) -> Tensor:
    """Stochastic depth: zero a residual branch per sample with probability ``prob``, scaling the kept ones."""
    if prob == 0.0 or not training:
        return x
    keep = 1.0 - prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


def empty_module(factory, like: Tensor) -> nn.Module:
    """``factory()`` built on the meta device, then given uninitialised storage on ``like``'s device and dtype:
    extraction overwrites every value, so the usual initialisation would be wasted time."""
    with torch.device("meta"):
        module = factory()
    return module.to_empty(device=like.device).to(like.dtype)


SIDES = ("left", "right")


def side_span(size: int, maximum: int, side: str) -> slice:
    """The channels of ``maximum`` that a width of ``size`` reads: the first ``size`` (``"left"``) or the last."""
    return slice(0, size) if side == "left" else slice(maximum - size, maximum)


def side_view(tensor: Tensor | None, sizes: tuple[int, ...], sides: tuple[str, ...]) -> Tensor | None:
    """What an op receives for ``tensor`` with active ``sizes`` on ``sides`` (one per leading dimension): the tensor
    itself where every side is left (the ops read its leading block), else the strided view of the active block."""
    if tensor is None or all(side == "left" for side in sides):
        return tensor
    return tensor[tuple(side_span(n, m, side) for n, m, side in zip(sizes, tensor.shape, sides))]


def _copy_slice(target: Tensor, source: Tensor, sides: tuple[str, ...] = ()) -> None:
    """Copy the active block of ``source`` with ``target``'s shape into ``target``: leading, or on ``sides`` for its
    first dimensions."""
    sides = tuple(sides) + ("left",) * (target.dim() - len(sides))
    with torch.no_grad():
        target.copy_(source[tuple(side_span(n, m, side) for n, m, side in zip(target.shape, source.shape, sides))])


class ElasticModule(nn.Module):
    """Base of the elastic layers: an active configuration of named sizes, each in ``1..max_config()[name]``."""

    active: dict[str, int]
    sides: dict[str, str] = {}  # per dimension of max_config(); missing ones are "left" (replaced, never mutated)
    two_sided: ClassVar[bool] = False  # whether set_side may choose the right side (the ViT layers)

    def max_config(self) -> dict[str, int]:
        """The largest configuration: the sizes of the super weights."""
        raise NotImplementedError

    def resolve(self, **overrides: int | None) -> dict[str, int]:
        """The active configuration with ``overrides`` (None keeps the active value), validated."""
        name = type(self).__name__
        maximum = self.max_config()
        unknown = set(overrides) - set(maximum)
        if unknown:
            raise TypeError(f"{name}: unknown configuration key(s) {sorted(unknown)}; expected some of "
                            f"{sorted(maximum)}")
        config = dict(self.active)
        config.update({key: value for key, value in overrides.items() if value is not None})
        for key, value in config.items():
            # A SymInt: a size that torch.compile traces as a symbol (so a new subnet does not recompile).
            if not isinstance(value, (int, torch.SymInt)) or isinstance(value, bool):
                raise TypeError(f"{name}: {key} must be an int, got {value!r}")
            if not 1 <= value <= maximum[key]:
                raise ValueError(f"{name}: {key}={value} is outside 1..{maximum[key]} (the super weight's size)")
        return config

    def set_active(self, **config: int | None):
        """Make ``config`` (a subset of the keys of ``max_config()``) the active configuration; returns self."""
        self.active = self.resolve(**config)
        return self

    def set_side(self, side: str | None = None, **sides: str):
        """Read the named widths (keys of ``max_config()``) from their leading (``"left"``) or trailing
        (``"right"``) channels; ``side`` sets every width first. Returns self."""
        name = type(self).__name__
        if not self.two_sided:
            raise TypeError(f"{name} reads leading channels only; two-sided width sharing covers the ViT layers")
        unknown = set(sides) - set(self.max_config())
        if unknown:
            raise TypeError(f"{name}: unknown width(s) {sorted(unknown)}; expected some of {sorted(self.max_config())}")
        chosen = dict.fromkeys(self.max_config(), side) if side is not None else dict(self.sides)
        chosen.update(sides)
        for key, value in chosen.items():
            if value not in SIDES:
                raise ValueError(f"{name}: the side of {key} must be one of {SIDES}, got {value!r}")
        self.sides = chosen
        self.sides_changed()
        return self

    def side(self, key: str) -> str:
        return self.sides.get(key, "left")

    def sides_changed(self) -> None:
        """Pass the sides on to child layers (composite layers override this)."""

    def check_leading(self, what: str) -> None:
        """Raise if some width reads its trailing channels: ``what`` reads leading slices only."""
        right = sorted(key for key, side in self.sides.items() if side == "right")
        if right:
            raise ValueError(f"{type(self).__name__}: {what} reads leading channels only, but {right} are set to the "
                             "right side; set_side('left') first")

    def check_width(self, x: Tensor, width: int, what: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != width:
            raise ValueError(f"{type(self).__name__}: input has shape {tuple(x.shape)} but the active {what} is "
                             f"{width}; call set_active({what}=...) or pass it to forward")

    def check_channels(self, x: Tensor, channels: int, what: str) -> None:
        """``x`` must be ``[batch, channels, height, width]`` (the layout of the conv layers)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:  # as the elastic ops refuse it: torch's conv would read ints as weights' type
            raise TypeError(f"{type(self).__name__}: input must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{type(self).__name__}: input has shape {tuple(x.shape)} but expected [batch, "
                             f"{channels}, height, width] (the active {what} is {channels}); call "
                             f"set_active({what}=...) or pass it to forward")

    def extra_repr(self) -> str:
        maximum = self.max_config()
        return ", ".join(f"{key}={self.active[key]}/{maximum[key]}" for key in maximum)


class ElasticLinear(ElasticModule):
    """``nn.Linear`` over ``weight[:out_features, :in_features]`` and ``bias[:out_features]``."""

    two_sided = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()
        self.active = self.max_config()

    def reset_parameters(self) -> None:
        """The initialisation of ``nn.Linear``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def max_config(self) -> dict[str, int]:
        return {"in_features": self.in_features, "out_features": self.out_features}

    def forward(self, x: Tensor, in_features: int | None = None, out_features: int | None = None) -> Tensor:
        config = self.resolve(in_features=in_features, out_features=out_features)
        self.check_width(x, config["in_features"], "in_features")
        out_features, sides = config["out_features"], self.weight_sides()
        return elastic_linear(x, side_view(self.weight, (out_features, config["in_features"]), sides),
                              side_view(self.bias, (out_features,), sides), out_features)

    def weight_sides(self) -> tuple[str, str]:
        """(side of the rows, side of the columns) of the weight."""
        return self.side("out_features"), self.side("in_features")

    def extract(self) -> nn.Linear:
        out_features, in_features = self.active["out_features"], self.active["in_features"]
        linear = empty_module(lambda: nn.Linear(in_features, out_features, bias=self.bias is not None), self.weight)
        _copy_slice(linear.weight, self.weight, self.weight_sides())
        if self.bias is not None:
            _copy_slice(linear.bias, self.bias, self.weight_sides())
        return linear


class ElasticLayerNorm(ElasticModule):
    """LayerNorm over the first ``dim`` channels with ``weight[:dim]``, ``bias[:dim]``."""

    two_sided = True

    def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True, device=None, dtype=None):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype)) if elementwise_affine else None
        self.active = self.max_config()

    def max_config(self) -> dict[str, int]:
        return {"dim": self.dim}

    def forward(self, x: Tensor, dim: int | None = None) -> Tensor:
        dim = self.resolve(dim=dim)["dim"]
        self.check_width(x, dim, "dim")
        sides = (self.side("dim"),)
        return elastic_layer_norm(x, side_view(self.weight, (dim,), sides), side_view(self.bias, (dim,), sides),
                                  self.eps)

    def grouped_forward(self, x: Tensor, sizes: GroupSizes) -> Tensor:
        """K subnets, each normalised over its own ``sizes`` channels of ``x [K, ..., sizes.width]``."""
        self.check_leading("grouped_forward")
        return grouped_layer_norm(x, sizes, self.weight, self.bias, self.eps)

    def extract(self) -> nn.LayerNorm:
        norm = nn.LayerNorm(self.active["dim"], eps=self.eps, elementwise_affine=self.weight is not None)
        if self.weight is not None:
            norm = norm.to(self.weight.device, self.weight.dtype)
            _copy_slice(norm.weight, self.weight, (self.side("dim"),))
            _copy_slice(norm.bias, self.bias, (self.side("dim"),))
        return norm


class ElasticMlp(ElasticModule):
    """timm's Mlp, ``fc2(act(fc1(x)))``, over ``fc1.weight[:hidden, :e]`` and ``fc2.weight[:e, :hidden]``.

    ``activation``: a name of ``plain.ACTIVATIONS``. Exact GELU (the default) runs the fused MLP op; any other runs
    two elastic linears with the activation in torch between them.
    """

    two_sided = True

    def __init__(self, embed_dim: int, hidden_features: int, bias: bool = True, device=None, dtype=None,
                 activation: str = "gelu"):
        super().__init__()
        self.fc1 = ElasticLinear(embed_dim, hidden_features, bias=bias, device=device, dtype=dtype)
        self.act = plain.make_activation(activation)
        self.activation = activation
        self.fc2 = ElasticLinear(hidden_features, embed_dim, bias=bias, device=device, dtype=dtype)
        self.active = self.max_config()

    def max_config(self) -> dict[str, int]:
        return {"embed_dim": self.fc1.in_features, "hidden_features": self.fc1.out_features}

    def set_active(self, **config: int | None):
        super().set_active(**config)
        embed_dim, hidden = self.active["embed_dim"], self.active["hidden_features"]
        self.fc1.set_active(in_features=embed_dim, out_features=hidden)
        self.fc2.set_active(in_features=hidden, out_features=embed_dim)
        return self

    def sides_changed(self) -> None:
        embed, hidden = self.side("embed_dim"), self.side("hidden_features")
        self.fc1.set_side(in_features=embed, out_features=hidden)
        self.fc2.set_side(in_features=hidden, out_features=embed)

    def forward(self, x: Tensor, embed_dim: int | None = None, hidden_features: int | None = None) -> Tensor:
        config = self.resolve(embed_dim=embed_dim, hidden_features=hidden_features)
        e, hidden = config["embed_dim"], config["hidden_features"]
        self.check_width(x, e, "embed_dim")
        if self.activation == "gelu":
            sides = (self.side("hidden_features"), self.side("embed_dim"))
            return elastic_mlp(x, side_view(self.fc1.weight, (hidden, e), sides),
                               side_view(self.fc1.bias, (hidden,), sides),
                               side_view(self.fc2.weight, (e, hidden), sides[::-1]),
                               side_view(self.fc2.bias, (e,), sides[::-1]), hidden)
        return self.fc2(self.act(self.fc1(x, in_features=e, out_features=hidden)), in_features=hidden,
                        out_features=e)

    def grouped_forward(self, x: Tensor, sizes: GroupSizes, hidden: GroupSizes) -> Tensor:
        """K subnets with embed dims ``sizes`` and hidden widths ``hidden`` on ``x [K, ..., sizes.width]``."""
        self.check_leading("grouped_forward")
        if self.activation == "gelu":
            return grouped_mlp(x, sizes, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, hidden)
        # Every activation offered maps 0 to 0, so the zero padding past each subnet's hidden width stays zero.
        return grouped_linear(self.act(grouped_linear(x, self.fc1.weight, self.fc1.bias, hidden)), self.fc2.weight,
                              self.fc2.bias, sizes)

    def extract(self) -> plain.Mlp:
        self.set_active()  # the children's configurations follow this layer's
        mlp = empty_module(lambda: plain.Mlp(self.active["embed_dim"], self.active["hidden_features"],
                                             bias=self.fc1.bias is not None, activation=self.activation),
                           self.fc1.weight)
        mlp.fc1, mlp.fc2 = self.fc1.extract(), self.fc2.extract()
        return mlp


@dataclass(frozen=True)
class QkGroup:
    """Subnets of a grouped pass whose q and k come from one weight: the shared qkv rows (``private_heads`` None) or
    the private projections of one head count; ``subnets`` indexes them among the pass's subnets (None: all), and
    ``width`` is their q/k width (heads times head dim)."""

    private_heads: int | None
    subnets: Tensor | None
    width: GroupSizes


class ElasticAttention(ElasticModule):
    """timm's Attention with ``num_heads`` of the super weight's heads active (block qkv layout) on ``embed_dim``
    channels.

    ``qkv.weight: [3 * max_heads * head_dim, embed_dim]`` holds the q, k and v blocks one after another,
    as timm's qkv does; ``proj.weight: [embed_dim, max_heads * head_dim]``.

    ``private_qk_heads`` (ViTAS): head counts with their own q and k projections,
    ``private_qk[str(h)].weight: [2 * block, embed_dim]`` (a block of q rows, then one of k rows; ``block`` is
    ``private_qk_width``, by default ``h * head_dim``). With such a head count active, q and k come from the leading
    rows of each block of that weight and v from the shared qkv weight's v block; other head counts use the shared q
    and k blocks as usual.

    ``attn_dim`` (ViTAS's attention width, a size of its own): the active q/k/v width, any multiple of the head count
    up to ``num_heads * head_dim``, so that a head has ``attn_dim // num_heads`` channels; None (the default) ties it to
    the head count, ``num_heads * head_dim``. The fused op runs a head dim that divides the stored width (the block
    layout it reads), choosing its backend per head dim as always (the Triton kernels tile powers of two); other head
    dims go the unfused way. ``set_active`` without ``attn_dim``, and ``forward`` given a head count without one,
    tie the width again.

    ``relative_position`` (AutoFormer): 0 for none, else the largest row/column distance of the 2D relative
    position tables ``rel_pos`` (:class:`elastic_ops.plain.RelativePosition2D`, shared by the heads, of width
    ``head_dim``). The input is then a class token plus a square grid of patches; the tables are indexed by
    distance, so every grid size (patch size) uses the same ones.

    SAM's image encoder (Kirillov et al. 2023): the input is a square ``grid x grid`` of patches and no class token.
    ``window_size > 0`` partitions it into ``window_size x window_size`` windows (zero-padded at the bottom and right
    to a multiple, as SAM pads) that attend within themselves; ``decomposed_rel_pos`` adds SAM's (MViTv2's)
    decomposed relative position to the logits, ``q . rel_pos_h[i_q - i_k + s - 1] + q . rel_pos_w[j_q - j_k + s - 1]``
    over the unscaled q, with tables ``[2 s - 1, head_dim]`` shared by the heads, ``s`` the window's side (the
    grid's without windows).

    ``qkv_bias_layout``: where the q, k and v biases of ``h`` active heads are. ``"blocks"``: the leading
    ``h * head_dim`` entries of each of the three blocks, as the weight rows. ``"autoformer"``: one leading block
    ``bias[:3 * h * head_dim]`` (q, k, v one after another), as AutoFormer's ``qkv_super`` slices it while it gathers
    the weight rows; so the k and v biases move with the head count. The three biases are read from where they are at
    each call (a few hundred numbers; the weights are not copied); a grouped pass of several head counts goes the
    unfused way, adding each subnet's own.
    """

    two_sided = True
    QKV_BIAS_LAYOUTS = ("blocks", "autoformer")

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int = 64, qkv_bias: bool = True, device=None,
                 dtype=None, private_qk_heads: tuple[int, ...] = (), relative_position: int = 0, grid: int = 0,
                 window_size: int = 0, decomposed_rel_pos: bool = False, qkv_bias_layout: str = "blocks",
                 private_qk_width: int | None = None):
        super().__init__()
        if (window_size or decomposed_rel_pos) and (grid < 1 or relative_position or private_qk_heads):
            raise ValueError("ElasticAttention: windows and decomposed relative position need the grid side (grid >= "
                             "1) and neither AutoFormer's relative position nor private q/k")
        if qkv_bias_layout not in self.QKV_BIAS_LAYOUTS:
            raise ValueError(f"ElasticAttention: qkv_bias_layout must be one of {self.QKV_BIAS_LAYOUTS}, "
                             f"got {qkv_bias_layout!r}")
        if qkv_bias_layout == "autoformer" and (private_qk_heads or window_size):
            raise ValueError("ElasticAttention: AutoFormer's qkv bias layout goes with neither private q/k nor windows")
        self.qkv_bias_layout = qkv_bias_layout
        self.grid, self.window_size = int(grid), int(window_size)
        side = self.window_size or self.grid
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * side - 1, head_dim, device=device, dtype=dtype)) \
            if decomposed_rel_pos else None
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * side - 1, head_dim, device=device, dtype=dtype)) \
            if decomposed_rel_pos else None
        if not isinstance(relative_position, int) or isinstance(relative_position, bool) or relative_position < 0:
            raise ValueError(f"ElasticAttention: relative_position must be an int >= 0 (0: off), "
                             f"got {relative_position!r}")
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.private_qk_heads = tuple(sorted({int(h) for h in private_qk_heads}))
        bad = [h for h in self.private_qk_heads if not 1 <= h <= num_heads]
        if bad:
            raise ValueError(f"ElasticAttention: private_qk_heads {bad} are outside 1..{num_heads} (num_heads)")
        self.qkv = ElasticLinear(embed_dim, 3 * num_heads * head_dim, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = ElasticLinear(num_heads * head_dim, embed_dim, device=device, dtype=dtype)
        if private_qk_width is not None and not 1 <= private_qk_width <= num_heads * head_dim:
            raise ValueError(f"ElasticAttention: private_qk_width={private_qk_width} is outside "
                             f"1..{num_heads * head_dim}")
        self.private_qk_width = private_qk_width
        self.private_qk = nn.ModuleDict({
            str(h): ElasticLinear(embed_dim, 2 * (private_qk_width or h * head_dim), bias=qkv_bias, device=device,
                                  dtype=dtype)
            for h in self.private_qk_heads
        }) if self.private_qk_heads else None
        self.relative_position = relative_position
        self.rel_pos = (plain.RelativePosition2D(head_dim, relative_position).to(device, dtype)
                        if relative_position else None)
        self.active = self.max_config()
        self.attn_dim: int | None = None  # the active width; None: num_heads * head_dim

    def max_config(self) -> dict[str, int]:
        return {"embed_dim": self.qkv.in_features, "num_heads": self.num_heads}

    def set_active(self, attn_dim: int | None = None, **config: int | None):
        widths = self.widths(self.resolve(**config)["num_heads"], attn_dim)  # checked before anything changes
        super().set_active(**config)
        self.attn_dim = attn_dim
        # The qkv rows of the active heads are not one leading block: extract() slices each of q, k, v.
        self.proj.set_active(in_features=widths[0], out_features=self.active["embed_dim"])
        return self

    def widths(self, heads: int, attn_dim: int | None) -> tuple[int, int]:
        """``(attention width, head dim)`` of ``heads`` heads over ``attn_dim`` channels (None: the fixed head dim)."""
        if attn_dim is None:
            return heads * self.head_dim, self.head_dim
        max_width = self.num_heads * self.head_dim
        if not isinstance(attn_dim, int) or isinstance(attn_dim, bool) or not 1 <= attn_dim <= max_width \
                or attn_dim % heads:
            raise ValueError(f"ElasticAttention: attn_dim={attn_dim!r} must be a multiple of num_heads={heads} in "
                             f"1..{max_width} (the stored width)")
        return attn_dim, attn_dim // heads

    def _fused_takes(self, head_dim: int) -> bool:
        """Whether the fused op's block layout ``[3 * H * Dh, E]`` holds heads of ``head_dim`` channels."""
        return (self.num_heads * self.head_dim) % head_dim == 0

    def sides_changed(self) -> None:
        embed, heads = self.side("embed_dim"), self.side("num_heads")
        if heads == "right" and self.qkv_bias_layout == "autoformer":
            raise ValueError("ElasticAttention: AutoFormer's qkv bias layout has no trailing heads (side 'right')")
        self.qkv.set_side(in_features=embed)  # its rows: three blocks, see _qkv_rows
        self.proj.set_side(in_features=heads, out_features=embed)
        for private in (self.private_qk or {}).values():
            private.set_side(in_features=embed)  # its rows: a q block and a k block, read in _unfused_attention

    def forward(self, x: Tensor, embed_dim: int | None = None, num_heads: int | None = None,
                attn_dim: int | None = None) -> Tensor:
        # One resolve of both sizes: resolving one alone would check the other's active value, which torch.compile
        # would then guard on (a recompile per head count).
        config = self.resolve(embed_dim=embed_dim, num_heads=num_heads)
        e, heads = config["embed_dim"], config["num_heads"]
        width, head_dim = self.widths(heads, self.attn_dim if num_heads is None and attn_dim is None else attn_dim)
        self.check_width(x, e, "embed_dim")
        if x.dim() != 3:
            raise ValueError(f"ElasticAttention: input must be [batch, tokens, embed_dim], got shape {tuple(x.shape)}")
        x, unpartition = self._windows(x)
        # The fused op reads the leading heads of each of q, k and v; the trailing heads go the unfused way.
        if (heads in self.private_qk_heads or self.rel_pos is not None or self.rel_pos_h is not None
                or self.side("num_heads") == "right" or not self._fused_takes(head_dim)):
            return unpartition(self._unfused_attention(x, heads, width, head_dim))
        embed_side = (self.side("embed_dim"),)
        qkv_weight = side_view(self.qkv.weight, (self.qkv.out_features, e), ("left",) + embed_side)
        proj_weight = side_view(self.proj.weight, (e,), embed_side)
        proj_bias = side_view(self.proj.bias, (e,), embed_side)
        return unpartition(elastic_attention(x, qkv_weight, self._blocks_bias(width), proj_weight, proj_bias, heads,
                                             head_dim))

    def _blocks_bias(self, width: int) -> Tensor | None:
        """``qkv.bias`` as the fused op reads it (the block layout) for an active ``width``: itself, or AutoFormer's
        leading ``3 * width`` entries moved to the leading entries of the three blocks (a few hundred numbers, through
        autograd)."""
        bias = self.qkv.bias
        if bias is None or self.qkv_bias_layout == "blocks":
            return bias
        max_width = self.num_heads * self.head_dim
        return F.pad(bias[:3 * width].view(3, width), (0, max_width - width)).reshape(-1)

    def _windows(self, x: Tensor):
        """``x [..., grid * grid, E]`` as windows ``[..., windows * batch, w * w, E]`` (the leading dim before the
        batch kept: a grouped pass's subnets), and the function that puts the output back; no windows: ``x`` and
        the identity."""
        if not self.window_size:
            return x, lambda out: out
        *lead, tokens, width = x.shape
        grid, w = self.grid, self.window_size
        if tokens != grid * grid:
            raise ValueError(f"ElasticAttention: windowed attention needs {grid} x {grid} tokens, got {tokens}")
        pad = (w - grid % w) % w
        side = grid + pad
        images = F.pad(x.reshape(-1, grid, grid, width), (0, 0, 0, pad, 0, pad))
        n = side // w
        windows = images.view(-1, n, w, n, w, width).transpose(2, 3).reshape(*lead[:-1], -1, w * w, width)

        def unpartition(out: Tensor) -> Tensor:
            full = out.reshape(-1, n, n, w, w, out.shape[-1]).transpose(2, 3).reshape(-1, side, side, out.shape[-1])
            return full[:, :grid, :grid].reshape(*lead, tokens, out.shape[-1])
        return windows, unpartition

    # The fused op reads q, k and v from one weight in block layout and has no attention-bias path. Private q/k
    # weights and the shared v block are different tensors, which no strided view joins without a copy, and the
    # relative position adds terms to the logits and the context; in a grouped pass AutoFormer's bias layout gives each
    # head count its own k and v biases. So the unfused paths: elastic (or grouped) linears
    # for q, k and v (in place on their super weights), the attention math in torch (``_attend``), and an elastic
    # linear for the projection. Row blocks of qkv.weight are views, not leaves: their gradients reach
    # qkv.weight.grad through autograd.

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``softmax(q k^T / sqrt(Dh) (+ relative position)) v`` of ``[batch, heads, tokens, head_dim]`` tensors."""
        scale = q.shape[-1] ** -0.5
        if self.rel_pos_h is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self._decomposed_bias(q), scale=scale)
        if self.rel_pos is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        rel_k, rel_v = self.rel_pos(q.shape[2])
        return plain.relative_attention(q, k, v, rel_k.to(q.dtype), rel_v.to(q.dtype), scale)

    def _qkv_rows(self, width: int, block: int | None = None) -> int:
        """The first row, within each block of ``block`` rows (those of ``qkv.weight``'s q, k and v by default), of
        an active ``width``."""
        block = self.num_heads * self.head_dim if block is None else block
        return block - width if self.side("num_heads") == "right" else 0

    def _bias_start(self, part: int, width: int) -> int:
        """The first entry of ``qkv.bias`` that part ``part`` (0: q, 1: k, 2: v) of an active ``width`` reads."""
        if self.qkv_bias_layout == "autoformer":
            return part * width
        return part * self.num_heads * self.head_dim + self._qkv_rows(width)

    def _grouped_bias(self, width: GroupSizes, part: int, dtype: torch.dtype) -> Tensor:
        """AutoFormer's bias of part ``part`` for each subnet of a grouped pass, ``[K, 1, 1, width]``, zero past a
        subnet's ``width`` channels."""
        active = width.table.to(torch.long)[:, None]
        channel = torch.arange(width.width, device=active.device)
        entries = self.qkv.bias[(part * active + channel).clamp(max=self.qkv.bias.shape[0] - 1)]
        return torch.where(channel < active, entries, 0).to(dtype)[:, None, None]

    def _decomposed_bias(self, q: Tensor) -> Tensor:
        """SAM's decomposed relative position of ``q [batch, heads, s * s, head_dim]``: logits ``[.., s*s, s*s]``."""
        side = math.isqrt(q.shape[2])
        index = torch.arange(side, device=q.device)
        offsets = index[:, None] - index[None, :] + self.rel_pos_h.shape[0] // 2  # i_q - i_k + s - 1
        grid_q = q.reshape(*q.shape[:2], side, side, q.shape[-1])
        rows = torch.einsum("bnhwc,hkc->bnhwk", grid_q, self.rel_pos_h[offsets].to(q.dtype))
        cols = torch.einsum("bnhwc,wkc->bnhwk", grid_q, self.rel_pos_w[offsets].to(q.dtype))
        return (rows[..., :, None] + cols[..., None, :]).reshape(*q.shape[:2], side * side, side * side)

    def _unfused_attention(self, x: Tensor, heads: int, width: int, head_dim: int) -> Tensor:
        batch, tokens, embed_dim = x.shape
        max_width = self.num_heads * self.head_dim
        weight, bias = self.qkv.weight, self.qkv.bias
        embed_side = self.side("embed_dim")

        def project(source_weight: Tensor, source_bias: Tensor | None, start: int,
                    bias_start: int | None = None) -> Tensor:
            bias_start = start if bias_start is None else bias_start
            rows = side_view(source_weight[start:start + width], (width, embed_dim), ("left", embed_side))
            rows = elastic_linear(x, rows, None if source_bias is None else
                                  source_bias[bias_start:bias_start + width], width)
            return rows.view(batch, tokens, heads, head_dim).transpose(1, 2)

        first = self._qkv_rows(width)
        if heads in self.private_qk_heads:
            private = self.private_qk[str(heads)]
            block = private.out_features // 2
            q, k = (project(private.weight, private.bias, part * block + self._qkv_rows(width, block))
                    for part in (0, 1))
        else:
            q, k = (project(weight, bias, part * max_width + first, self._bias_start(part, width)) for part in (0, 1))
        v = project(weight, bias, 2 * max_width + first, self._bias_start(2, width))
        context = self._attend(q, k, v)
        sides = (embed_side, self.side("num_heads"))
        return elastic_linear(context.transpose(1, 2).reshape(batch, tokens, width),
                              side_view(self.proj.weight, (embed_dim, width), sides),
                              side_view(self.proj.bias, (embed_dim,), sides), embed_dim)

    def qk_groups(self, heads: GroupSizes, widths: GroupSizes | None = None) -> tuple[QkGroup, ...]:
        """The subnets of a grouped pass with ``heads`` (and attention ``widths``; None: ``heads * head_dim``) that
        share a source of q and k (one group unless some head counts have private q/k projections); a pass plans them
        once and reuses them for every batch."""
        width = heads.scaled(self.head_dim) if widths is None else widths
        by_source: dict[int | None, list[int]] = {}
        for index, count in enumerate(heads.values):
            by_source.setdefault(count if count in self.private_qk_heads else None, []).append(index)
        if len(by_source) == 1:
            return (QkGroup(next(iter(by_source)), None, width),)
        device = heads.table.device
        return tuple(QkGroup(source, torch.tensor(subnets, device=device),
                             GroupSizes([width.values[k] for k in subnets], device))
                     for source, subnets in by_source.items())

    def grouped_forward(self, x: Tensor, sizes: GroupSizes, heads: GroupSizes,
                        qk_groups: tuple[QkGroup, ...] | None = None, widths: GroupSizes | None = None) -> Tensor:
        """K subnets with embed dims ``sizes``, head counts ``heads`` and attention widths ``widths`` (None:
        ``heads * head_dim``) on ``x [K, B, N, sizes.width]``; ``qk_groups``: :meth:`qk_groups` of ``heads`` and
        ``widths``, if the caller planned them already."""
        self.check_leading("grouped_forward")
        head_dims = {self.head_dim} if widths is None else {
            self.widths(count, active)[1] for count, active in zip(heads.values, widths.values)}
        width = heads.scaled(self.head_dim) if widths is None else widths
        qk_groups = self.qk_groups(heads, widths) if qk_groups is None else qk_groups
        x, unpartition = self._windows(x)
        if self.rel_pos is None and self.rel_pos_h is None and len(qk_groups) == 1 and len(head_dims) == 1 \
                and qk_groups[0].private_heads is None and self.qkv_bias_layout == "blocks" \
                and self._fused_takes(head_dim := head_dims.pop()):
            return unpartition(grouped_attention(x, sizes, self.qkv.weight, self.qkv.bias, self.proj.weight,
                                                 self.proj.bias, heads, head_dim))
        return unpartition(self._grouped_unfused_attention(x, sizes, heads, width, qk_groups))

    def _grouped_unfused_attention(self, x: Tensor, sizes: GroupSizes, heads: GroupSizes, width: GroupSizes,
                                   qk_groups: tuple[QkGroup, ...]) -> Tensor:
        """The unfused path for K subnets: q and k by grouped linears per :class:`QkGroup`, v from the shared rows,
        the attention over ``[K * B, heads, N, head_dim]`` (once per head dim where the subnets' differ), padded
        heads zeroed before the projection."""
        groups, batch, tokens, _ = x.shape
        max_width = self.num_heads * self.head_dim
        weight, bias = self.qkv.weight, self.qkv.bias
        autoformer_bias = bias is not None and self.qkv_bias_layout == "autoformer"

        def rows(source_weight: Tensor, source_bias: Tensor | None, start: int, subnets: Tensor | None = None,
                 out_sizes: GroupSizes = width) -> Tensor:
            inputs = x if subnets is None else x[subnets]
            if autoformer_bias and source_weight is weight:  # each subnet's bias is elsewhere: added after
                part = start // max_width
                return grouped_linear(inputs, weight[start:], None, out_sizes) + self._grouped_bias(width, part,
                                                                                                   x.dtype)
            return grouped_linear(inputs, source_weight[start:], None if source_bias is None else source_bias[start:],
                                  out_sizes)

        def q_and_k(group: QkGroup) -> tuple[Tensor, Tensor]:
            if group.private_heads is None:
                return (rows(weight, bias, 0, group.subnets, group.width),
                        rows(weight, bias, max_width, group.subnets, group.width))
            private = self.private_qk[str(group.private_heads)]
            return (rows(private.weight, private.bias, 0, group.subnets, group.width),
                    rows(private.weight, private.bias, private.out_features // 2, group.subnets, group.width))

        if len(qk_groups) == 1:
            q, k = q_and_k(qk_groups[0])
        else:
            q, k = (x.new_zeros(groups, batch, tokens, width.width) for _ in range(2))
            for group in qk_groups:
                part_q, part_k = q_and_k(group)
                q[group.subnets, ..., :part_q.shape[-1]] = part_q
                k[group.subnets, ..., :part_k.shape[-1]] = part_k
        v = rows(weight, bias, 2 * max_width)
        head_dims = [active // count for count, active in zip(heads.values, width.values)]
        if len(set(head_dims)) == 1:
            q, k, v = (t.view(groups * batch, tokens, -1, head_dims[0]).transpose(1, 2) for t in (q, k, v))
            context = self._attend(q, k, v).transpose(1, 2).reshape(groups, batch, tokens, width.width)
        else:  # heads of another size: the subnets of each head dim attend apart, over their widest width
            context = x.new_zeros(groups, batch, tokens, width.width)
            for head_dim in sorted(set(head_dims)):
                members = [k for k, d in enumerate(head_dims) if d == head_dim]
                span = max(width.values[k] for k in members)
                subnets = torch.tensor(members, device=x.device)
                q_d, k_d, v_d = (t[subnets, ..., :span].reshape(len(members) * batch, tokens, -1, head_dim)
                                 .transpose(1, 2) for t in (q, k, v))
                context[subnets, ..., :span] = (self._attend(q_d, k_d, v_d).transpose(1, 2)
                                                .reshape(len(members), batch, tokens, span))
        return grouped_linear(context * width.mask(context.dtype, 4), self.proj.weight, self.proj.bias, sizes)

    def extract(self) -> plain.Attention:
        if self.window_size or self.rel_pos_h is not None:
            raise NotImplementedError("ElasticAttention.extract: elastic_ops.plain has no windowed attention or "
                                      "decomposed relative position (SAM's) to extract to")
        self.set_active(attn_dim=self.attn_dim)
        embed_dim, heads = self.active["embed_dim"], self.active["num_heads"]
        width, head_dim = self.widths(heads, self.attn_dim)
        max_width = self.num_heads * self.head_dim
        weight, bias = self.qkv.weight, self.qkv.bias
        attn = empty_module(lambda: plain.Attention(embed_dim, heads, head_dim, qkv_bias=bias is not None,
                                                    relative_position=self.relative_position), weight)
        first = self._qkv_rows(width)
        columns = side_span(embed_dim, weight.shape[1], self.side("embed_dim"))
        with torch.no_grad():
            rows = weight.view(3, max_width, -1)[:, first:first + width]
            biases = None if bias is None else torch.stack([bias[start:start + width] for start in
                                                            (self._bias_start(part, width) for part in range(3))])
            if heads in self.private_qk_heads:
                private = self.private_qk[str(heads)]
                block = private.out_features // 2
                first = self._qkv_rows(width, block)
                rows = torch.cat([private.weight.view(2, block, -1)[:, first:first + width], rows[2:]])
                biases = None if biases is None else torch.cat([private.bias.view(2, block)[:, first:first + width],
                                                                biases[2:]])
            attn.qkv.weight.copy_(rows[..., columns].reshape(3 * width, embed_dim))
            if biases is not None:
                attn.qkv.bias.copy_(biases.reshape(-1))
        attn.proj = self.proj.extract()
        if self.rel_pos is not None:
            attn.rel_pos.load_state_dict(self.rel_pos.state_dict())
        return attn


class ElasticLayerScale(ElasticModule):
    """timm's LayerScale, ``x * gamma[:d]``, on the leading ``d = x.shape[-1]`` channels.

    The width follows the input, so one call serves a single subnet and a grouped pass (whose zero padding stays
    zero); the active ``dim`` is what ``extract()`` keeps.
    """

    two_sided = True

    def __init__(self, dim: int, init_value: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value, device=device, dtype=dtype))
        self.active = self.max_config()

    def max_config(self) -> dict[str, int]:
        return {"dim": self.gamma.shape[0]}

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma[side_span(x.shape[-1], self.gamma.shape[0], self.side("dim"))].to(x.dtype)

    def extract(self) -> plain.LayerScale:
        scale = empty_module(lambda: plain.LayerScale(self.active["dim"]), self.gamma)
        _copy_slice(scale.gamma, self.gamma, (self.side("dim"),))
        return scale


class ElasticBlock(ElasticModule):
    """timm's pre-norm Block (``norm1, attn, ls1, norm2, mlp, ls2``) with elastic embed dim, heads and MLP width.

    ``drop_path`` is the stochastic-depth probability of both residual branches, applied in training only;
    ``private_qk_heads``: head counts with their own q/k projections, ``relative_position``: the maximum distance of
    the 2D relative position, 0 for none, ``grid``/``window_size``/``decomposed_rel_pos``: SAM's windowed attention
    and relative position, ``qkv_bias_layout``: where the q, k, v biases of fewer heads are, ``private_qk_width``: the
    rows of each private q or k block, and the active ``attn_dim`` (set with the other sizes; None: ``num_heads *
    head_dim``) (:class:`ElasticAttention`); ``layer_scale``: the initial value of the
    :class:`ElasticLayerScale` of each branch (CaiT, UniNet), None for none.
    """

    two_sided = True

    def __init__(self, embed_dim: int, num_heads: int, hidden_features: int, head_dim: int = 64, eps: float = 1e-6,
                 qkv_bias: bool = True, drop_path: float = 0.0, device=None, dtype=None,
                 private_qk_heads: tuple[int, ...] = (), relative_position: int = 0, layer_scale: float | None = None,
                 grid: int = 0, window_size: int = 0, decomposed_rel_pos: bool = False,
                 qkv_bias_layout: str = "blocks", private_qk_width: int | None = None):
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"ElasticBlock: drop_path must be in [0, 1), got {drop_path}")
        self.drop_path = drop_path
        self.norm1 = ElasticLayerNorm(embed_dim, eps=eps, device=device, dtype=dtype)
        self.attn = ElasticAttention(embed_dim, num_heads, head_dim, qkv_bias=qkv_bias, device=device, dtype=dtype,
                                     private_qk_heads=private_qk_heads, relative_position=relative_position,
                                     grid=grid, window_size=window_size, decomposed_rel_pos=decomposed_rel_pos,
                                     qkv_bias_layout=qkv_bias_layout, private_qk_width=private_qk_width)
        self.norm2 = ElasticLayerNorm(embed_dim, eps=eps, device=device, dtype=dtype)
        self.mlp = ElasticMlp(embed_dim, hidden_features, device=device, dtype=dtype)
        self.layer_scale = layer_scale
        self.ls1 = self.ls2 = None
        if layer_scale is not None:
            self.ls1 = ElasticLayerScale(embed_dim, layer_scale, device=device, dtype=dtype)
            self.ls2 = ElasticLayerScale(embed_dim, layer_scale, device=device, dtype=dtype)
        self.active = self.max_config()

    def max_config(self) -> dict[str, int]:
        return {**self.attn.max_config(), "hidden_features": self.mlp.max_config()["hidden_features"]}

    def set_active(self, attn_dim: int | None = None, **config: int | None):
        self.attn.widths(self.resolve(**config)["num_heads"], attn_dim)  # checked before anything changes
        super().set_active(**config)
        embed_dim = self.active["embed_dim"]
        self.norm1.set_active(dim=embed_dim)
        self.attn.set_active(embed_dim=embed_dim, num_heads=self.active["num_heads"], attn_dim=attn_dim)
        self.norm2.set_active(dim=embed_dim)
        self.mlp.set_active(embed_dim=embed_dim, hidden_features=self.active["hidden_features"])
        if self.layer_scale is not None:
            self.ls1.set_active(dim=embed_dim)
            self.ls2.set_active(dim=embed_dim)
        return self

    def sides_changed(self) -> None:
        embed = self.side("embed_dim")
        for norm in (self.norm1, self.norm2, self.ls1, self.ls2):
            if norm is not None:
                norm.set_side(dim=embed)
        self.attn.set_side(embed_dim=embed, num_heads=self.side("num_heads"))
        self.mlp.set_side(embed_dim=embed, hidden_features=self.side("hidden_features"))

    def forward(self, x: Tensor, embed_dim: int | None = None, num_heads: int | None = None,
                hidden_features: int | None = None, attn_dim: int | None = None) -> Tensor:
        """``attn_dim`` as :class:`ElasticAttention`'s: None keeps the active width where ``num_heads`` is None too,
        else ties it to ``num_heads * head_dim``."""
        if num_heads is None and attn_dim is None:
            attn_dim = self.attn.attn_dim
        config = self.resolve(embed_dim=embed_dim, num_heads=num_heads, hidden_features=hidden_features)
        e, heads, hidden = config["embed_dim"], config["num_heads"], config["hidden_features"]
        self.check_width(x, e, "embed_dim")
        return self._residual(
            x, lambda h: self.attn(self.norm1(h, dim=e), embed_dim=e, num_heads=heads, attn_dim=attn_dim),
            lambda h: self.mlp(self.norm2(h, dim=e), embed_dim=e, hidden_features=hidden))

    def grouped_forward(self, x: Tensor, sizes: GroupSizes, heads: GroupSizes, hidden: GroupSizes,
                        qk_groups: tuple[QkGroup, ...] | None = None, widths: GroupSizes | None = None) -> Tensor:
        """K subnets with embed dims ``sizes``, head counts ``heads``, MLP widths ``hidden`` and attention widths
        ``widths`` (None: ``heads * head_dim``) on ``x [K, B, N, sizes.width]`` (eval mode); ``qk_groups`` as in
        :meth:`ElasticAttention.grouped_forward`."""
        self.check_leading("grouped_forward")
        return self._residual(
            x, lambda h: self.attn.grouped_forward(self.norm1.grouped_forward(h, sizes), sizes, heads, qk_groups,
                                                   widths),
            lambda h: self.mlp.grouped_forward(self.norm2.grouped_forward(h, sizes), sizes, hidden))

    def _residual(self, x: Tensor, attention, mlp) -> Tensor:
        """The pre-norm residual structure, written once for single and grouped passes: ``attention`` and ``mlp``
        map the residual stream to each branch's output (norm included)."""
        x = x + drop_path(self._scaled(self.ls1, attention(x)), self.drop_path, self.training)
        return x + drop_path(self._scaled(self.ls2, mlp(x)), self.drop_path, self.training)

    @staticmethod
    def _scaled(layer_scale: ElasticLayerScale | None, branch: Tensor) -> Tensor:
        return branch if layer_scale is None else layer_scale(branch)

    def extract(self) -> plain.Block:
        self.set_active(attn_dim=self.attn.attn_dim)
        embed_dim, heads = self.active["embed_dim"], self.active["num_heads"]
        head_dim = self.attn.widths(heads, self.attn.attn_dim)[1]
        block = empty_module(lambda: plain.Block(embed_dim, heads, head_dim,
                                                 self.active["hidden_features"], eps=self.norm1.eps,
                                                 qkv_bias=self.attn.qkv.bias is not None,
                                                 relative_position=self.attn.relative_position,
                                                 layer_scale=self.layer_scale), self.attn.qkv.weight)
        block.norm1, block.attn = self.norm1.extract(), self.attn.extract()
        block.norm2, block.mlp = self.norm2.extract(), self.mlp.extract()
        if self.layer_scale is not None:
            block.ls1, block.ls2 = self.ls1.extract(), self.ls2.extract()
        return block


class ElasticPatchEmbed(ElasticModule):
    """Patch embedding with ``proj.weight[:embed_dim, :, :patch_size, :patch_size]`` as a stride-``patch_size`` conv.

    A smaller patch size uses the leading ``patch_size x patch_size`` block of the largest kernel.
    Input ``[B, in_chans, H, W]`` with H and W multiples of the active patch size; output ``[B, N, embed_dim]``.
    """

    two_sided = True

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, device=device,
                              dtype=dtype)
        self.active = self.max_config()

    def max_config(self) -> dict[str, int]:
        return {"embed_dim": self.proj.out_channels, "patch_size": self.proj.kernel_size[0]}

    def forward(self, images: Tensor, embed_dim: int | None = None, patch_size: int | None = None) -> Tensor:
        config = self.resolve(embed_dim=embed_dim, patch_size=patch_size)
        embed_dim, patch = config["embed_dim"], config["patch_size"]
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != self.proj.in_channels:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"ElasticPatchEmbed: expected images [batch, {self.proj.in_channels}, height, width], "
                             f"got {shape}")
        if images.shape[2] % patch or images.shape[3] % patch:
            raise ValueError(f"ElasticPatchEmbed: image size {tuple(images.shape[2:])} is not a multiple of "
                             f"patch_size {patch}")
        channels = side_span(embed_dim, self.proj.out_channels, self.side("embed_dim"))
        weight = self.proj.weight[channels, :, :patch, :patch].to(images.dtype)
        bias = None if self.proj.bias is None else self.proj.bias[channels].to(images.dtype)
        return F.conv2d(images, weight, bias, stride=patch).flatten(2).transpose(1, 2)

    def extract(self) -> plain.PatchEmbed:
        embed_dim, patch = self.active["embed_dim"], self.active["patch_size"]
        weight = self.proj.weight
        embed = empty_module(lambda: plain.PatchEmbed(patch, self.proj.in_channels, embed_dim), weight)
        _copy_slice(embed.proj.weight, weight, (self.side("embed_dim"),))
        _copy_slice(embed.proj.bias, self.proj.bias, (self.side("embed_dim"),))
        return embed


__all__ = ["SIDES", "ElasticAttention", "ElasticBlock", "ElasticLayerNorm", "ElasticLayerScale", "ElasticLinear",
           "ElasticMlp", "ElasticModule", "ElasticPatchEmbed", "QkGroup", "drop_path", "side_span", "side_view"]
