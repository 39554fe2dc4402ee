"""Exact parameter and MAC counts of SAM encoder subnets, vectorised over many archs (``nas.cost``'s convention,
extended to SAM's encoder; the extracted :class:`~nas.sam.plain.SamEncoder` is what is counted).

* ``params``: the patch embedding (conv weight and bias), the position embedding (``g * g`` rows, no class token), per
  active layer two LayerNorms, qkv and the output projection (with biases), fc1 and fc2 (SAM's lin1 and lin2, with
  biases) and the decomposed relative position tables ``rel_pos_h`` and ``rel_pos_w`` (``2 s - 1`` rows of ``head_dim``
  each, ``s`` the layer's window side, or the grid's for a global layer); the neck (1x1 conv and 3x3 conv without
  bias, two LayerNorm2d); the dense head (with bias) where the space has classes.
* ``macs``: one image's multiply-accumulates in the matrix products. A windowed layer attends on the token grid
  zero-padded to a multiple of its window (``P = ceil(g / w) * w``; SAM pads after norm1), so qkv, q @ k^T, attn @ v,
  the relative position terms and the output projection run on ``P * P`` tokens; the MLP runs on the ``g * g`` tokens
  after the padding is cut off. Per layer: qkv and projection ``P^2 * E * 4 A``; q @ k^T and attn @ v ``2 * P^2 * s^2
  * A`` (``s * s`` keys per query, ``A = heads * head_dim``); the decomposed relative position ``2 * P^2 * s * A``
  (each query against ``s`` rows and ``s`` columns of the table); fc1 and fc2 ``2 * g^2 * E * H``. Then the patch
  embedding ``g^2 * c p^2 * E``, the neck ``g^2 * (E C + 9 C^2)`` and the dense head ``g^2 * C * classes p^2``.
  LayerNorms, softmax, GELU, bias and residual additions, the padding and the table look-ups are not counted.
  ``torch.utils.flop_counter.FlopCounterMode`` on the extracted encoder counts ``2 * macs``.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

from ..vit.arch import Arch, ArchBatch
from .space import SamSpace


def layer_geometry(space: SamSpace) -> tuple[np.ndarray, np.ndarray]:
    """Per layer ``[L]``: the side ``s`` its attention spans (window or grid) and the padded grid side ``P``."""
    grid = space.grid
    sides = np.array([space.window(i) or grid for i in range(space.max_depth)], dtype=np.int64)
    padded = np.array([math.ceil(grid / s) * s for s in sides], dtype=np.int64)
    return sides, padded


def _dims(archs: Sequence[Arch] | ArchBatch, space: SamSpace):
    batch = archs if isinstance(archs, ArchBatch) else space.batch_type.from_archs(list(archs))
    if batch.max_depth != space.max_depth:
        raise ValueError(f"archs have {batch.max_depth} supernet layers, space {space.name!r} has {space.max_depth}")
    return (batch.embed_dim[:, None].astype(np.int64), batch.num_heads.astype(np.int64) * space.head_dim,
            batch.hidden_features.astype(np.int64), batch.layer_on)


def params_many(archs: Sequence[Arch] | ArchBatch, space: SamSpace) -> np.ndarray:
    """[K] int64 parameter counts of the extracted subnets (see the module's description)."""
    embed, attn, hidden, on = _dims(archs, space)
    sides, _ = layer_geometry(space)
    layer = (4 * embed + (embed + 1) * 3 * attn + (attn + 1) * embed + (embed + 1) * hidden + (hidden + 1) * embed
             + 2 * (2 * sides - 1) * space.head_dim)
    e, p, c = embed[:, 0], space.patch_sizes[0], space.out_chans
    patch = (space.in_chans * p * p + 1) * e + space.num_tokens() * e
    neck = e * c + 9 * c * c + 4 * c
    head = (c + 1) * space.num_classes * p * p
    return (patch + np.where(on, layer, 0).sum(axis=1) + neck + head).astype(np.int64)


def macs_many(archs: Sequence[Arch] | ArchBatch, space: SamSpace) -> np.ndarray:
    """[K] int64 multiply-accumulates of one image's forward pass (see the module's description)."""
    embed, attn, hidden, on = _dims(archs, space)
    sides, padded = layer_geometry(space)
    tokens = space.num_tokens()
    layer = (padded ** 2 * (embed * 4 * attn + 2 * sides ** 2 * attn + 2 * sides * attn)
             + 2 * tokens * embed * hidden)
    e, p, c = embed[:, 0], space.patch_sizes[0], space.out_chans
    patch = tokens * space.in_chans * p * p * e
    neck = tokens * (e * c + 9 * c * c)
    head = tokens * c * space.num_classes * p * p
    return (patch + np.where(on, layer, 0).sum(axis=1) + neck + head).astype(np.int64)


def cost_range(space: SamSpace, cost: Callable[[Sequence[Arch]], np.ndarray]) -> tuple[float, float]:
    """The smallest and largest ``cost`` of an arch of ``space``. Every wider choice and every further layer only adds
    work and weights, but layers differ (a global layer attends over the whole grid, a windowed one over a padded
    grid), so the smallest is the cheapest of the narrowest archs over every choice of ``min(depths)`` layers kept."""
    smallest = space.min_arch()
    kept = [tuple(i in layers for i in range(space.max_depth))
            for layers in itertools.combinations(range(space.max_depth), space.depths[0])]
    narrowest = [dataclasses.replace(smallest, layer_on=layer_on) for layer_on in kept]
    return float(np.min(cost(narrowest))), float(np.max(cost([space.max_arch()])))


__all__ = ["cost_range", "layer_geometry", "macs_many", "params_many"]
