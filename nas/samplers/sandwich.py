"""The sandwich rule with in-place distillation (Yu & Huang 2019, universally slimmable networks; used by BigNAS),
optionally with SuperSAM's layer-wise structured pruning: a drop probability per layer for the random archs."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..family import Arch, Space
from .base import ArchSampler
from .identity import check_drop_space, drop_layers, uniform_widths


class SandwichSampler(ArchSampler):
    """The sandwich rule: the largest, the smallest and ``num_random`` uniform archs per step; the largest learns
    from the labels (or, with a pretrained teacher, from it), the others from its outputs (in-place distillation).

    BigNAS draws two random archs; one is the default here because it trained the small presets better
    (digits-tiny, 1360 steps: smallest/largest 88.0/89.7% with one, 78.3/85.5% with two) in less time.

    ``drop_profile`` (SuperSAM; spaces with identity layers): the random archs take uniform widths in every layer,
    then layer ``i`` is dropped with probability ``drop_profile[i]`` (a list of one probability per layer, or
    ``"linear"``: ``max_drop * (i + 1) / L``, deeper layers dropped more); where fewer layers stay on than the
    space's smallest depth, the dropped layers whose draws came closest to their probability come back on.
    """

    name = "sandwich"
    distill = True

    def __init__(self, space: Space, *, seed: int = 0, total_steps: int = 1, num_random: int = 1,
                 drop_profile: str | Sequence[float] | None = None, max_drop: float = 0.5):
        super().__init__(space, seed=seed, total_steps=total_steps)
        if num_random < 0:
            raise ValueError(f"sandwich: num_random must be >= 0, got {num_random}")
        self.num_random = int(num_random)
        self.drop_profile = None
        if drop_profile is not None:
            check_drop_space(space, "sandwich with drop_profile")
            layers = space.max_depth
            if isinstance(drop_profile, str):
                if drop_profile != "linear" or not 0 <= max_drop <= 1:
                    raise ValueError(f"sandwich: drop_profile must be 'linear' (with 0 <= max_drop <= 1) or a list "
                                     f"of {layers} probabilities, got {drop_profile!r} and max_drop={max_drop}")
                profile = max_drop * np.arange(1, layers + 1) / layers
            else:
                profile = np.asarray(drop_profile, dtype=np.float64)
                if profile.shape != (layers,) or not ((profile >= 0) & (profile <= 1)).all():
                    raise ValueError(f"sandwich: drop_profile must list {layers} probabilities in [0, 1], got "
                                     f"{list(drop_profile)}")
            self.drop_profile = profile

    def draw(self) -> list[Arch]:
        if self.drop_profile is None:
            random = [self.space.sample(self.rng) for _ in range(self.num_random)]
        else:
            widths, uniforms = uniform_widths(self.space, self.rng, self.num_random)
            random = drop_layers(self.space, widths, uniforms, self.drop_profile)
            random = [self.space.canonical(random.arch(i)) for i in range(self.num_random)]
        return [self.space.max_arch(), self.space.min_arch()] + random
