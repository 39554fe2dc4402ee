"""ElasticViT's complexity-aware sampling (Tang et al. 2023): FLOPs banks and a lazy random walk over them."""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import costs
from ..family import Arch, Space
from .base import ArchSampler


class FlopsBanks:
    """``num_banks`` MAC ranges covering the space from its smallest to its largest subnet.

    Inner edges are quantiles of the MACs of ``samples`` uniform draws, so that every bank holds an equal
    share of the space (equal-width banks would leave the top banks nearly impossible to draw into: few
    archs are close to the largest one)."""

    def __init__(self, space: Space, num_banks: int, samples: int = 4096, seed: int = 0):
        if num_banks < 1:
            raise ValueError(f"num_banks must be >= 1, got {num_banks}")
        low, high = costs.macs_range(space)
        draws = costs.macs_many(space.sample_many(np.random.default_rng(seed), samples), space)
        inner = np.quantile(draws, np.arange(1, num_banks) / num_banks)
        self.edges = np.concatenate([[low], inner, [high]]).astype(np.float64)
        self.num_banks = num_banks

    def window(self, bank: int) -> tuple[float, float]:
        return float(self.edges[bank]), float(self.edges[bank + 1])

    def bank_of(self, macs: float) -> int:
        return int(np.clip(np.searchsorted(self.edges, macs, side="right") - 1, 0, self.num_banks - 1))


class ComplexityAwareSampler(ArchSampler):
    """ElasticViT's complexity-aware sampling: the target FLOPs bank does a lazy random walk (down one,
    stay, or up one bank per step, clipped at the ends, so its long-run distribution is uniform over
    banks), and the step's subnets are drawn inside the target bank's MAC window. Subnets of adjacent
    steps thus differ little in size, which keeps the shared weights' gradients from swinging."""

    name = "complexity"

    def __init__(self, space: Space, *, seed: int = 0, total_steps: int = 1, num_banks: int = 8,
                 archs_per_step: int = 1):
        super().__init__(space, seed=seed, total_steps=total_steps)
        if archs_per_step < 1:
            raise ValueError(f"{self.name}: archs_per_step must be >= 1, got {archs_per_step}")
        self.banks = FlopsBanks(space, num_banks)
        self.archs_per_step = int(archs_per_step)
        self.bank = int(self.rng.integers(num_banks))

    def next_bank(self) -> int:
        if self.step > 0:
            self.bank = int(np.clip(self.bank + self.rng.integers(-1, 2), 0, self.banks.num_banks - 1))
        return self.bank

    def explore(self, bank: int) -> Arch:
        return costs.sample_in_flops_window(self.space, self.rng, *self.banks.window(bank))

    def draw(self) -> list[Arch]:
        bank = self.next_bank()
        return [self.explore(bank) for _ in range(self.archs_per_step)]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "bank": self.bank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.bank = int(state["bank"])
