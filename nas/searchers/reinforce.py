"""A REINFORCE controller (Williams 1992) with a moving-average baseline, as in Zoph & Le's NAS (2017), and UniNet's
search (Liu et al. 2022) with MnasNet's reward (Tan et al. 2019).

The policy is one independent categorical distribution per gene of :class:`~.base.GeneCoding` (a factorised
controller): on a hybrid space each stage's operator, DSM, depth, channels and expansion (and kernel size, V-scale)
and the resolution, drawn jointly for every arch. After each step the logits move along
``advantage * grad log p(arch)``, with the advantage ``(reward - baseline)`` divided by the batch's reward spread, so
the learning rate does not depend on the scale of the reward.

Budget: without a ``target``, draws outside the budget are rejected and the reward is the score. With a ``target``
cost ``T`` (UniNet, MnasNet), the budget is a soft constraint: draws outside it are evaluated too (up to three
quarters of a step's) and every draw is rewarded with ``score * (cost / T) ** w``, ``w = alpha`` where ``cost <= T``
and ``beta`` above it, so the controller learns where the budget lies rather than only being kept inside it;
:meth:`best` is the best arch inside the budget. The defaults,
``alpha = 0, beta = -1``, are MnasNet's for a target the result must meet (the best arch under a budget, which is what
``nas.search`` reports): nothing is gained by being smaller, and an arch twice over the target keeps half its score;
``alpha = beta = -0.07`` is MnasNet's trade-off along the Pareto front.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError, InfeasibleBudgetError
from ..family import Arch
from .base import GeneCoding, Searcher


class Reinforce(Searcher):
    name = "rl"

    def __init__(self, space, feasible, *, seed: int = 0, cost=None, lr: float = 0.5, baseline_decay: float = 0.8,
                 target: float | None = None, alpha: float = 0.0, beta: float = -1.0, **options):
        super().__init__(space, feasible, seed=seed, cost=cost, **options)
        if lr <= 0 or not 0.0 <= baseline_decay < 1.0:
            raise ConfigError(f"rl: need lr > 0 and baseline_decay in [0, 1), got lr={lr}, "
                              f"baseline_decay={baseline_decay}")
        if target is not None and (cost is None or not target > 0):
            raise ConfigError(f"rl: a soft-constraint target needs the cost it bounds and a target > 0, got "
                              f"target={target}")
        self.target, self.alpha, self.beta = None if target is None else float(target), float(alpha), float(beta)
        self.coding = GeneCoding(space)
        self.lr, self.baseline_decay = float(lr), float(baseline_decay)
        self.logits = [np.zeros(size) for size in self.coding.sizes]
        self.baseline: float | None = None
        self.choices: dict[Arch, np.ndarray] = {}

    def probabilities(self) -> list[np.ndarray]:
        return [np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum() for logits in self.logits]

    def propose(self, n: int) -> list[Arch]:
        """``n`` draws of the policy: all inside the budget, or with a soft constraint at least a quarter of them (one
        at least), so that every step has candidates a search can report."""
        probs = self.probabilities()
        found: list[Arch] = []
        outside_allowed = n - max(1, n // 4) if self.target is not None else 0
        for _ in range(self.max_draws):
            draws = np.stack([self.rng.choice(len(p), size=4 * n, p=p) for p in probs], axis=1)
            archs = [self.coding.decode(row) for row in draws]
            for arch, row, inside in zip(archs, draws, self.feasible(archs)):
                if len(found) < n and (inside or outside_allowed > 0):
                    outside_allowed -= not inside
                    found.append(arch)
                    self.choices.setdefault(arch, row)
            if len(found) == n:
                return found
        raise InfeasibleBudgetError(f"rl: the controller drew too few archs inside the budget in {self.max_draws} "
                                    "tries")

    def rewards(self, archs: Sequence[Arch], scores: Sequence[float]) -> np.ndarray:
        """The score, or with a ``target`` MnasNet's ``score * (cost / target) ** w``."""
        scores = np.asarray(scores, dtype=np.float64)
        if self.target is None:
            return scores
        ratio = np.asarray(self.cost(list(archs)), dtype=np.float64) / self.target
        return scores * ratio ** np.where(ratio <= 1.0, self.alpha, self.beta)

    def best(self) -> tuple[Arch, float] | None:
        """The best-scoring arch seen inside the budget."""
        archs = list(self.scores)
        inside = [arch for arch, ok in zip(archs, self.feasible(archs) if archs else []) if ok]
        return max(((arch, self.scores[arch]) for arch in inside), key=lambda item: item[1], default=None)

    def observe(self, archs: Sequence[Arch], scores: Sequence[float]) -> None:
        super().observe(archs, scores)
        rewards = self.rewards(archs, scores)
        if self.baseline is None:
            self.baseline = float(rewards.mean())
        advantage = (rewards - self.baseline) / (rewards.std() + 1e-8)
        probs = self.probabilities()
        for gene, p in enumerate(probs):
            onehot = np.zeros((len(archs), len(p)))
            onehot[np.arange(len(archs)), [self.choices[a][gene] for a in archs]] = 1.0
            self.logits[gene] += self.lr * (advantage[:, None] * (onehot - p)).mean(axis=0)
        self.baseline = self.baseline_decay * self.baseline + (1 - self.baseline_decay) * float(rewards.mean())

    def state_dict(self):
        return {**super().state_dict(), "logits": [gene.tolist() for gene in self.logits], "baseline": self.baseline,
                "choices": [(a.to_dict(), c.tolist()) for a, c in self.choices.items()]}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.logits = [np.asarray(gene, dtype=np.float64) for gene in state["logits"]]
        self.baseline = state["baseline"]
        self.choices = {self.space.arch_type.from_dict(a): np.asarray(c) for a, c in state["choices"]}
