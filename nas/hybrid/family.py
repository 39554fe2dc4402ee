"""The hybrid family (``nas.family``): ElasticViT's and UniNet's conv / attention / MLP supernets, whose BatchNorm
statistics are re-estimated for each subnet."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple
from typing import Any

import numpy as np
import torch
from torch import Tensor

from elastic_ops.plain_hybrid import HybridNetwork

from ..family import Family, MemoryEstimate, check_archs
from . import cost
from .arch import HybridArch, HybridArchBatch
from .space import HybridSpace
from .style import TRANSITION_EXPANSION


class HybridFamily(Family):
    """The supernet, batched and export modules are imported when first used, so that spaces and costs load
    without them."""

    name = "hybrid"
    space_type = HybridSpace
    arch_type = HybridArch
    batch_norm = True
    compound_scaling = True

    def owns_space_data(self, data: Mapping[str, Any]) -> bool:
        return "stages" in data

    def build_supernet(self, space: HybridSpace, drop_path_rate: float = 0.0):
        from .supernet import HybridSupernet, HybridSupernetConfig
        return HybridSupernet(HybridSupernetConfig(space, drop_path_rate=drop_path_rate))

    def params_many(self, archs, space: HybridSpace) -> np.ndarray:
        return cost.params_many(archs, space)

    def macs_many(self, archs, space: HybridSpace) -> np.ndarray:
        return cost.macs_many(archs, space)

    def cost_range(self, space: HybridSpace, cost_of) -> tuple[float, float]:
        return cost.cost_range(space, cost_of)

    def memory_estimate(self, space: HybridSpace) -> MemoryEstimate:
        """What the supernet takes (``nas.memory``): its parameters (``nas.hybrid.cost.supernet_params``: every
        operator's and DSM's modules, some twice what any one arch holds), and the values that one image's training
        step keeps for the backward pass at the largest resolution: per block its input, the expanded hidden units
        before and after BatchNorm and activation, its output, and where a stage offers attention the scores before
        and after the softmax; then the head's features. An evaluation holds at its peak one block's input and output
        and three of its hidden maps (or the attention scores, their position bias and the softmax), where a stage's
        first conv block or MBConv DSM expands on the previous stage's larger map. The activations are counted
        in Python ints first: a space whose counts would pass numpy's int64 (the cost model's) is counted no further,
        as its activations alone are past any machine."""
        sides = space.grid_sides(space.img_size)
        stem_side = -(-space.img_size // space.stem_stride)
        stem = space.stem_channels or space.stages[0].channels[-1]
        activations = space.in_chans * space.img_size ** 2 + 3 * stem_side ** 2 * stem
        inference = space.in_chans * space.img_size ** 2 + 2 * stem_side ** 2 * stem
        widest = max(stem, space.head_features, space.pre_logits, space.num_classes)
        area_in, width_in = stem_side ** 2, stem
        for stage, side in zip(space.stages, sides):
            channels, hidden, tokens = stage.channels[-1], stage.channels[-1] * stage.expansions[-1], side * side
            scores = 2 * channels // space.head_dim * tokens * tokens if "attention" in stage.ops else 0
            activations += stage.depths[-1] * (tokens * (2 * channels + 3 * hidden) + scores)
            expansion = max(stage.expansions[-1] if "none" in stage.dsms else 1,
                            TRANSITION_EXPANSION if "mbconv" in stage.dsms else 1)
            inference = max(inference, tokens * 2 * channels + max(3 * tokens * hidden, 3 * scores // 2),
                            area_in * width_in * (1 + 3 * expansion) + tokens * channels)
            area_in, width_in = tokens, channels
            widest = max(widest, hidden * stage.kernel_sizes[-1] ** 2, tokens, space.head_expansion * channels)
        activations += 2 * max(space.head_features, space.head_expansion * space.stages[-1].channels[-1]) \
            + space.pre_logits + space.num_classes
        if activations * widest * 64 >= np.iinfo(np.int64).max:
            return MemoryEstimate(activations * widest, activations, inference)
        return MemoryEstimate(cost.supernet_params(space), activations, inference)

    def batched_pass(self, supernet, archs: Sequence[HybridArch], statistics=None) -> Callable[[Tensor], Tensor]:
        from .batched import batched_pass
        check_archs(supernet, archs)
        return batched_pass(supernet, archs, statistics)

    def pass_memory_per_image(self, supernet, archs: Sequence[HybridArch], dtype: torch.dtype) -> int:
        from .batched import pass_memory_per_image
        return pass_memory_per_image(supernet, archs, dtype)

    def grouping_key(self, arch: HybridArch) -> tuple:
        """By layout (``nas.hybrid.batched.layout``: what one pass shares), then stage by stage."""
        from .batched import layout
        return layout(arch), tuple(astuple(stage) for stage in arch.stages)

    def extract(self, supernet, arch: HybridArch) -> HybridNetwork:
        return supernet.extract(arch)

    def subnet_config(self, model: HybridNetwork, arch: HybridArch, space: HybridSpace) -> dict[str, Any]:
        """The space, from which and the arch :func:`nas.hybrid.export.rebuild` makes the network."""
        if not isinstance(model, HybridNetwork):
            raise TypeError(f"a hybrid subnet is an elastic_ops.plain_hybrid.HybridNetwork (see extract_subnet), got "
                            f"{type(model).__name__}")
        space.validate(arch)
        return space.to_dict()

    def rebuild(self, config: Mapping[str, Any], arch: HybridArch) -> HybridNetwork:
        from .export import rebuild
        return rebuild(HybridSpace.from_dict(dict(config)), arch)

    def decisions(self, space: HybridSpace) -> list[Sequence[Any]]:
        return [choices for _, choices in space.genes()]

    def decode_decisions(self, space: HybridSpace, choices: np.ndarray) -> HybridArchBatch:
        return space.decode_genes(choices)

    def layer_drop_refusal(self, space: HybridSpace) -> str | None:
        return (f"space {space.name!r} is a hybrid space, whose stages have a depth rather than layers that may be "
                "identities")


FAMILY = HybridFamily()
