"""Random search under a budget: uniform draws of the space that meet it."""
from __future__ import annotations

from collections.abc import Mapping

from ..family import Arch
from ..racing import Interval, top_k_contenders
from .base import Searcher


class RandomSearch(Searcher):
    name = "random"

    def contenders(self, racing: Mapping[Arch, Interval]) -> set[Arch]:
        """Random search keeps its best."""
        return top_k_contenders(self.scores, racing, 1)

    def propose(self, n: int) -> list[Arch]:
        return self.random_feasible(n)
