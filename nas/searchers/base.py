"""What every search algorithm shares: the ask/tell interface, budget-respecting random draws, and the
categorical encoding of a space used by the learned controllers (REINFORCE, TPE).

A searcher proposes candidates (``propose(n)``), is told their scores (``observe(archs, scores)``, higher is
better) and keeps all its randomness in its own seeded generator, which ``state_dict`` saves: a searcher
restored from its state proposes exactly what the original would have proposed next.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from ..errors import CheckpointMismatchError, InfeasibleBudgetError
from ..family import Arch, Space
from ..hybrid.arch import HybridArch
from ..racing import Interval

Feasible = Callable[[Sequence[Arch]], np.ndarray]  # archs -> bool mask: inside the budget
Cost = Callable[[Sequence[Arch]], np.ndarray]       # archs -> the cost a multi-objective search minimises


class Searcher:
    """Base class: ``propose(n)`` -> candidates inside the budget; ``observe(archs, scores)``."""

    name: ClassVar[str] = ""

    def __init__(self, space: Space, feasible: Feasible, *, seed: int = 0, cost: Cost | None = None,
                 max_draws: int = 64):
        self.space, self.feasible, self.cost = space, feasible, cost
        self.rng = np.random.default_rng(seed)
        self.max_draws = int(max_draws)
        self.scores: dict[Arch, float] = {}

    def propose(self, n: int) -> list[Arch]:
        raise NotImplementedError

    def observe(self, archs: Sequence[Arch], scores: Sequence[float]) -> None:
        for arch, score in zip(archs, scores, strict=True):
            self.scores[arch] = float(score)

    def contenders(self, racing: Mapping[Arch, Interval]) -> set[Arch]:
        """Of the candidates being raced (``nas.racing``: a confidence interval of each score so far), those this
        searcher may still keep, which must be evaluated further. By default all: the searcher learns from every
        score (REINFORCE, TPE)."""
        return set(racing)

    def best(self) -> tuple[Arch, float] | None:
        return max(self.scores.items(), key=lambda item: item[1]) if self.scores else None

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rng": self.rng.bit_generator.state,
                "scores": [(arch.to_dict(), score) for arch, score in self.scores.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise CheckpointMismatchError(f"search state is for {state.get('name')!r}, this searcher is {self.name!r}")
        self.rng.bit_generator.state = state["rng"]
        self.scores = {self.space.arch_type.from_dict(arch): score for arch, score in state["scores"]}

    def is_new(self, arch: Arch, taken: set[Arch]) -> bool:
        return arch not in self.scores and arch not in taken

    def random_feasible(self, n: int, taken: set[Arch] | None = None, batch: int = 256) -> list[Arch]:
        """``n`` uniform draws inside the budget, new to this searcher where the space allows (vectorised rejection)."""
        taken = set() if taken is None else taken
        found: list[Arch] = []
        repeats: list[Arch] = []
        for _ in range(self.max_draws):
            draws = self.space.sample_many(self.rng, batch).archs()
            for arch, ok in zip(draws, self.feasible(draws)):
                if not ok:
                    continue
                if self.is_new(arch, taken | set(found)):
                    found.append(arch)
                else:
                    repeats.append(arch)
                if len(found) == n:
                    return found
        if not found and not repeats:
            raise InfeasibleBudgetError(f"{self.name}: no arch inside the budget in {self.max_draws * batch} uniform "
                                        "draws "
                                        f"of space {self.space.name!r}; the budget is too tight for random sampling")
        return found + repeats[: n - len(found)]  # a small space may hold fewer feasible archs than asked


class GeneCoding:
    """A space as independent categorical genes (``space.genes()``: name and choices of each); every gene vector
    decodes to a valid (canonical) arch of the space (``space.decode_genes``)."""

    def __init__(self, space: Space):
        self.space = space
        self.genes = space.genes()
        self.sizes = [len(choices) for _, choices in self.genes]

    def decode(self, indices: Sequence[int]) -> Arch | HybridArch:
        if len(indices) != len(self.genes):
            raise ValueError(f"GeneCoding.decode: expected {len(self.genes)} gene indices, got {len(indices)}")
        return self.space.decode_genes(np.asarray(indices)[None]).arch(0)
