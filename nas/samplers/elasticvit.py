"""ElasticViT's supernet training step (Tang et al. 2023, microsoft/Moonlit ``ElasticViT/process.py``,
``train_one_epoch``): the sandwich rule with in-place distillation around subnets drawn by complexity- and
performance-aware sampling."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..family import Arch, Space
from .base import Measure
from .performance import PerformanceAwareSampler


class ElasticViTSampler(PerformanceAwareSampler):
    """Each step trains the largest subnet, ``archs_per_step`` subnets of the step's FLOPs bank and the smallest
    subnet, in that order; the largest learns from the labels and the others from its outputs (``distill``).

    The bank does ElasticViT's ``adjacent_step`` walk (down one, stay or up one bank per step, staying with
    probability 2/3 at the ends) over banks that cover the space from its smallest to its largest subnet
    (:class:`~.complexity.FlopsBanks`), so the subnets of adjacent steps differ little in FLOPs; each bank subnet
    explores a fresh arch of the bank or, once the bank's memory is half full and with a probability growing over
    training, retrains one of the most accurate archs measured there (:class:`~.performance.PerformanceAwareSampler`).
    ElasticViT's config samples three bank subnets and one smallest per step and distils from external teachers; with
    no teacher here, the largest subnet is the teacher, as in its ``['max', 'uniform', 'uniform', 'min']`` modes. Its
    smallest subnet is the smallest arch of the step's bank (from an offline table); here it is the space's smallest,
    which also keeps the bottom of the space trained. Only the bank subnets are measured and remembered.
    """

    name = "elasticvit"
    distill = True

    def __init__(self, space: Space, *, seed: int = 0, total_steps: int = 1, num_banks: int = 8,
                 memory_size: int = 16, exploit_max: float = 0.8, temperature: float = 0.01,
                 refresh_every: int = 100, archs_per_step: int = 2):
        super().__init__(space, seed=seed, total_steps=total_steps, num_banks=num_banks, memory_size=memory_size,
                         exploit_max=exploit_max, temperature=temperature, refresh_every=refresh_every,
                         archs_per_step=archs_per_step)

    def draw(self) -> list[Arch]:
        return [self.space.max_arch(), *super().draw(), self.space.min_arch()]

    def update(self, archs: Sequence[Arch], losses: Sequence[float], measure: Measure | None = None
               ) -> dict[str, Any]:
        return super().update(archs[1:-1], losses[1:-1], measure)
