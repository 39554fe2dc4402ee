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

from ..family import Family, check_archs
from . import cost
from .arch import HybridArch, HybridArchBatch
from .space import HybridSpace


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
