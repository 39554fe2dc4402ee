"""Which subnets the supernet trains at each step: one sampler a module, chosen by name from :data:`SAMPLERS`.

Every sampler has the same small interface (:class:`~.base.ArchSampler`):

- ``sample() -> list[Arch]``: the archs to train at this step (one forward/backward each, gradients summed).
  Where ``distill`` is True, the first is the teacher: the others learn from its outputs (in-place
  distillation).
- ``update(archs, losses, measure=None) -> dict``: feedback after the step (losses averaged over all
  ranks), plus, for samplers with ``measures = True``, ``measure(arch) -> accuracy`` on held-out images (the
  same images for every arch). Returns numbers worth logging.
- ``state_dict()`` / ``load_state_dict()``: plain dicts, lists, numbers and tensors (``torch.load(...,
  weights_only=True)`` reads them back); a resumed sampler draws exactly what it would have drawn.

All randomness comes from the sampler's own generator, seeded by the config: every rank builds the same
sampler with the same seed, gets the same (rank-averaged) feedback, and so draws the same arch at each step.
Costs are MACs (``nas.costs.macs``; FLOPs are ``2 * macs``) unless a sampler says otherwise.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..family import Space
from .base import ArchSampler, Measure
from .complexity import ComplexityAwareSampler, FlopsBanks
from .elasticvit import ElasticViTSampler
from .fixed import FixedSampler
from .identity import IdentitySampler
from .learned import BUDGET_KINDS, BudgetPolicy, LearnedSampler
from .performance import PerformanceAwareSampler
from .sandwich import SandwichSampler
from .uniform import UniformSampler

SAMPLERS: dict[str, type[ArchSampler]] = {
    cls.name: cls for cls in (UniformSampler, SandwichSampler, ComplexityAwareSampler, PerformanceAwareSampler,
                              ElasticViTSampler, LearnedSampler, IdentitySampler, FixedSampler)
}


def build_sampler(name: str, space: Space, *, seed: int = 0, total_steps: int = 1, **options) -> ArchSampler:
    """The sampler registered as ``name`` in :data:`SAMPLERS`; ``options`` are its keyword arguments."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls = SAMPLERS[name]
    try:
        return cls(space, seed=seed, total_steps=total_steps, **options)
    except TypeError as err:
        raise ConfigError(f"sampler {name!r}: bad options {sorted(options)}: {err}") from err


__all__ = ["BUDGET_KINDS", "SAMPLERS", "ArchSampler", "BudgetPolicy", "ComplexityAwareSampler", "ElasticViTSampler",
           "FixedSampler", "FlopsBanks", "IdentitySampler", "LearnedSampler", "Measure", "PerformanceAwareSampler",
           "SandwichSampler",
           "UniformSampler", "build_sampler"]
