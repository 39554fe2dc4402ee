"""Exact parameter and MAC counts of hybrid subnets, vectorised over many archs: ``nas.vit.cost``'s convention
extended to convolutions (DESIGN.md section 9).

* ``params`` counts every weight and bias of the extracted subnet (``nn.Module.parameters()``; BatchNorm's running
  statistics are buffers, not counted): the stem conv and its BatchNorm, each stage's DSM and blocks, the head conv
  and BatchNorm, the pre-logits layer and the classifier. An attention DSM's heads, and an attention block's, are
  ``channels // head_dim``. A V-scale attention layer keeps the rows of its relative position table that its own
  grid reads (one per 2D offset of the stage's grid at the arch's resolution), as the extracted layer does; the MLP
  operator's token MLP has the weights of the subnet's grid.
* ``macs`` counts the multiply-accumulates of one image's forward pass in convolutions (dense, 1x1 and depthwise:
  ``H_out * W_out * C_out * k * k * C_in / groups``) and matrix products: squeeze-excite's two 1x1 convs (on the pooled
  ``1 x 1`` map), every linear layer, ``q @ k^T`` and ``attn @ v`` (``N_q * N_k`` per head dim unit each), the
  positional and value convs, the token MLP (``channels`` products of ``tokens x hidden``), the head. BatchNorm,
  LayerNorm, activations, softmax, pooling, the squeeze-excite gate, layer scale, bias and residual additions and the
  resize of the input are not counted. FLOPs are ``2 * macs``, as ``torch.utils.flop_counter.FlopCounterMode`` counts
  them.
* Feature maps: the stem's side is ``ceil(resolution / stem_stride)`` and every stride rounds up
  (``HybridSpace.grid_sides``); a stage's DSM reads the previous stage's map and writes the stage's, its blocks keep
  it. With ``dsm: none`` the first block reads the previous width and map and downsamples.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from .arch import DSMS, OPS, HybridArch, HybridArchBatch, Stage
from .space import HybridSpace
from .style import SE_REDUCTION, STYLES, TRANSITION_EXPANSION, TRANSITION_KERNEL, Style

Counts = tuple[np.ndarray, np.ndarray]  # (params, macs), broadcast over archs and stages


def as_batch(archs: HybridArch | Sequence[HybridArch] | HybridArchBatch) -> HybridArchBatch:
    if isinstance(archs, HybridArchBatch):
        return archs
    return HybridArchBatch.from_archs([archs] if isinstance(archs, HybridArch) else archs)


def make_divisible(values: np.ndarray, divisor: int) -> np.ndarray:
    """``elastic_ops.make_divisible`` of an array: the squeeze-excite width rounding of MobileNet, OFA and UniNet."""
    rounded = np.maximum(divisor, np.floor(values + divisor / 2).astype(np.int64) // divisor * divisor)
    return np.where(rounded < 0.9 * values, rounded + divisor, rounded)


def inverted_residual(c_in, c_out, expansion, kernel, side_in, side_out, stride, se, style: Style) -> Counts:
    """An inverted residual (``ElasticInvertedResidual``): expand 1x1 conv (none at expansion 1), depthwise conv,
    squeeze-excite, project 1x1 conv, BatchNorms, and the shortcut conv where the shape changes."""
    hidden, area = c_in * expansion, side_out * side_out
    expand = expansion > 1
    params = np.where(expand, c_in * hidden + 2 * hidden + (2 * c_in if style.input_norm else 0), 0)
    macs = np.where(expand, side_in * side_in * c_in * hidden, 0)
    params = params + hidden * kernel * kernel + 2 * hidden + hidden * c_out + 2 * c_out
    macs = macs + area * hidden * (kernel * kernel + c_out)
    reduced = make_divisible(hidden // SE_REDUCTION, style.se_divisor)
    params = params + np.where(se, 2 * hidden * reduced + reduced + hidden, 0)
    macs = macs + np.where(se, 2 * hidden * reduced, 0)
    reshapes = (stride != 1) | (c_in != c_out)
    projects = reshapes if style.shortcut_pool == "max" else c_in != c_out
    bias = c_out if style.shortcut_pool == "max" else 0
    return params + np.where(projects, c_in * c_out + bias, 0), macs + np.where(projects, area * c_in * c_out, 0)


def positional_attention_block(channels, expansion, side, head_dim: int) -> Counts:
    """UniNet's attention block: 3x3 depthwise positional conv (bias), two LayerNorms, qkv and projection (biases),
    layer scales, the MLP."""
    width, hidden, tokens = channels // head_dim * head_dim, channels * expansion, side * side
    params = (10 * channels + 2 * 2 * channels + (channels + 1) * 3 * width + (width + 1) * channels + 2 * channels
              + (channels + 1) * hidden + (hidden + 1) * channels)
    macs = tokens * (9 * channels + 4 * channels * width + 2 * channels * hidden) + 2 * tokens * tokens * width
    return params, macs


def vscale_attention_block(channels, expansion, v_scale, side, head_dim: int) -> Counts:
    """ElasticViT's layer pair: LayerNorm, qkv without bias (v heads ``v_scale`` times wider), the 3x3 depthwise conv
    on v, the relative position table, the projection (bias); LayerNorm and the MLP."""
    heads, hidden, tokens = channels // head_dim, channels * expansion, side * side
    qk, v = heads * head_dim, heads * head_dim * v_scale
    params = (2 * 2 * channels + channels * (2 * qk + v) + 9 * v + (2 * side - 1) ** 2 * heads + (v + 1) * channels
              + (channels + 1) * hidden + (hidden + 1) * channels)
    macs = tokens * (channels * (2 * qk + 2 * v) + 9 * v + 2 * channels * hidden) + tokens * tokens * (qk + v)
    return params, macs


def mixer_block(channels, expansion, side, token_hidden) -> Counts:
    """UniNet's MLP operator (MLP-Mixer's block): two LayerNorms, the token MLP over the grid's tokens, the channel
    MLP."""
    hidden, tokens = channels * expansion, side * side
    params = 2 * 2 * channels + 2 * tokens * token_hidden + token_hidden + tokens + (channels + 1) * hidden \
        + (hidden + 1) * channels
    return params, 2 * channels * tokens * token_hidden + 2 * tokens * channels * hidden


def local_path(c_in, c_out, side_out) -> Counts:
    """UniNet's local downsampling path: 3x3 depthwise conv (bias), BatchNorm, 1x1 conv (bias)."""
    return 12 * c_in + c_in * c_out + c_out, side_out * side_out * c_in * (9 + c_out)


def shortcut(c_in, c_out, side_out) -> Counts:
    """A DSM's shortcut: (max-pool,) 1x1 conv with bias."""
    return c_in * c_out + c_out, side_out * side_out * c_in * c_out


def attention_dsm(c_in, c_out, side_in, side_out, head_dim: int) -> Counts:
    """What the attention DSMs share: key/value LayerNorm and projection, attention, output projection, shortcut."""
    width = c_out // head_dim * head_dim
    params = 2 * c_in + (c_in + 1) * 2 * width + (width + 1) * c_out
    queries, keys = side_out * side_out, side_in * side_in
    macs = keys * c_in * 2 * width + 2 * queries * keys * width + queries * width * c_out
    short = shortcut(c_in, c_out, side_out)
    return params + short[0], macs + short[1]


def dsm_counts(dsm: str, c_in, c_out, side_in, side_out, stride, space: HybridSpace) -> Counts:
    """The downsampling module ``dsm`` from ``c_in`` channels on a ``side_in`` map to ``c_out`` on ``side_out``."""
    zero = np.zeros_like(c_in)
    if dsm == "none":
        return zero, zero
    if dsm == "local":
        path, short = local_path(c_in, c_out, side_out), shortcut(c_in, c_out, side_out)
        return path[0] + short[0], path[1] + short[1]
    if dsm == "mbconv":
        return inverted_residual(c_in, c_out, TRANSITION_EXPANSION, TRANSITION_KERNEL, side_in, side_out, stride,
                                 True, STYLES[space.style])
    width = c_out // space.head_dim * space.head_dim
    if dsm == "local-global":
        path = local_path(c_in, width, side_out)
        queries = (path[0] + 2 * width, path[1])
    else:  # global: strided input tokens through a linear layer
        queries = ((c_in + 1) * width, side_out * side_out * c_in * width)
    rest = attention_dsm(c_in, c_out, side_in, side_out, space.head_dim)
    return queries[0] + rest[0], queries[1] + rest[1]


class StageSizes(NamedTuple):
    """What the cost of every stage of a space depends on besides an arch's choices, ``[S]`` each: the stride, the
    stride from the stem's map on (a side is ``ceil(stem side / downsampling)``, since ceilings of successive
    divisions compose), squeeze-excite and the token MLP's width."""

    stride: np.ndarray
    downsampling: np.ndarray
    se: np.ndarray
    token_hidden: np.ndarray


@functools.cache
def stage_sizes(space: HybridSpace) -> StageSizes:
    stride = np.array([stage.stride for stage in space.stages])
    return StageSizes(stride, np.cumprod(stride), np.array([stage.se for stage in space.stages]),
                      np.array([space.token_hidden(i) for i in range(space.num_stages)]))


def block_counts(op: str, b: HybridArchBatch, side, sizes: StageSizes, space: HybridSpace) -> Counts:
    """One block of operator ``op`` in every stage (its width in and out, stride 1), ``[K, S]``."""
    style = STYLES[space.style]
    if op == "conv":
        return inverted_residual(b.channels, b.channels, b.expansion, b.kernel_size, side, side, 1, sizes.se, style)
    if op == "mlp":
        return mixer_block(b.channels, b.expansion, side, sizes.token_hidden)
    if style.v_scale:
        return vscale_attention_block(b.channels, b.expansion, b.v_scale, side, space.head_dim)
    return positional_attention_block(b.channels, b.expansion, side, space.head_dim)


def counts(archs: HybridArch | Sequence[HybridArch] | HybridArchBatch, space: HybridSpace) -> Counts:
    """``(params, macs)``, each ``[K]`` int64, of every arch (see the module docstring for what is counted). Every
    operator and DSM is counted for all stages at once, ``[K, S]``, and each stage keeps its own."""
    b = as_batch(archs)
    if b.num_stages != space.num_stages:
        raise ValueError(f"archs have {b.num_stages} stages, space {space.name!r} has {space.num_stages}")
    sizes = stage_sizes(space)
    stem_side = -(-b.resolution // space.stem_stride)
    side = -(-stem_side[:, None] // sizes.downsampling)
    side_in = np.concatenate([stem_side[:, None], side[:, :-1]], axis=1)
    stem_width = b.channels[:, 0] if space.stem_channels is None else np.full(len(b), space.stem_channels)
    width_in = np.concatenate([stem_width[:, None], b.channels[:, :-1]], axis=1)
    params = np.zeros_like(b.channels)
    macs = np.zeros_like(b.channels)
    used_dsms = {dsm for stage in space.stages for dsm in stage.dsms}
    for code, dsm in enumerate(DSMS):
        if dsm in used_dsms:
            p, m = dsm_counts(dsm, width_in, b.channels, side_in, side, sizes.stride, space)
            params, macs = params + np.where(b.dsm == code, p, 0), macs + np.where(b.dsm == code, m, 0)
    # With dsm "none" the first block reads the previous width and map, and downsamples.
    first = b.dsm == DSMS.index("none")
    p, m = inverted_residual(width_in, b.channels, b.expansion, b.kernel_size, side_in, side, sizes.stride, sizes.se,
                             STYLES[space.style])
    params, macs = params + np.where(first, p, 0), macs + np.where(first, m, 0)
    blocks = b.depth - first
    used_ops = {op for stage in space.stages for op in stage.ops}
    for code, op in enumerate(OPS):
        if op in used_ops:
            p, m = block_counts(op, b, side, sizes, space)
            params = params + np.where(b.op == code, blocks * p, 0)
            macs = macs + np.where(b.op == code, blocks * m, 0)
    width, side = b.channels[:, -1], side[:, -1]
    params = params.sum(axis=1) + 9 * space.in_chans * stem_width + 2 * stem_width
    macs = macs.sum(axis=1) + stem_side * stem_side * 9 * space.in_chans * stem_width
    features = np.full(len(b), space.head_features) if space.head_features else space.head_expansion * width
    params, macs = params + width * features + 2 * features, macs + side * side * width * features
    if space.pre_logits:
        params, macs = params + (features + 1) * space.pre_logits, macs + features * space.pre_logits
        features = space.pre_logits
    params, macs = params + (features + 1) * space.num_classes, macs + features * space.num_classes
    return params.astype(np.int64), macs.astype(np.int64)


def supernet_params(space: HybridSpace) -> int:
    """Parameters of the supernet of ``space`` (``nas.hybrid.supernet``), which hold every subnet's: the stem and head
    at their largest widths, and per stage a module per DSM choice but ``none`` and per operator choice as many
    blocks as the largest depth, each at the stage's largest sizes and grid (with ``none`` among the DSMs, a conv
    stage's first block reads the previous stage's width and map, and downsamples)."""
    style = STYLES[space.style]
    stem = space.stem_channels or max(space.stages[0].channels)
    side_in = -(-space.img_size // space.stem_stride)
    total, width_in = 9 * space.in_chans * stem + 2 * stem, stem
    for index, (choices, side) in enumerate(zip(space.stages, space.grid_sides(space.img_size))):
        channels, expansion, kernel = max(choices.channels), max(choices.expansions), max(choices.kernel_sizes)
        total += sum(int(dsm_counts(dsm, width_in, channels, side_in, side, choices.stride, space)[0])
                     for dsm in choices.dsms)
        for op in choices.ops:
            blocks = max(choices.depths)
            if op == "conv":
                if "none" in choices.dsms:
                    blocks -= 1
                    total += int(inverted_residual(width_in, channels, expansion, kernel, side_in, side,
                                                   choices.stride, choices.se, style)[0])
                block = inverted_residual(channels, channels, expansion, kernel, side, side, 1, choices.se, style)
            elif op == "mlp":
                block = mixer_block(channels, expansion, side, space.token_hidden(index))
            elif style.v_scale:
                block = vscale_attention_block(channels, expansion, max(choices.v_scales), side, space.head_dim)
            else:
                block = positional_attention_block(channels, expansion, side, space.head_dim)
            total += blocks * int(block[0])
        side_in, width_in = side, channels
    features = space.head_features or space.head_expansion * width_in
    total += width_in * features + 2 * features
    if space.pre_logits:
        total, features = total + (features + 1) * space.pre_logits, space.pre_logits
    return total + (features + 1) * space.num_classes


def params_many(archs, space: HybridSpace) -> np.ndarray:
    return counts(archs, space)[0]


def macs_many(archs, space: HybridSpace) -> np.ndarray:
    return counts(archs, space)[1]


def extreme_arch(space: HybridSpace, cost: Callable[[Sequence[HybridArch]], np.ndarray], largest: bool) -> HybridArch:
    """The arch of ``space`` with the largest (smallest) ``cost``: every numeric choice at its largest (smallest),
    then stage by stage the operator and DSM that make the cost largest (smallest). Exact for a cost that is a sum
    of per-stage terms growing with every size, as params and MACs are: a stage's operator and DSM only change that
    stage's own terms."""
    arch = space.max_arch() if largest else space.min_arch()
    end = -1 if largest else 0
    for i, choices in enumerate(space.stages):
        stage = arch.stages[i]
        candidates = []
        for op in choices.ops:
            kernel = choices.kernel_sizes[end] if choices.applies(op, "kernel_size") else 0
            v_scale = choices.v_scales[end] if choices.applies(op, "v_scale") else 0
            for dsm in choices.dsms:
                stages = list(arch.stages)
                stages[i] = Stage(op, stage.depth, stage.channels, stage.expansion, kernel, v_scale, dsm)
                candidates.append(HybridArch(arch.resolution, tuple(stages)))
        values = cost(candidates)
        arch = candidates[int(np.argmax(values) if largest else np.argmin(values))]
    return arch


def cost_range(space: HybridSpace, cost: Callable[[Sequence[HybridArch]], np.ndarray]) -> tuple[float, float]:
    """The smallest and the largest ``cost`` of an arch of ``space`` (see :func:`extreme_arch`)."""
    low, high = (float(cost([extreme_arch(space, cost, largest)])[0]) for largest in (False, True))
    return low, high


__all__ = ["as_batch", "cost_range", "counts", "extreme_arch", "macs_many", "make_divisible", "params_many",
           "supernet_params"]
