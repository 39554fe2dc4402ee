"""An autotuner-driven search: Optuna's TPE sampler over the categorical genes of the space.

Optuna is an optional dependency (``pip install elastic-ops[search]``). Draws outside the budget are told
to the study as infeasible (through TPE's constraints), so it learns to avoid them, and are never evaluated.
"""
from __future__ import annotations

import pickle
import warnings
from collections.abc import Sequence

from ..arch import Arch
from .base import GeneCoding, InfeasibleBudgetError, Searcher


def _optuna():
    try:
        import optuna
    except ImportError as error:
        raise ImportError("the 'tpe' search needs Optuna: pip install 'elastic-ops[search]' (or pip install optuna)") from error
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _constraint(trial) -> tuple[float]:
    return trial.user_attrs["violation"]


class TPESearch(Searcher):
    name = "tpe"

    def __init__(self, space, feasible, *, seed: int = 0, cost=None, startup_trials: int = 20, **options):
        super().__init__(space, feasible, seed=seed, cost=cost, **options)
        optuna = _optuna()
        self.coding = GeneCoding(space)
        with warnings.catch_warnings():
            # Optuna 5 deprecates constraints_func for Trial.set_constraint, which Optuna 3 and 4 lack.
            warnings.simplefilter("ignore", FutureWarning)
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(startup_trials),
                                                 constraints_func=_constraint, multivariate=True)
        self.study = optuna.create_study(direction="maximize", sampler=sampler)
        self.pending: dict[Arch, list] = {}

    def propose(self, n: int) -> list[Arch]:
        found: list[Arch] = []
        for _ in range(self.max_draws * n):
            if len(found) == n:
                return found
            trial = self.study.ask()
            indices = [trial.suggest_categorical(name, list(range(len(choices)))) for name, choices in self.coding.genes]
            arch = self.coding.decode(indices)
            if self.feasible([arch])[0]:
                trial.set_user_attr("violation", (0.0,))
                self.pending.setdefault(arch, []).append(trial)
                found.append(arch)
            else:
                trial.set_user_attr("violation", (1.0,))
                self.study.tell(trial, 0.0)
        if len(found) < n:
            raise InfeasibleBudgetError(f"tpe: found {len(found)} of {n} archs inside the budget in {self.max_draws * n} trials")
        return found

    def observe(self, archs: Sequence[Arch], scores: Sequence[float]) -> None:
        super().observe(archs, scores)
        for arch, score in zip(archs, scores):
            self.study.tell(self.pending[arch].pop(0), float(score))
            if not self.pending[arch]:
                del self.pending[arch]

    def state_dict(self):
        return {**super().state_dict(), "study": pickle.dumps((self.study, self.pending))}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.study, self.pending = pickle.loads(state["study"])
