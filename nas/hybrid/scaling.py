"""UniNet's scaling of a searched baseline into a family of models (Liu et al. 2022, after EfficientNet's compound
scaling, Tan & Le 2019): depth, width and resolution grow together, ``alpha ** phi``, ``beta ** phi`` and
``gamma ** phi`` times the baseline's, so that the FLOPs grow about ``(alpha * beta ** 2 * gamma ** 2) ** phi`` times.

Each member keeps the baseline's operators, DSMs, expansions, kernel sizes and V-scales, with the sizes rounded to the
space's rules: a depth up to the next whole block (EfficientNet's ``round_repeats``), channels to a multiple of 8 and,
in a stage with attention (its blocks or its DSM), of the head dim (EfficientNet's ``round_filters``, so that the heads
are whole), the resolution to a multiple of the network's total stride. The members grow past the searched space, and
UniNet trains each from scratch: every member comes with a space of its own that holds it alone (the baseline space
with each stage's choices narrowed to the member's, and a stem of its own width grown as the first stage), which
``python -m nas.train --space`` trains and the cost model counts. A member's MLP stages size their token MLP for its own
grid, so the baseline's own network differs from the supernet's subnet (sized for the largest grid of the searched
space) where it has an MLP stage and runs below the searched space's largest resolution.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .arch import HybridArch
from .cost import counts, make_divisible
from .space import ATTENTION_DSMS, HybridSpace, StageChoices


@dataclass(frozen=True)
class CompoundScaling:
    """The per-step growth of depth (``alpha``), width (``beta``) and resolution (``gamma``); EfficientNet's grid search
    gave 1.2, 1.1 and 1.15 under ``alpha * beta ** 2 * gamma ** 2 ~ 2``."""

    alpha: float = 1.2
    beta: float = 1.1
    gamma: float = 1.15

    def __post_init__(self):
        if min(self.alpha, self.beta, self.gamma) < 1.0:
            raise ValueError(f"compound scaling: alpha, beta and gamma must be >= 1, got {self.alpha}, {self.beta}, "
                             f"{self.gamma}")

    @property
    def flops_growth(self) -> float:
        """The FLOPs growth per step that the coefficients state: ``alpha * beta ** 2 * gamma ** 2``."""
        return self.alpha * self.beta ** 2 * self.gamma ** 2


@dataclass(frozen=True)
class Member:
    """One member of a family: ``phi`` steps up from the baseline, its arch, the space that holds it alone, and its
    MACs and params (``nas.hybrid.cost``, counted in that space)."""

    phi: int
    arch: HybridArch
    space: HybridSpace
    macs: int
    params: int


def total_stride(space: HybridSpace) -> int:
    return space.stem_stride * math.prod(stage.stride for stage in space.stages)


def scale_arch(space: HybridSpace, arch: HybridArch, phi: int, scaling: CompoundScaling) -> HybridArch:
    """``arch`` (validated against ``space``) grown ``phi`` steps, rounded to the space's rules (module docstring);
    ``phi = 0`` is ``arch`` itself."""
    space.validate(arch)
    if phi == 0:
        return arch
    depth, width, resolution = (factor ** phi for factor in (scaling.alpha, scaling.beta, scaling.gamma))
    stages = []
    for stage in arch.stages:
        attention = stage.op == "attention" or stage.dsm in ATTENTION_DSMS
        divisor = math.lcm(8, space.head_dim) if attention else 8
        channels = int(make_divisible(np.float64(stage.channels * width), divisor))
        stages.append(dataclasses.replace(stage, depth=math.ceil(stage.depth * depth - 1e-9),
                                          channels=max(channels, stage.channels)))
    stride = total_stride(space)
    side = max(round(arch.resolution * resolution / stride) * stride, arch.resolution)
    return HybridArch(side, tuple(stages))


def space_of(space: HybridSpace, arch: HybridArch, name: str, stem_channels: int | None = None) -> HybridSpace:
    """The space holding ``arch`` alone: ``space``'s structure (head, strides, squeeze-excite, style) with every choice
    narrowed to ``arch``'s, and ``stem_channels`` where ``space`` fixes the stem's width (default: as it is)."""
    stages = tuple(StageChoices(ops=(s.op,), depths=(s.depth,), channels=(s.channels,), expansions=(s.expansion,),
                                kernel_sizes=(s.kernel_size,) if s.op == "conv" else choices.kernel_sizes,
                                v_scales=(s.v_scale,) if s.v_scale else (), dsms=(s.dsm,), stride=choices.stride,
                                se=choices.se)
                   for s, choices in zip(arch.stages, space.stages))
    stem = space.stem_channels if stem_channels is None or space.stem_channels is None else stem_channels
    return dataclasses.replace(space, name=name, resolutions=(arch.resolution,), stages=stages, stem_channels=stem)


def compound_family(space: HybridSpace, baseline: HybridArch, members: int,
                    scaling: CompoundScaling = CompoundScaling(), name: str = "family") -> list[Member]:
    """The baseline (``phi = 0``) and ``members`` scaled models (``phi = 1 .. members``), each with the space that holds
    it alone (named ``<name>-b<phi>``)."""
    if members < 0:
        raise ValueError(f"compound scaling: members must be >= 0, got {members}")
    family = []
    for phi in range(members + 1):
        arch = scale_arch(space, baseline, phi, scaling)
        stem = None  # a stem of its own width grows with the first stage's
        if space.stem_channels is not None:
            growth = arch.stages[0].channels / baseline.stages[0].channels
            stem = max(int(make_divisible(np.float64(space.stem_channels * growth), 8)), space.stem_channels)
        own = space_of(space, arch, f"{name}-b{phi}", stem)
        own.validate(arch)
        params, macs = counts(arch, own)
        family.append(Member(phi, arch, own, int(macs[0]), int(params[0])))
    return family


__all__ = ["CompoundScaling", "Member", "compound_family", "scale_arch", "space_of", "total_stride"]
