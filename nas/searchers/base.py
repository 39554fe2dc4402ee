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

from ..arch import Arch
from ..errors import CheckpointMismatchError, InfeasibleBudgetError
from ..racing import Interval
from ..space import SearchSpace

Feasible = Callable[[Sequence[Arch]], np.ndarray]  # archs -> bool mask: inside the budget
Cost = Callable[[Sequence[Arch]], np.ndarray]       # archs -> the cost a multi-objective search minimises


class Searcher:
    """Base class: ``propose(n)`` -> candidates inside the budget; ``observe(archs, scores)``."""

    name: ClassVar[str] = ""

    def __init__(self, space: SearchSpace, feasible: Feasible, *, seed: int = 0, cost: Cost | None = None,
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
        self.scores = {Arch.from_dict(arch): score for arch, score in state["scores"]}

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
    """A space as independent categorical genes: embed dim, depth, patch size (where several), and per layer
    heads and MLP ratio; with identity layers, per layer an on/off preference. Every gene vector decodes to
    a valid (canonical) arch of the space."""

    def __init__(self, space: SearchSpace):
        self.space = space
        layers = range(space.max_depth)
        genes: list[tuple[str, tuple]] = [("embed_dim", space.embed_dims), ("depth", space.depths)]
        if len(space.patch_sizes) > 1:
            genes.append(("patch_size", space.patch_sizes))
        genes += [(f"num_heads_{i}", space.num_heads) for i in layers]
        genes += [(f"mlp_ratio_{i}", space.mlp_ratios) for i in layers]
        if space.identity_layers:
            genes += [(f"layer_on_{i}", (False, True)) for i in layers]
        self.genes = genes
        self.sizes = [len(choices) for _, choices in genes]

    def decode(self, indices: Sequence[int]) -> Arch:
        values = {name: choices[int(i)] for (name, choices), i in zip(self.genes, indices, strict=True)}
        layers, depth = self.space.max_depth, values["depth"]
        if self.space.identity_layers:
            # The layers that prefer to be on come first, in order; the depth gene says how many are on.
            order = sorted(range(layers), key=lambda i: (not values[f"layer_on_{i}"], i))
            on = set(order[:depth])
            layer_on = tuple(i in on for i in range(layers))
        else:
            layer_on = tuple(i < depth for i in range(layers))
        arch = Arch(values["embed_dim"], tuple(values[f"num_heads_{i}"] for i in range(layers)),
                    tuple(values[f"mlp_ratio_{i}"] for i in range(layers)), layer_on, values.get("patch_size"))
        return self.space.canonical(arch)
