"""A REINFORCE controller (Williams 1992) with a moving-average baseline, as in Zoph & Le's NAS (2017).

The policy is one independent categorical distribution per gene of :class:`~.base.GeneCoding` (a
factorised controller). Draws outside the budget are rejected. After each step the logits move along
``advantage * grad log p(arch)``, with the advantage ``(score - baseline)`` divided by the batch's
score spread, so the learning rate does not depend on the scale of the score.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..arch import Arch
from ..errors import ConfigError, InfeasibleBudgetError
from .base import GeneCoding, Searcher


class Reinforce(Searcher):
    name = "rl"

    def __init__(self, space, feasible, *, seed: int = 0, cost=None, lr: float = 0.5, baseline_decay: float = 0.8,
                 **options):
        super().__init__(space, feasible, seed=seed, cost=cost, **options)
        if lr <= 0 or not 0.0 <= baseline_decay < 1.0:
            raise ConfigError(f"rl: need lr > 0 and baseline_decay in [0, 1), got lr={lr}, "
                              f"baseline_decay={baseline_decay}")
        self.coding = GeneCoding(space)
        self.lr, self.baseline_decay = float(lr), float(baseline_decay)
        self.logits = [np.zeros(size) for size in self.coding.sizes]
        self.baseline: float | None = None
        self.choices: dict[Arch, np.ndarray] = {}

    def probabilities(self) -> list[np.ndarray]:
        return [np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum() for logits in self.logits]

    def propose(self, n: int) -> list[Arch]:
        probs = self.probabilities()
        found: list[Arch] = []
        for _ in range(self.max_draws):
            draws = np.stack([self.rng.choice(len(p), size=4 * n, p=p) for p in probs], axis=1)
            archs = [self.coding.decode(row) for row in draws]
            for arch, row, ok in zip(archs, draws, self.feasible(archs)):
                if ok and len(found) < n:
                    found.append(arch)
                    self.choices.setdefault(arch, row)
            if len(found) == n:
                return found
        raise InfeasibleBudgetError(f"rl: the controller drew no arch inside the budget in {self.max_draws} tries")

    def observe(self, archs: Sequence[Arch], scores: Sequence[float]) -> None:
        super().observe(archs, scores)
        rewards = np.asarray(scores, dtype=np.float64)
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
