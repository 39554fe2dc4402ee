"""What every sampler shares: a seeded numpy generator, a step counter, and their state."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from ..family import Arch, Space

Measure = Callable[[Arch], float]  # arch -> its top-1 accuracy (0..1) on the held-out images


class ArchSampler:
    """Base class: a seeded numpy generator, a step counter and their state."""

    name: ClassVar[str] = ""
    distill: ClassVar[bool] = False   # the first arch of each step is the others' teacher
    measures: ClassVar[bool] = False  # update() needs measure(arch) -> held-out accuracy

    def __init__(self, space: Space, *, seed: int = 0, total_steps: int = 1):
        if total_steps < 1:
            raise ValueError(f"{type(self).__name__}: total_steps must be >= 1, got {total_steps}")
        self.space, self.total_steps = space, int(total_steps)
        self.rng = np.random.default_rng(seed)
        self.step = 0

    @classmethod
    def measures_with(cls, options: dict[str, Any]) -> bool:
        """Whether a sampler built with these keyword ``options`` measures held-out accuracy (before building it:
        the trainer loads the held-out images only for one that does)."""
        return cls.measures

    def sample(self) -> list[Arch]:
        archs = self.draw()
        self.step += 1
        return archs

    def draw(self) -> list[Arch]:
        raise NotImplementedError

    def update(self, archs: Sequence[Arch], losses: Sequence[float], measure: Measure | None = None
               ) -> dict[str, float]:
        return {}

    def require_measure(self, measure: Measure | None) -> Measure:
        if measure is None:
            raise ValueError(f"{self.name} sampler: update() needs measure(arch) -> held-out accuracy")
        return measure

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "step": self.step, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"sampler state is for {state.get('name')!r}, this sampler is {self.name!r}")
        self.step = int(state["step"])
        self.rng.bit_generator.state = state["rng"]
