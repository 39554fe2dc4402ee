"""AutoFormer's sampling (Chen et al. 2021): one arch per step, uniform over the space."""
from __future__ import annotations

from ..family import Arch
from .base import ArchSampler


class UniformSampler(ArchSampler):
    """AutoFormer: one arch per step, uniform over the space (depth, then per-layer heads and MLP ratio,
    one embed dim: ``SearchSpace.sample``)."""

    name = "uniform"

    def draw(self) -> list[Arch]:
        return [self.space.sample(self.rng)]
