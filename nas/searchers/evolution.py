"""AutoFormer's evolutionary search (Chen et al. 2021, ``evolution.py`` of microsoft/Cream).

Generation 0 is ``n`` uniform draws inside the budget. After that, each generation of ``n`` is ``mutations``
mutants and ``crossovers`` children of the ``parents`` best archs seen so far (AutoFormer: 25 + 25 for a
population of 50; fewer where ``n`` is smaller), topped up with uniform draws to ``n``; a mutant or child outside
the budget, or already seen, is drawn again (up to ``10x`` as many tries, as AutoFormer does).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import ConfigError
from ..family import Arch
from ..racing import Interval, top_k_contenders
from .base import Searcher


class Evolution(Searcher):
    name = "evolution"

    def __init__(self, space, feasible, *, seed: int = 0, cost=None, parents: int = 10, mutations: int = 25,
                 crossovers: int = 25, mutation_prob: float = 0.2, depth_embed_prob: float = 0.4, **options):
        super().__init__(space, feasible, seed=seed, cost=cost, **options)
        if parents < 1 or mutations < 0 or crossovers < 0 or mutations + crossovers < 1:
            raise ConfigError(f"evolution: need parents >= 1 and mutations + crossovers >= 1, got parents={parents}, "
                             f"mutations={mutations}, crossovers={crossovers}")
        for label, prob in (("mutation_prob", mutation_prob), ("depth_embed_prob", depth_embed_prob)):
            if not 0.0 <= prob <= 1.0:
                raise ConfigError(f"evolution: {label} must be in [0, 1], got {prob}")
        self.num_parents, self.mutations, self.crossovers = int(parents), int(mutations), int(crossovers)
        self.mutation_prob, self.depth_embed_prob = float(mutation_prob), float(depth_embed_prob)

    def contenders(self, racing: Mapping[Arch, Interval]) -> set[Arch]:
        """What evolution keeps is its ``parents`` best: a candidate confidently below them is out."""
        return top_k_contenders(self.scores, racing, self.num_parents)

    def parents(self) -> list[Arch]:
        ranked = sorted(self.scores.items(), key=lambda item: item[1], reverse=True)
        return [arch for arch, _ in ranked[: self.num_parents]]

    def propose(self, n: int) -> list[Arch]:
        parents = self.parents()
        if not parents:
            return self.random_feasible(n)
        mutations = min(self.mutations, n)
        crossovers = min(self.crossovers, n - mutations)
        children: list[Arch] = []
        children += self._offspring(mutations, children,
                                    lambda: self.space.mutate(self._pick(parents), self.rng, self.mutation_prob,
                                                              self.depth_embed_prob))
        children += self._offspring(crossovers, children,
                                    lambda: self.space.crossover(self._pick(parents), self._pick(parents), self.rng))
        if len(children) < n:
            children += self.random_feasible(n - len(children), taken=set(children))
        return children

    def _pick(self, archs: Sequence[Arch]) -> Arch:
        return archs[int(self.rng.integers(len(archs)))]

    def _offspring(self, count: int, taken: list[Arch], make) -> list[Arch]:
        found: list[Arch] = []
        for _ in range(10 * count):
            if len(found) == count:
                break
            child = make()
            if self.is_new(child, set(taken) | set(found)) and self.feasible([child])[0]:
                found.append(child)
        return found
