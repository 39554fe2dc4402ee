"""The isotropic ViT family (``nas.family``): AutoFormer's, ViTAS's and SuperSAM's plain ViT supernets."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from elastic_ops.plain import VisionTransformer

from ..family import Family, MemoryEstimate
from . import cost
from .arch import Arch, ArchBatch
from .space import SearchSpace


class VisionTransformerFamily(Family):
    """The supernet, batched and export modules are imported when first used, so that spaces and costs load
    without them."""

    name = "vit"
    space_type = SearchSpace
    arch_type = Arch
    two_sided = True
    pretrained_init = True

    def owns_space_data(self, data: Mapping[str, Any]) -> bool:
        return "embed_dims" in data and "stages" not in data

    def build_supernet(self, space: SearchSpace, drop_path_rate: float = 0.0):
        from .supernet import SupernetConfig, VisionTransformerSupernet
        return VisionTransformerSupernet(SupernetConfig.from_space(space, drop_path_rate=drop_path_rate))

    def params_many(self, archs, space: SearchSpace) -> np.ndarray:
        return cost.params_many(archs, space)

    def macs_many(self, archs, space: SearchSpace) -> np.ndarray:
        return cost.macs_many(archs, space)

    def memory_estimate(self, space: SearchSpace) -> MemoryEstimate:
        """What the supernet takes (``nas.memory``): the parameters of its largest arch as ``nas.vit.cost`` counts them
        (with an embedding per patch size where they are private, and with ``private_qk`` the q/k projections of
        every smaller head count), and the values that one image's training step keeps for the backward pass: per
        layer the LayerNorms' and residual branches' inputs and outputs, q, k, v and the attention output, the
        attention scores before and after the softmax, and the MLP's hidden units before and after the GELU. An
        evaluation holds at its peak one layer's input and output and q, k, v, the scores before and after the
        softmax, or the MLP's hidden units before and after the GELU. Python ints throughout: nothing is allocated and
        nothing overflows, whatever a file declares."""
        embed, depth, heads, hidden = space.max_embed_dim, space.max_depth, space.max_heads, space.max_hidden
        attention, tokens, patch = heads * space.head_dim, space.max_tokens, space.patch_sizes[0]
        embeddings = len(space.patch_sizes) if space.private_class_tokens else 1
        parameters = (embeddings * cost.embed_params(embed, patch, tokens, space.in_chans)
                      + depth * cost.layer_params(embed, heads, hidden, space.head_dim, space.relative_position)
                      + cost.head_params(embed, cost.head_outputs(space)))
        if space.private_qk:  # with attention widths, each holds the stored width
            parameters += depth * sum(2 * (embed + 1) * (attention if space.attn_dims else h * space.head_dim)
                                      for h in space.num_heads[:-1])
        per_layer = tokens * (6 * embed + 4 * attention + 2 * hidden) + 2 * heads * tokens * tokens
        activations = space.in_chans * space.img_size ** 2 + 2 * tokens * embed + depth * per_layer
        inference = 2 * tokens * embed + max(3 * tokens * attention + 2 * heads * tokens * tokens, 2 * tokens * hidden)
        return MemoryEstimate(parameters, activations, max(inference, space.in_chans * space.img_size ** 2))

    def cost_range(self, space: SearchSpace, cost_of) -> tuple[float, float]:
        return cost.cost_range(space, cost_of)

    def batched_pass(self, supernet, archs: Sequence[Arch], statistics=None) -> Callable[[Tensor], Tensor]:
        from . import batched
        return lambda images: batched.forward_by_patch_size(supernet, images, archs)

    def pass_memory_per_image(self, supernet, archs: Sequence[Arch], dtype: torch.dtype) -> int:
        from .batched import pass_memory_per_image
        return pass_memory_per_image(supernet, archs, dtype)

    def grouping_key(self, arch: Arch) -> tuple:
        """By patch size, embed dim, then layer by layer: subnets of one embed dim (less padding) and with common
        leading layers (computed once: ``nas.vit.batched``) share a pass."""
        return arch.patch_size or 0, arch.embed_dim, tuple(zip(arch.layer_on, arch.num_heads, arch.mlp_ratio,
                                                                arch.attn_dim or (0,) * arch.max_depth))

    def extract(self, supernet, arch: Arch) -> VisionTransformer:
        from .export import extract
        return extract(supernet, arch)

    def subnet_config(self, model: VisionTransformer, arch: Arch, space: SearchSpace) -> dict[str, Any]:
        from .export import model_kwargs
        if not isinstance(model, VisionTransformer):
            raise TypeError(f"a ViT subnet is an elastic_ops.plain.VisionTransformer (see extract_subnet), got "
                            f"{type(model).__name__}")
        return model_kwargs(model)

    def rebuild(self, config: Mapping[str, Any], arch: Arch) -> VisionTransformer:
        return VisionTransformer(**config)

    def decisions(self, space: SearchSpace) -> list[Sequence[Any]]:
        """Embed dim, depth, patch size, then heads and MLP ratio of every layer and, in a space with identity
        layers, whether each layer would rather be on (the layout saved policies were trained with), and, in a space
        with attention widths, each layer's width."""
        layers = space.max_depth
        return ([space.embed_dims, space.depths, space.patch_sizes] + [space.num_heads] * layers
                + [space.mlp_ratios] * layers + [(False, True)] * (layers if space.identity_layers else 0)
                + [space.attn_dims] * (layers if space.attn_dims else 0))

    def decode_decisions(self, space: SearchSpace, choices: np.ndarray) -> ArchBatch:
        """The first ``depth`` layers on or, with identity layers, the first ``depth`` of the layers in order of
        preference (those that would rather be on first)."""
        layers = space.max_depth
        depth = np.asarray(space.depths)[choices[:, 1]]
        widths_at = 3 + (3 if space.identity_layers else 2) * layers
        if space.identity_layers:
            order = np.argsort(choices[:, 3 + 2 * layers:widths_at] == 0, axis=1, kind="stable")  # preferred-on first
            layer_on = np.argsort(order, axis=1) < depth[:, None]
        else:
            layer_on = np.arange(layers) < depth[:, None]
        patch = (np.asarray(space.patch_sizes)[choices[:, 2]] if len(space.patch_sizes) > 1
                 else np.zeros(len(choices), dtype=np.int64))
        batch = space.batch_type(np.asarray(space.embed_dims)[choices[:, 0]],
                          np.asarray(space.num_heads)[choices[:, 3:3 + layers]],
                          np.asarray(space.mlp_ratios)[choices[:, 3 + layers:3 + 2 * layers]], layer_on, patch,
                          np.asarray(space.attn_dims)[choices[:, widths_at:]] if space.attn_dims else None)
        return space.canonical_batch(batch)

    def layer_drop_refusal(self, space: SearchSpace) -> str | None:
        if space.identity_layers:
            return None
        return (f"space {space.name!r} has identity_layers=False (only the first `depth` layers may be on, where a "
                "ViTAS-style space has identity layers)")


FAMILY = VisionTransformerFamily()
