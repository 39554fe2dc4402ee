"""Random search under a budget: uniform draws of the space that meet it."""
from __future__ import annotations

from ..arch import Arch
from .base import Searcher


class RandomSearch(Searcher):
    name = "random"

    def propose(self, n: int) -> list[Arch]:
        return self.random_feasible(n)
