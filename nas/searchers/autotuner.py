"""A program autotuner (OpenTuner, Ansel et al. 2014): an ensemble of search techniques chosen by an AUC bandit.

Each proposal comes from one technique, the one the bandit ranks first (ties broken at random) among those with
enough scored archs to work from; a technique that has nothing to offer (no new arch inside the budget in ``tries``
draws) passes to the next and is told 0. When the scores come back,
a technique is credited with 1 for each arch that was a new best when it was told, else 0. The bandit is
OpenTuner's ``AUCBanditQueue`` (Fialho et al. 2010): over a sliding ``window`` of the latest results, a technique's
exploitation term is the area under its credit curve (credits late in its own history weigh more), plus ``C`` times
``sqrt(2 log2(len(window)) / uses)``; an unused technique comes first. Inside one step's batch the picks already
made count as uses, so that a batch is not all one technique before any result is in.

Techniques, on the categorical genes of the space (``space.genes()``):

- ``random``: uniform draws inside the budget.
- ``hillclimb``: the best arch so far with ``mutation_genes`` of its genes redrawn.
- ``de``: differential evolution (DE/rand/1/bin) over the ``population`` best archs, genes as choice indices.
- ``model``: a ridge regression of the scores on one-hot genes, which picks the best predicted of
  ``model_candidates`` draws (half uniform, half mutants of the best).

Why not the ``opentuner`` package itself: it installs and imports here, but it draws from Python's global
``random`` module (no generator per search, so no exact resume), keeps its results in an SQLAlchemy database and its
techniques' state in live Python objects (generators), none of which save as plain data without pickle, and it
needs the Python 2 compatibility package ``future``. This module is the same algorithm on numpy. Its state is the
bandit's history and which technique proposed each pending arch, plus each arch's genes; all plain data.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError, InfeasibleBudgetError
from ..family import Arch
from .base import GeneCoding, Searcher

TECHNIQUES = ("random", "hillclimb", "de", "model")
MIN_SCORES = {"random": 0, "hillclimb": 1, "de": 4, "model": 8}  # scored archs a technique needs to work from


class AUCBandit:
    """OpenTuner's AUC bandit over ``keys``: ``ordered(rng, pending)`` ranks them, ``record(key, credit)`` learns."""

    def __init__(self, keys: Sequence[str], c: float = 0.05, window: int = 500):
        self.keys, self.c, self.window = tuple(keys), float(c), int(window)
        self.history: deque[tuple[str, int]] = deque()
        self.uses = dict.fromkeys(self.keys, 0)
        self.auc_sum = dict.fromkeys(self.keys, 0)
        self.auc_decay = dict.fromkeys(self.keys, 0)

    def exploitation(self, key: str) -> float:
        """In [0, 1]: ``sum(position of each credited use) * 2 / (uses * (uses + 1))`` over the window."""
        uses = self.uses[key]
        return self.auc_sum[key] * 2.0 / (uses * (uses + 1.0)) if uses else 0.0

    def score(self, key: str, pending: int = 0) -> float:
        uses = self.uses[key] + pending
        if uses == 0:
            return math.inf
        exploration = math.sqrt(2.0 * math.log2(max(len(self.history) + pending, 1)) / uses)
        return self.exploitation(key) + self.c * exploration

    def ordered(self, rng: np.random.Generator, pending: dict[str, int] | None = None) -> list[str]:
        """The keys, best first; ``pending`` counts picks made since the last results as uses."""
        pending = pending or {}
        keys = [self.keys[i] for i in rng.permutation(len(self.keys))]  # random order breaks ties
        return sorted(keys, key=lambda k: self.score(k, pending.get(k, 0)), reverse=True)

    def record(self, key: str, credit: int) -> None:
        self.history.append((key, int(credit)))
        self.uses[key] += 1
        if credit:
            self.auc_sum[key] += self.uses[key]
            self.auc_decay[key] += 1
        if len(self.history) > self.window:
            old, old_credit = self.history.popleft()
            self.uses[old] -= 1
            self.auc_sum[old] -= self.auc_decay[old]
            if old_credit:
                self.auc_decay[old] -= 1

    def credits(self) -> dict[str, int]:
        """Credited uses of each key in the window."""
        return {key: sum(c for k, c in self.history if k == key) for key in self.keys}


class ProgramAutotuner(Searcher):
    name = "autotuner"

    def __init__(self, space, feasible, *, seed: int = 0, cost=None, techniques: Sequence[str] = TECHNIQUES,
                 bandit_c: float = 0.05, bandit_window: int = 500, population: int = 20, mutation_genes: int = 2,
                 de_weight: float = 0.7, de_crossover: float = 0.5, model_candidates: int = 256,
                 ridge: float = 1.0, tries: int = 16, **options):
        super().__init__(space, feasible, seed=seed, cost=cost, **options)
        unknown = [t for t in techniques if t not in TECHNIQUES]
        if unknown or not techniques:
            raise ConfigError(f"autotuner: techniques must be some of {', '.join(TECHNIQUES)}, got {list(techniques)}")
        if population < 4 or mutation_genes < 1 or tries < 1 or model_candidates < 1 or ridge <= 0:
            raise ConfigError("autotuner: need population >= 4, mutation_genes >= 1, tries >= 1, model_candidates >= "
                              f"1 and ridge > 0, got {population}, {mutation_genes}, {tries}, {model_candidates}, "
                              f"{ridge}")
        if not (0 < de_weight <= 2 and 0 <= de_crossover <= 1 and bandit_c >= 0 and bandit_window >= 1):
            raise ConfigError("autotuner: need 0 < de_weight <= 2, 0 <= de_crossover <= 1, bandit_c >= 0 and "
                              "bandit_window >= 1")
        self.techniques = tuple(dict.fromkeys(techniques))
        self.bandit = AUCBandit(self.techniques, bandit_c, bandit_window)
        self.coding = GeneCoding(space)
        self.sizes = np.array(self.coding.sizes)
        self.population, self.mutation_genes = int(population), int(mutation_genes)
        self.de_weight, self.de_crossover = float(de_weight), float(de_crossover)
        self.model_candidates, self.ridge, self.tries = int(model_candidates), float(ridge), int(tries)
        self.genotypes: dict[Arch, tuple[int, ...]] = {}  # the genes each proposed arch was decoded from
        self.pending: dict[Arch, list[str]] = {}          # techniques that proposed an arch not yet scored
        self.uses: dict[str, int] = dict.fromkeys(self.techniques, 0)  # proposals per technique, all time
        self._fit: tuple[int, np.ndarray] | None = None  # the model's ridge weights and how many scores they fit

    # -- proposing -----------------------------------------------------------------------------------------
    def propose(self, n: int) -> list[Arch]:
        found: list[Arch] = []
        picks: dict[str, int] = {}
        taken: set[Arch] = set()
        for _ in range(n):
            for technique in self.bandit.ordered(self.rng, picks):
                if len(self.scores) < MIN_SCORES[technique]:
                    continue  # not ready: it needs more scored archs to work from
                arch = self._from(technique, taken)
                if arch is not None:
                    break
                self.bandit.record(technique, 0)  # nothing to offer counts as no new best (as OpenTuner)
            else:
                arch = self._fallback(taken)
                technique = "random" if "random" in self.techniques else self.techniques[0]
            picks[technique] = picks.get(technique, 0) + 1
            self.uses[technique] += 1
            self.pending.setdefault(arch, []).append(technique)
            taken.add(arch)
            found.append(arch)
        return found

    def _fallback(self, taken: set[Arch]) -> Arch:
        """Every technique came up empty: uniform draws of genes, ``max_draws`` batches of 256, until one decodes to
        an arch inside the budget (one already scored, where no new one turns up)."""
        repeat = None
        for _ in range(self.max_draws):
            genes = self._uniform(256)
            archs = self.space.decode_genes(genes).archs()
            for row, arch, ok in zip(genes, archs, self.feasible(archs)):
                if ok and self.is_new(arch, taken):
                    self.genotypes.setdefault(arch, tuple(int(g) for g in row))
                    return arch
                if ok and repeat is None:
                    repeat = arch
            if repeat is not None:
                return repeat
        raise InfeasibleBudgetError(f"autotuner: no arch inside the budget in {self.max_draws * 256} uniform draws "
                                    f"of space {self.space.name!r}; the budget is too tight for random sampling")

    def _from(self, technique: str, taken: set[Arch]) -> Arch | None:
        """A new arch inside the budget from ``technique`` in up to ``tries`` draws, or None. A draw is one gene
        vector, or several in order of preference (the model's)."""
        for _ in range(self.tries):
            rows = getattr(self, f"_{technique}")()
            for genes in np.clip(np.atleast_2d(rows), 0, self.sizes - 1):
                genes = tuple(int(g) for g in genes)
                arch = self.coding.decode(genes)
                if self.is_new(arch, taken) and self.feasible([arch])[0]:
                    self.genotypes.setdefault(arch, genes)
                    return arch
        return None

    def _ranked(self) -> list[np.ndarray]:
        ranked = sorted(self.scores.items(), key=lambda item: item[1], reverse=True)
        return [np.array(self.genotypes[arch]) for arch, _ in ranked]

    def _uniform(self, count: int | None = None) -> np.ndarray:
        shape = (len(self.sizes),) if count is None else (count, len(self.sizes))
        return np.floor(self.rng.random(shape) * self.sizes).astype(np.int64)

    def _mutants(self, genes: np.ndarray, count: int) -> np.ndarray:
        """``count`` copies of ``genes``, each with ``mutation_genes`` genes redrawn."""
        rows = np.repeat(genes[None], count, axis=0)
        where = np.argsort(self.rng.random(rows.shape), axis=1)[:, :min(self.mutation_genes, rows.shape[1])]
        redrawn = np.floor(self.rng.random(where.shape) * self.sizes[where]).astype(np.int64)
        np.put_along_axis(rows, where, redrawn, axis=1)
        return rows

    def _random(self) -> np.ndarray:
        return self._uniform()

    def _hillclimb(self) -> np.ndarray:
        return self._mutants(self._ranked()[0], 1)[0]

    def _de(self) -> np.ndarray:
        population = self._ranked()[: self.population]
        target, a, b, c = (population[i] for i in self.rng.choice(len(population), 4, replace=False))
        mutant = np.rint(a + self.de_weight * (b - c)).astype(np.int64)
        cross = self.rng.random(len(target)) < self.de_crossover
        cross[int(self.rng.integers(len(target)))] = True  # at least one gene from the mutant
        return np.where(cross, mutant, target)

    def _one_hot(self, genes: np.ndarray) -> np.ndarray:
        offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        features = np.zeros((len(genes), int(self.sizes.sum()) + 1))
        features[:, -1] = 1.0
        np.put_along_axis(features, genes + offsets, 1.0, axis=1)
        return features

    def _model(self) -> np.ndarray:
        """Candidates best predicted first; the ridge fit is redone only when new scores have come in."""
        if self._fit is None or self._fit[0] != len(self.scores):
            archs = list(self.scores)
            x = self._one_hot(np.array([self.genotypes[a] for a in archs]))
            y = np.array([self.scores[a] for a in archs])
            weights = np.linalg.solve(x.T @ x + self.ridge * np.eye(x.shape[1]), x.T @ (y - y.mean()))
            self._fit = (len(self.scores), weights)
        half = self.model_candidates // 2
        candidates = np.concatenate([self._uniform(self.model_candidates - half),
                                     self._mutants(self._ranked()[0], half)])
        return candidates[np.argsort(-(self._one_hot(candidates) @ self._fit[1]), kind="stable")]

    # -- learning ------------------------------------------------------------------------------------------
    def observe(self, archs: Sequence[Arch], scores: Sequence[float]) -> None:
        best = max(self.scores.values(), default=-math.inf)
        for arch, score in zip(archs, scores, strict=True):
            techniques = self.pending.get(arch)
            if techniques:
                technique = techniques.pop(0)
                if not techniques:
                    del self.pending[arch]
                self.bandit.record(technique, int(score > best))
            best = max(best, float(score))
        super().observe(archs, scores)

    def credits(self) -> dict[str, int]:
        """New bests credited to each technique in the bandit's window."""
        return self.bandit.credits()

    # -- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "techniques": list(self.techniques),
                "bandit": [list(item) for item in self.bandit.history],
                "genotypes": [(arch.to_dict(), list(genes)) for arch, genes in self.genotypes.items()],
                "pending": [(arch.to_dict(), list(names)) for arch, names in self.pending.items()],
                "uses": dict(self.uses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        try:
            if list(state["techniques"]) != list(self.techniques):
                raise CheckpointError(f"the autotuner state has techniques {state['techniques']}, this search "
                                      f"{list(self.techniques)}")
            bandit = AUCBandit(self.techniques, self.bandit.c, self.bandit.window)
            for key, credit in state["bandit"]:
                bandit.record(str(key), int(credit))
            arch_type = self.space.arch_type
            genotypes = {arch_type.from_dict(a): tuple(int(g) for g in genes) for a, genes in state["genotypes"]}
            pending = {arch_type.from_dict(a): [str(n) for n in names] for a, names in state["pending"]}
            uses = {str(k): int(v) for k, v in state["uses"].items()}
            if not all(a in genotypes for a in self.scores) or set(uses) != set(self.techniques):
                raise KeyError("an arch without genes or a technique without counts")
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointError(f"the autotuner search state is malformed: {error!r}") from error
        self.bandit, self.genotypes, self.pending, self.uses = bandit, genotypes, pending, uses


__all__ = ["TECHNIQUES", "AUCBandit", "ProgramAutotuner"]
