"""Exact parameter and MAC counts of ViT subnets: analytic, and vectorised over many archs.

Convention (also in ``CONVENTION``):

* ``params`` counts every weight of the extracted subnet: patch embedding (conv weight and bias),
  class token, position embedding (one row per token), and per active layer two LayerNorms (weight
  and bias), qkv (with bias), the output projection, fc1 and fc2 (with biases); then the final
  LayerNorm and the classifier (with bias). A space with private class tokens or patch embeddings per
  patch size (ViTAS) counts only those of the arch's patch size, as in the extracted subnet; private
  q/k projections per head count (ViTAS) stand in for the shared q/k rows, so the count is the same.
  A space with ``relative_position = m > 0`` (AutoFormer) adds per active layer its 2D relative position
  tables: for keys and values, rows and columns, ``2 * m + 2`` entries (distances ``-m..m`` and one for
  the class token) of ``head_dim`` each, ``4 * (2 * m + 2) * head_dim`` in all. A space with ``layer_scale`` adds
  the two LayerScale vectors of each active layer.
* ``macs`` counts the multiply-accumulates of one image's forward pass in the matrix products:
  the patch-embedding convolution, qkv, q @ k^T, attn @ v, the output projection, fc1, fc2, and the
  classifier on the class token; with relative position also q . r_k and attn . r_v (``tokens ** 2 *
  num_heads * head_dim`` each; the table look-ups and additions are not counted). LayerNorm, softmax,
  GELU, bias and residual additions, the position-embedding add and the attention scale are not counted
  (AutoFormer does not count them either; they are well under 1% of the total). FLOPs in the "2 per
  multiply-add" sense, as ``torch.utils.flop_counter.FlopCounterMode`` reports them, are ``2 * macs``.
* The number of tokens is ``N = (img_size // patch_size) ** 2 + 1`` (patches plus the class token);
  attention has ``num_heads * head_dim`` q/k/v channels (in a space with attention widths, ViTAS's, the layer's
  ``attn_dim``), and the MLP ``int(embed_dim * mlp_ratio)`` hidden units.

Published AutoFormer sizes (T 5.8M / 1.3G, S 22.9M / 5.1G, B 53.7M / 11G) are MAC counts in this
sense; tests/nas/test_cost.py checks them.

The totals are a sum of per-layer costs (``layer_params``/``layer_macs``) plus embedding and head
terms, all numpy-broadcastable. Hybrid spaces (stages of conv, attention and MLP operators) have their own
per-block functions in ``nas.hybrid.cost``, with this convention extended to convolutions. ``nas.costs`` gives the
costs of any family's archs, their range over a space and draws inside a MACs window.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .arch import Arch, ArchBatch

if TYPE_CHECKING:
    from .space import SearchSpace

CONVENTION = {
    "params": "every weight of the extracted subnet: patch embed (+bias), class token, position embedding, "
              "per layer 2 LayerNorms, qkv (+bias), proj (+bias), fc1 (+bias), fc2 (+bias), final LayerNorm, "
              "classifier (+bias); with relative position m > 0 per layer 4 * (2m + 2) * head_dim table entries",
    "macs": "multiply-accumulates of one image's forward pass in the matrix products: patch-embedding conv, "
            "qkv, q@k^T, attn@v, proj, fc1, fc2, classifier on the class token (segmentation: the dense head on "
            "every patch token); with relative position also "
            "q.r_k and attn.r_v",
    "not_counted_in_macs": ("LayerNorm", "softmax", "GELU", "bias add", "residual add", "position-embedding add",
                            "attention scale"),
    "flops": "2 * macs",
    "tokens": "(img_size // patch_size) ** 2 + 1",
}


class LayerDims(NamedTuple):
    """Sizes of every layer of K archs, broadcastable against each other: ``embed_dim`` and ``tokens``
    [K, 1], ``num_heads``, ``hidden``, ``layer_on`` and ``attn_dim`` (the q/k/v width) [K, L], ``patch_size`` [K]
    (resolved, never 0)."""

    embed_dim: np.ndarray
    num_heads: np.ndarray
    hidden: np.ndarray
    tokens: np.ndarray
    layer_on: np.ndarray
    patch_size: np.ndarray
    attn_dim: np.ndarray


def layer_dims(archs: Arch | Sequence[Arch] | ArchBatch, space: "SearchSpace") -> LayerDims:
    """Resolve archs (one, a list, or an ``ArchBatch``) against their space's image and patch sizes."""
    batch = as_batch(archs)
    if batch.max_depth != space.max_depth:
        raise ValueError(f"archs have {batch.max_depth} supernet layers, space {space.name!r} has {space.max_depth}")
    if (batch.patch_size == 0).any() and len(space.patch_sizes) > 1:
        raise ValueError(f"arch.patch_size=None but space {space.name!r} has several patch sizes {space.patch_sizes}")
    patch = np.where(batch.patch_size == 0, space.patch_sizes[0], batch.patch_size)
    tokens = (space.img_size // patch) ** 2 + 1
    return LayerDims(batch.embed_dim[:, None], batch.num_heads, batch.hidden_features, tokens[:, None],
                     batch.layer_on, patch, batch.attention_width(space.head_dim))


def as_batch(archs: Arch | Sequence[Arch] | ArchBatch) -> ArchBatch:
    if isinstance(archs, ArchBatch):
        return archs
    if isinstance(archs, Arch):
        return ArchBatch.from_archs([archs])
    return ArchBatch.from_archs(archs)


def layer_params(embed_dim, num_heads, hidden, head_dim: int, relative_position: int = 0, layer_scale: bool = False,
                 attn_dim=None):
    """``attn_dim``: the q/k/v width; None: ``num_heads * head_dim``."""
    attn_dim = num_heads * head_dim if attn_dim is None else attn_dim
    norms = (2 + layer_scale) * 2 * embed_dim
    attention = (embed_dim + 1) * 3 * attn_dim + (attn_dim + 1) * embed_dim
    mlp = (embed_dim + 1) * hidden + (hidden + 1) * embed_dim
    tables = 4 * (2 * relative_position + 2) * head_dim if relative_position else 0
    return norms + attention + mlp + tables


def layer_macs_parts(embed_dim, num_heads, hidden, tokens, head_dim: int, relative_position: int = 0,
                     attn_dim=None) -> dict:
    """MACs of one transformer layer by kind: ``projections`` (qkv and output projection),
    ``attention`` (q @ k^T and attn @ v, and with relative position q . r_k and attn . r_v) and ``mlp`` (fc1 and
    fc2). ``attn_dim``: the q/k/v width; None: ``num_heads * head_dim``."""
    attn_dim = num_heads * head_dim if attn_dim is None else attn_dim
    products = 4 if relative_position else 2
    return {
        "projections": tokens * embed_dim * 4 * attn_dim,
        "attention": products * tokens * tokens * attn_dim,
        "mlp": 2 * tokens * embed_dim * hidden,
    }


def layer_macs(embed_dim, num_heads, hidden, tokens, head_dim: int, relative_position: int = 0, attn_dim=None):
    return sum(layer_macs_parts(embed_dim, num_heads, hidden, tokens, head_dim, relative_position, attn_dim).values())


def embed_params(embed_dim, patch_size, tokens, in_chans: int):
    """Patch-embedding conv with bias, class token, position embedding."""
    return (in_chans * patch_size * patch_size + 1) * embed_dim + embed_dim + tokens * embed_dim


def embed_macs(embed_dim, patch_size, tokens, in_chans: int):
    return (tokens - 1) * in_chans * patch_size * patch_size * embed_dim


def head_params(embed_dim, num_classes: int):
    """Final LayerNorm and classifier with bias (``num_classes``: the head's outputs, see :func:`head_outputs`)."""
    return 2 * embed_dim + (embed_dim + 1) * num_classes


def head_macs(embed_dim, num_classes: int, tokens=1):
    """The classifier on one pooled token, or a dense head on every patch token (``tokens``)."""
    return embed_dim * num_classes * tokens


def head_outputs(space: "SearchSpace") -> int:
    """The head's outputs: the classes, or for segmentation the classes of each of a patch's pixels."""
    return space.num_classes * (space.patch_sizes[0] ** 2 if space.task == "segmentation" else 1)


def head_tokens(space: "SearchSpace", tokens):
    """The tokens the head runs on: one pooled token, or for segmentation every patch token."""
    return tokens - 1 if space.task == "segmentation" else 1


def params_many(archs: Sequence[Arch] | ArchBatch, space: "SearchSpace") -> np.ndarray:
    """[K] int64 parameter counts (see the module docstring for what is counted)."""
    d = layer_dims(archs, space)
    per_layer = layer_params(d.embed_dim, d.num_heads, d.hidden, space.head_dim, space.relative_position,
                             space.layer_scale, d.attn_dim)
    layers = np.where(d.layer_on, per_layer, 0).sum(axis=1)
    embed = d.embed_dim[:, 0]
    return (embed_params(embed, d.patch_size, d.tokens[:, 0], space.in_chans) + layers
            + head_params(embed, head_outputs(space))).astype(np.int64)


def macs_many(archs: Sequence[Arch] | ArchBatch, space: "SearchSpace") -> np.ndarray:
    """[K] int64 multiply-accumulates of one image's forward pass (see the module docstring)."""
    d = layer_dims(archs, space)
    per_layer = layer_macs(d.embed_dim, d.num_heads, d.hidden, d.tokens, space.head_dim, space.relative_position,
                           d.attn_dim)
    layers = np.where(d.layer_on, per_layer, 0).sum(axis=1)
    embed = d.embed_dim[:, 0]
    return (embed_macs(embed, d.patch_size, d.tokens[:, 0], space.in_chans) + layers
            + head_macs(embed, head_outputs(space), head_tokens(space, d.tokens[:, 0]))).astype(np.int64)


def cost_range(space: "SearchSpace", cost: Callable[[Sequence[Arch]], np.ndarray]) -> tuple[float, float]:
    """The smallest and the largest ``cost`` (a vectorised cost such as :func:`params_many`) of an arch of ``space``:
    of its smallest and its largest arch at every patch size, since every other choice only adds work and weights."""
    def at_every_patch_size(arch: Arch) -> list[Arch]:
        return [dataclasses.replace(arch, patch_size=p) for p in space.patch_sizes] if len(space.patch_sizes) > 1 \
            else [arch]

    low = cost(at_every_patch_size(space.min_arch()))
    high = cost(at_every_patch_size(space.max_arch()))
    return float(np.min(low)), float(np.max(high))
