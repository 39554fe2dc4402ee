"""ElasticViT's performance-aware sampling (Tang et al. 2023): within the FLOPs bank of the step, retrain archs
that measured well.

ElasticViT's code (microsoft/Moonlit, ``ElasticViT/models/model.py``: ``bank_arch_update``, ``_arch_bank_sampling``;
``process.py``) keeps, per FLOPs bank, a memory of the best archs seen in it: after each explored arch's step it
scores the arch by the negative cross-entropy of a forward pass on the step's mini-batch, adds it while the memory
has room and otherwise replaces the worst-scored member if the new arch scores better; four times an epoch it
scores the whole memory of the current bank again on one mini-batch, so that members are compared on the same
images. A step exploits (draws from the memory, with probability softmax(score)) at a rate that starts at 0.2 and
grows by 0.15 every 100 epochs, and only once the memory is half full.

Here the score is top-1 accuracy on the held-out search images (``measure``, the same images for every arch), and
the draw is softmax over accuracy with a ``temperature`` in accuracy units, so that a few points of accuracy make a
difference (over cross-entropies near 2, ElasticViT's temperature-1 softmax draws nearly uniformly).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import costs
from ..family import Arch, Space
from .base import Measure
from .complexity import ComplexityAwareSampler


def keep_if_better(entries: list[list], record: dict, score: float, capacity: int) -> None:
    """A bank's memory: ``[record, score]`` is appended while there is room, else it replaces the lowest-scored entry
    if it scores higher."""
    if len(entries) < capacity:
        entries.append([record, score])
        return
    worst = min(range(len(entries)), key=lambda i: entries[i][1])
    if entries[worst][1] < score:
        entries[worst] = [record, score]


class PerformanceAwareSampler(ComplexityAwareSampler):
    """ElasticViT's performance-aware sampling on top of the bank walk of :class:`ComplexityAwareSampler`.

    Every bank keeps a memory of up to ``memory_size`` archs with their measured accuracy. An explored arch is
    measured after its step and enters the memory of its bank while there is room, or in place of the least
    accurate member if it is more accurate. Every ``refresh_every`` steps the memory of the step's bank is measured
    again (the supernet changes under it). With probability ``exploit_max * step / total_steps``, once the target
    bank's memory is at least half full, a draw exploits: it retrains a member drawn with probability
    ``softmax(accuracy / temperature)``; otherwise it explores a fresh arch in the bank's window. A step draws
    ``archs_per_step`` archs of its bank, each exploiting or exploring on its own (ElasticViT's ``uniform`` modes).
    """

    name = "performance"
    measures = True

    def __init__(self, space: Space, *, seed: int = 0, total_steps: int = 1, num_banks: int = 8,
                 memory_size: int = 16, exploit_max: float = 0.8, temperature: float = 0.01,
                 refresh_every: int = 100, archs_per_step: int = 1):
        super().__init__(space, seed=seed, total_steps=total_steps, num_banks=num_banks,
                         archs_per_step=archs_per_step)
        if memory_size < 1 or not 0.0 <= exploit_max <= 1.0 or temperature <= 0 or refresh_every < 1:
            raise ValueError(f"{self.name}: need memory_size >= 1, 0 <= exploit_max <= 1, temperature > 0, "
                             f"refresh_every >= 1; got {memory_size}, {exploit_max}, {temperature}, {refresh_every}")
        self.memory_size, self.exploit_max = int(memory_size), float(exploit_max)
        self.temperature, self.refresh_every = float(temperature), int(refresh_every)
        self.memory: list[list[list]] = [[] for _ in range(num_banks)]  # bank -> [arch as dict, accuracy]
        self.exploited: list[bool] = []  # per arch of the last step: drawn from the memory

    def exploit_probability(self) -> float:
        return self.exploit_max * min(1.0, self.step / self.total_steps)

    def draw(self) -> list[Arch]:
        bank = self.next_bank()
        archs, self.exploited = [], []
        for _ in range(self.archs_per_step):
            entries = self.memory[bank]
            ready = len(entries) >= max(1, self.memory_size // 2)
            self.exploited.append(bool(ready and self.rng.random() < self.exploit_probability()))
            if not self.exploited[-1]:
                archs.append(self.explore(bank))
                continue
            accuracy = np.array([score for _, score in entries])
            weights = np.exp((accuracy - accuracy.max()) / self.temperature)
            chosen = entries[self.rng.choice(len(entries), p=weights / weights.sum())][0]
            archs.append(self.space.arch_type.from_dict(chosen))
        return archs

    def update(self, archs: Sequence[Arch], losses: Sequence[float], measure: Measure | None = None
               ) -> dict[str, float]:
        measure = self.require_measure(measure)
        stats = {"exploited": float(np.mean(self.exploited)) if self.exploited else 0.0}
        if self.step % self.refresh_every == 0:
            for entry in self.memory[self.bank]:
                entry[1] = float(measure(self.space.arch_type.from_dict(entry[0])))
        for i, arch in enumerate(archs):
            if not (i < len(self.exploited) and self.exploited[i]):
                stats["measured"] = self.remember(arch, float(measure(arch)))
        return stats

    def remember(self, arch: Arch, accuracy: float) -> float:
        """Keep ``arch`` in its bank's memory if there is room or it beats the least accurate member."""
        entries = self.memory[self.banks.bank_of(costs.macs(arch, self.space))]
        record = arch.to_dict()
        known = next((entry for entry in entries if entry[0] == record), None)
        if known is not None:
            known[1] = accuracy
        else:
            keep_if_better(entries, record, accuracy, self.memory_size)
        return accuracy

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scores": "accuracy", "exploited": self.exploited,
                "memory": [[[dict(arch), score] for arch, score in bank] for bank in self.memory]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        exploited = state["exploited"]  # one flag per step before a step drew several archs
        self.exploited = [bool(flag) for flag in exploited] if isinstance(exploited, list) else [bool(exploited)]
        # A state from before the memory held accuracies ranked by training loss: its memory is dropped (the banks
        # fill again as the walk explores), everything else continues.
        kept = state.get("scores") == "accuracy"
        self.memory = [[[dict(arch), float(score)] for arch, score in bank] if kept else [] for bank in state["memory"]]
