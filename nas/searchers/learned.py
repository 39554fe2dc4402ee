"""FocusFormer's learned sampler as a search: archs for a budget come straight from the sampler that was
trained with the supernet (``nas.samplers.LearnedSampler.propose``); later generations, if any, refine
them with AutoFormer's evolution."""
from __future__ import annotations

from ..arch import Arch
from .evolution import Evolution


class LearnedSamplerSearch(Evolution):
    name = "sampler"

    def __init__(self, space, feasible, *, seed: int = 0, cost=None, sampler=None, macs_limit: float | None = None,
                 **options):
        super().__init__(space, feasible, seed=seed, cost=cost, **options)
        if sampler is None or not hasattr(sampler, "propose"):
            raise ValueError("sampler search: needs the trained learned sampler of the supernet's checkpoint "
                             "(train with --sampler learned)")
        self.sampler = sampler
        self.macs_limit = float(macs_limit) if macs_limit is not None else float(space.macs_range[1])

    def propose(self, n: int) -> list[Arch]:
        if self.scores:
            return super().propose(n)
        proposed = self.sampler.propose(self.macs_limit, num=n, samples=max(64, 4 * n))
        archs = [arch for arch, ok in zip(proposed, self.feasible(proposed)) if ok]
        return archs + self.random_feasible(n - len(archs), taken=set(archs)) if len(archs) < n else archs
