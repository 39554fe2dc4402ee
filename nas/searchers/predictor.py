"""Predictor-assisted search, as once-for-all (Cai et al. 2020) and ElasticViT search: an accuracy predictor fitted
on the archs evaluated so far screens many candidates, and only those it predicts best are evaluated.

The first ``initial`` proposals are uniform draws inside the budget (the predictor needs scores to learn from). From
then on, each step fits the predictor, a ridge regression of the scores on one-hot genes (``space.genes()``), and
runs an evolution on the predictor alone: ``rounds`` rounds in which the ``pool`` best predicted gene vectors so far
(seeded with the best evaluated archs and uniform draws) breed ``screened`` children by mutation and uniform
crossover. The step proposes the best predicted new archs inside the budget, except a share ``explore`` of uniform
draws inside the budget that keeps the predictor honest where it has seen nothing. Screening costs microseconds per
candidate; an evaluation costs a pass over the search data, which is what this search saves.

All randomness is the searcher's own generator, and the predictor is refitted from the scores on every step, so the
state is the generator, the scores and each arch's genes: a restored search proposes what the original would have.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError, InfeasibleBudgetError
from ..family import Arch
from ..racing import Interval, top_k_contenders
from .base import GeneCoding, Searcher


class PredictorSearch(Searcher):
    name = "predictor"

    def __init__(self, space, feasible, *, seed: int = 0, cost=None, initial: int = 32, screened: int = 1024,
                 rounds: int = 4, pool: int = 64, mutation_genes: int = 2, explore: float = 0.1, ridge: float = 1.0,
                 **options):
        super().__init__(space, feasible, seed=seed, cost=cost, **options)
        if initial < 2 or screened < 1 or rounds < 1 or pool < 2 or mutation_genes < 1 or ridge <= 0 \
                or not 0.0 <= explore <= 1.0:
            raise ConfigError("predictor: need initial >= 2, screened >= 1, rounds >= 1, pool >= 2, mutation_genes >= "
                              f"1, ridge > 0 and explore in [0, 1], got initial={initial}, screened={screened}, "
                              f"rounds={rounds}, pool={pool}, mutation_genes={mutation_genes}, ridge={ridge}, "
                              f"explore={explore}")
        self.initial, self.screened, self.rounds, self.pool = int(initial), int(screened), int(rounds), int(pool)
        self.mutation_genes, self.explore, self.ridge = int(mutation_genes), float(explore), float(ridge)
        self.coding = GeneCoding(space)
        self.genotypes: dict[Arch, tuple[int, ...]] = {}  # the genes each proposed arch was decoded from

    def contenders(self, racing: Mapping[Arch, Interval]) -> set[Arch]:
        """The predictor learns from every score, but what the search keeps is its best: racing may stop the rest
        once they are confidently below it (their partial scores still fit the predictor)."""
        return top_k_contenders(self.scores, racing, 1)

    # -- proposing -----------------------------------------------------------------------------------------
    def propose(self, n: int) -> list[Arch]:
        if len(self.scores) < self.initial:
            return self._feasible_new(self.coding.uniform(self.rng, 256), n, set(), draws=self.max_draws)
        explore = min(n, math.floor(self.explore * n + self.rng.random()))  # the share in expectation
        found = self._feasible_new(self._screen(), n - explore, set(), draws=1)
        return found + self._feasible_new(self.coding.uniform(self.rng, 256), n - len(found), set(found),
                                          draws=self.max_draws)

    def _feasible_new(self, genes: np.ndarray, n: int, taken: set[Arch], draws: int) -> list[Arch]:
        """Up to ``n`` archs new to this search and inside the budget, decoded from ``genes`` in order; with ``draws``
        > 1, more uniform batches are drawn until ``n`` are found (an arch already scored fills the rest where the
        space holds too few new ones)."""
        found: list[Arch] = []
        repeats: list[Arch] = []
        for attempt in range(draws):
            if attempt:
                genes = self.coding.uniform(self.rng, 256)
            archs = self.space.decode_genes(genes).archs()
            for row, arch, ok in zip(genes, archs, self.feasible(archs)):
                if len(found) == n:
                    return found
                if not ok:
                    continue
                if self.is_new(arch, taken | set(found)):
                    self.genotypes.setdefault(arch, tuple(int(g) for g in row))
                    found.append(arch)
                elif arch not in repeats and arch not in found:
                    repeats.append(arch)
            if len(found) == n:
                return found
        if draws > 1 and not found and not repeats:
            raise InfeasibleBudgetError(f"predictor: no arch inside the budget in {draws * 256} uniform draws of space "
                                        f"{self.space.name!r}; the budget is too tight for random sampling")
        return found + (repeats[: n - len(found)] if draws > 1 else [])

    def _screen(self) -> np.ndarray:
        """Gene vectors, best predicted first: an evolution of ``rounds`` rounds on the predictor alone."""
        weights = self._fit()
        ranked = sorted(self.scores, key=self.scores.__getitem__, reverse=True)
        pool = np.concatenate([np.array([self.genotypes[a] for a in ranked[: self.pool]]),
                               self.coding.uniform(self.rng, self.pool)])
        for _ in range(self.rounds):
            parents = pool[self.rng.integers(len(pool), size=self.screened)]
            mates = pool[self.rng.integers(len(pool), size=self.screened)]
            children = np.where(self.rng.random(parents.shape) < 0.5, parents, mates)  # uniform crossover
            mutated = self.rng.random(self.screened) < 0.5
            children[mutated] = self.coding.mutate(self.rng, children[mutated], self.mutation_genes)
            pool = np.unique(np.concatenate([pool, children]), axis=0)
            pool = pool[np.argsort(-(self.coding.one_hot(pool) @ weights), kind="stable")][: self.screened]
        return pool

    def _fit(self) -> np.ndarray:
        """Ridge weights of the scores on one-hot genes (the constant feature absorbs the mean, unpenalised)."""
        archs = list(self.scores)
        x = self.coding.one_hot(np.array([self.genotypes[a] for a in archs]))
        y = np.array([self.scores[a] for a in archs])
        penalty = self.ridge * np.eye(x.shape[1])
        penalty[-1, -1] = 0.0
        return np.linalg.solve(x.T @ x + penalty, x.T @ y)

    def predict(self, archs: Sequence[Arch]) -> np.ndarray:
        """The predictor's scores of ``archs`` this search proposed (fitted on every score so far)."""
        return self.coding.one_hot(np.array([self.genotypes[a] for a in archs])) @ self._fit()

    # -- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(),
                "genotypes": [(arch.to_dict(), list(genes)) for arch, genes in self.genotypes.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        try:
            arch_type = self.space.arch_type
            genotypes = {arch_type.from_dict(a): tuple(int(g) for g in genes) for a, genes in state["genotypes"]}
            if any(len(g) != len(self.coding.sizes) or not all(0 <= v < s for v, s in zip(g, self.coding.sizes))
                   for g in genotypes.values()):
                raise ValueError("genes out of the space's choices")
            if not all(a in genotypes for a in self.scores):
                raise KeyError("a scored arch without genes")
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointError(f"the predictor search state is malformed: {error!r}") from error
        self.genotypes = genotypes


__all__ = ["PredictorSearch"]
