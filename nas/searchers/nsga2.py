"""NSGA-II (Deb et al. 2002), a multi-objective evolutionary search: maximise the score, minimise a cost.

The population is the best ``n`` archs seen, ranked by non-dominated front and, inside a front, by crowding
distance. Offspring: two binary tournaments pick parents, a uniform crossover and a mutation make the child.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import ConfigError
from ..family import Arch
from ..racing import Interval
from .base import Searcher


def non_dominated_fronts(score: np.ndarray, cost: np.ndarray) -> list[np.ndarray]:
    """Indices of each front, best first, for maximising ``score`` while minimising ``cost``."""
    at_least = (score[:, None] >= score[None, :]) & (cost[:, None] <= cost[None, :])
    better = (score[:, None] > score[None, :]) | (cost[:, None] < cost[None, :])
    dominates = at_least & better  # dominates[i, j]: i dominates j
    dominated_by = dominates.sum(axis=0)
    fronts, remaining = [], np.ones(len(score), dtype=bool)
    while remaining.any():
        front = np.flatnonzero(remaining & (dominated_by == 0))
        fronts.append(front)
        remaining[front] = False
        dominated_by = dominated_by - dominates[front].sum(axis=0)
        dominated_by[~remaining] = -1
    return fronts


def crowding_distance(score: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Crowding distance of the points of one front (infinite at each objective's extremes)."""
    distance = np.zeros(len(score))
    for values in (score, cost):
        order = np.argsort(values, kind="stable")
        span = values[order[-1]] - values[order[0]]
        distance[order[0]] = distance[order[-1]] = np.inf
        if span > 0 and len(values) > 2:
            distance[order[1:-1]] += (values[order[2:]] - values[order[:-2]]) / span
    return distance


class NSGA2(Searcher):
    name = "nsga2"

    def __init__(self, space, feasible, *, seed: int = 0, cost=None, crossover_prob: float = 0.9,
                 mutation_prob: float = 0.2, depth_embed_prob: float = 0.4, **options):
        super().__init__(space, feasible, seed=seed, cost=cost, **options)
        if cost is None:
            raise ConfigError("nsga2: needs the cost to minimise (a FLOPs, params or latency budget)")
        if not 0.0 <= crossover_prob <= 1.0:
            raise ConfigError(f"nsga2: crossover_prob must be in [0, 1], got {crossover_prob}")
        self.crossover_prob, self.mutation_prob, self.depth_embed_prob = crossover_prob, mutation_prob, depth_embed_prob
        self.population: list[Arch] = []
        self.rank: list[int] = []
        self.crowding: list[float] = []
        self.size = 0

    def observe(self, archs: Sequence[Arch], scores: Sequence[float]) -> None:
        super().observe(archs, scores)
        pool = list(dict.fromkeys(self.population + list(archs)))
        self.size = max(self.size, len(archs))
        self.population, self.rank, self.crowding = self._select(pool, self.size)

    def contenders(self, racing: Mapping[Arch, Interval]) -> set[Arch]:
        """What NSGA-II keeps first is the Pareto front: a candidate that another (decided, or racing with its lower
        bound) confidently dominates, at no higher cost and a higher score than its upper bound, is out."""
        pool = list(dict.fromkeys([*self.scores, *racing]))
        cost = np.asarray(self.cost(pool), dtype=np.float64)
        floor = np.array([racing[a][0] if a in racing else self.scores[a] for a in pool])
        out = set()
        for i, arch in enumerate(pool):
            if arch in racing and ((cost <= cost[i]) & (floor > racing[arch][1])).any():
                out.add(arch)
        return set(racing) - out

    def _select(self, pool: list[Arch], size: int):
        score = np.array([self.scores[a] for a in pool])
        cost = np.asarray(self.cost(pool), dtype=np.float64)
        chosen, rank, crowding = [], [], []
        for level, front in enumerate(non_dominated_fronts(score, cost)):
            distance = crowding_distance(score[front], cost[front])
            for i in front[np.argsort(-distance, kind="stable")][: size - len(chosen)]:
                chosen.append(pool[i])
                rank.append(level)
                crowding.append(distance[list(front).index(i)])
            if len(chosen) == size:
                break
        return chosen, rank, crowding

    def _tournament(self) -> Arch:
        i, j = self.rng.integers(len(self.population), size=2)
        better = (self.rank[i], -self.crowding[i]) <= (self.rank[j], -self.crowding[j])
        return self.population[i if better else j]

    def propose(self, n: int) -> list[Arch]:
        if not self.population:
            return self.random_feasible(n)
        children: list[Arch] = []
        for _ in range(10 * n):
            if len(children) == n:
                break
            child = self._tournament()
            if self.rng.random() < self.crossover_prob:
                child = self.space.crossover(child, self._tournament(), self.rng)
            child = self.space.mutate(child, self.rng, self.mutation_prob, self.depth_embed_prob)
            if self.is_new(child, set(children)) and self.feasible([child])[0]:
                children.append(child)
        if len(children) < n:
            children += self.random_feasible(n - len(children), taken=set(children))
        return children

    def state_dict(self):
        return {**super().state_dict(), "population": [a.to_dict() for a in self.population], "size": self.size}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.size = int(state["size"])
        population = [self.space.arch_type.from_dict(a) for a in state["population"]]
        self.population, self.rank, self.crowding = self._select(population, self.size) if population else ([], [], [])
