"""Search algorithms, all with one ask/tell interface (:class:`~.base.Searcher`): ``propose(n)`` and
``observe(archs, scores)``, chosen by name from :data:`SEARCHERS`."""
from __future__ import annotations

from ..errors import ConfigError, InfeasibleBudgetError
from .autotuner import TECHNIQUES, AUCBandit, ProgramAutotuner
from .base import Cost, Feasible, GeneCoding, Searcher
from .evolution import Evolution
from .learned import LearnedSamplerSearch
from .nsga2 import NSGA2, crowding_distance, non_dominated_fronts
from .predictor import PredictorSearch
from .random_search import RandomSearch
from .reinforce import Reinforce
from .tpe import TPESearch

SEARCHERS: dict[str, type[Searcher]] = {
    cls.name: cls for cls in (Evolution, NSGA2, RandomSearch, LearnedSamplerSearch, Reinforce, TPESearch,
                              ProgramAutotuner, PredictorSearch)
}


def build_searcher(name: str, space, feasible: Feasible, *, seed: int = 0, cost: Cost | None = None,
                   **options) -> Searcher:
    """The searcher registered as ``name``; ``options`` are its keyword arguments."""
    if name not in SEARCHERS:
        raise ConfigError(f"unknown search algorithm {name!r}; choose one of {', '.join(SEARCHERS)}")
    try:
        return SEARCHERS[name](space, feasible, seed=seed, cost=cost, **options)
    except TypeError as error:
        raise ConfigError(f"search algorithm {name!r}: bad options {sorted(options)}: {error}") from error


__all__ = ["SEARCHERS", "TECHNIQUES", "AUCBandit", "NSGA2", "ProgramAutotuner", "Cost",
           "Evolution", "Feasible", "GeneCoding", "InfeasibleBudgetError",
           "LearnedSamplerSearch", "PredictorSearch", "RandomSearch", "Reinforce", "Searcher", "TPESearch",
           "build_searcher", "crowding_distance", "non_dominated_fronts"]
