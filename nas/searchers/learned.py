"""FocusFormer's learned sampler as a search (Liu et al. 2022): the trained sampler proposes for each budget.

Archs for a budget come straight from the sampler that was trained with the supernet
(``nas.samplers.LearnedSampler.propose``, for a budget of a kind it was trained on); later generations, if any,
refine them with AutoFormer's evolution."""
from __future__ import annotations

from ..errors import ConfigError
from ..family import Arch
from .evolution import Evolution


class LearnedSamplerSearch(Evolution):
    name = "sampler"

    def __init__(self, space, feasible, *, seed: int = 0, cost=None, sampler=None, budget=None, **options):
        """``budget``: the ``nas.budget.Budget`` to propose for (None: the largest MACs of the space)."""
        super().__init__(space, feasible, seed=seed, cost=cost, **options)
        if sampler is None or not hasattr(sampler, "propose"):
            raise ConfigError("sampler search: needs the trained learned sampler of the supernet's checkpoint "
                              "(train with --sampler learned)")
        self.sampler = sampler
        self.kind = budget.metric if budget is not None else "macs"
        if self.kind not in sampler.kinds:
            raise ConfigError(f"sampler search: the supernet's learned sampler was trained for "
                              f"{', '.join(sampler.kinds)} budgets, not {self.kind} (sampler_options.budget_kinds)")
        self.limit = budget.high if budget is not None else sampler.ranges[self.kind][1]

    def propose(self, n: int) -> list[Arch]:
        if self.scores:
            return super().propose(n)
        proposed = self.sampler.propose(self.limit, num=n, samples=max(64, 4 * n), kind=self.kind)
        archs = [arch for arch, ok in zip(proposed, self.feasible(proposed)) if ok]
        return archs + self.random_feasible(n - len(archs), taken=set(archs)) if len(archs) < n else archs
