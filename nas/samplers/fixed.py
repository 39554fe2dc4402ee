"""One subnet trained alone: the same arch at every step (a baseline: that subnet trained from scratch, or a model
to pretrain before it becomes a supernet)."""
from __future__ import annotations

from collections.abc import Mapping

from ..family import Arch, Space
from .base import ArchSampler


class FixedSampler(ArchSampler):
    """``arch`` (an ``Arch.to_dict()`` mapping; default: the space's largest) at every step."""

    name = "fixed"

    def __init__(self, space: Space, *, seed: int = 0, total_steps: int = 1, arch: Mapping | None = None):
        super().__init__(space, seed=seed, total_steps=total_steps)
        self.arch = space.max_arch() if arch is None else space.arch_type.from_dict(dict(arch))
        space.validate(self.arch)

    def draw(self) -> list[Arch]:
        return [self.arch]
