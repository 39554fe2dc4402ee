"""The two families of hybrid networks the library follows, as the details their blocks differ in.

A hybrid space names its style; the supernet builds its blocks, and the cost model counts them, from it:

- ``uninet`` (UniNet, ``Sense-X/UniNet``, ``uninet.py``): GELU; the conv block (``DWConvBlock``) has a BatchNorm
  before its expand conv, squeeze-excite rounded to multiples of 8 and a max-pool + 1x1 conv (with bias) shortcut;
  the attention block has a 3x3 depthwise positional conv, head dim 32, qkv bias and layer scale 1e-6
  (``AttentionBlock``).
- ``elasticvit`` (ElasticViT, ``microsoft/Moonlit``, ``ElasticViT/models/cnn.py`` and ``transformer.py``): Hardswish;
  the conv block (``MobileBlock``) has squeeze-excite of ``hidden // 4`` units and a 2x2 average-pool + bias-free 1x1
  conv shortcut; the attention layer has V-scale values, a 3x3 depthwise conv on v, a relative position bias and no
  qkv bias (``SuperAttention``), head dim 16.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Style:
    """``activation``: of the stem, the conv blocks, the MLPs and the head; ``se_divisor``: squeeze-excite rounding;
    ``input_norm``: UniNet's BatchNorm before the expand conv; ``shortcut_pool``: the conv block's shortcut when the
    shape changes (``ElasticInvertedResidual``); ``v_scale``: attention blocks are ElasticViT's V-scale blocks, else
    UniNet's positional attention blocks; ``channels_never_shrink``: a stage has at least the channels of the stage
    before it (ElasticViT's rule: ``SuperCNNLayer.arch_sampling`` and ``SuperTransformerBlock.arch_sampling`` redraw
    a stage's channels until they are)."""

    name: str
    activation: str
    se_divisor: int
    input_norm: bool
    shortcut_pool: str
    v_scale: bool
    channels_never_shrink: bool


STYLES = {
    "uninet": Style("uninet", activation="gelu", se_divisor=8, input_norm=True, shortcut_pool="max", v_scale=False,
                    channels_never_shrink=False),
    "elasticvit": Style("elasticvit", activation="hardswish", se_divisor=1, input_norm=False, shortcut_pool="avg",
                        v_scale=True, channels_never_shrink=True),
}

SE_REDUCTION = 4  # squeeze-excite reduces the hidden width 4x in both families
TRANSITION_EXPANSION, TRANSITION_KERNEL = 6, 3  # ElasticViT's reduction block before each transformer stage
LAYER_SCALE = 1e-6  # UniNet's attention blocks

__all__ = ["LAYER_SCALE", "SE_REDUCTION", "STYLES", "Style", "TRANSITION_EXPANSION", "TRANSITION_KERNEL"]
