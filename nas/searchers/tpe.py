"""TPE (Bergstra et al. 2011), a sequential model-based optimiser, as Optuna implements it.

Optuna's Tree-structured Parzen Estimator searches the categorical genes of the space.

Optuna is an optional dependency (``pip install 'elastic-ops[search]'``). Draws outside the budget are told
to the study as infeasible (through TPE's constraints), so it learns to avoid them, and are never evaluated.

The saved state holds the study's trials as plain data (params, values, states, attributes), replayed into a
new study on load, and the states of the sampler's random generators as lists of numbers; nothing is pickled.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from ..errors import CheckpointError, CheckpointMismatchError, InfeasibleBudgetError, MissingDependencyError, require
from ..family import Arch
from .base import GeneCoding, Searcher


def _optuna():
    optuna = require("optuna", "search", "the 'tpe' search")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _constraint(trial) -> tuple[float]:
    return trial.user_attrs["violation"]


class TPESearch(Searcher):
    name = "tpe"

    def __init__(self, space, feasible, *, seed: int = 0, cost=None, startup_trials: int = 20, **options):
        super().__init__(space, feasible, seed=seed, cost=cost, **options)
        self.optuna = _optuna()
        self.coding = GeneCoding(space)
        self.seed, self.startup_trials = seed, int(startup_trials)
        self.study = self._new_study()
        try:
            self.random_states(self.study)
        except AttributeError as error:
            raise MissingDependencyError(f"the 'tpe' search saves the state of TPE's random generators, which Optuna "
                              f"{self.optuna.__version__} keeps elsewhere than nas.searchers.tpe expects: "
                              f"{error}") from error
        self.pending: dict[Arch, list[int]] = {}  # numbers of the trials asked and not yet told, by arch

    def _new_study(self):
        with warnings.catch_warnings():
            # Optuna 5 deprecates constraints_func for Trial.set_constraint, which Optuna 3 and 4 lack.
            warnings.simplefilter("ignore", FutureWarning)
            sampler = self.optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=self.startup_trials,
                                                      constraints_func=_constraint, multivariate=True)
        return self.optuna.create_study(direction="maximize", sampler=sampler)

    def propose(self, n: int) -> list[Arch]:
        found: list[Arch] = []
        for _ in range(self.max_draws * n):
            if len(found) == n:
                return found
            trial = self.study.ask()
            indices = [trial.suggest_categorical(name, list(range(len(choices))))
                       for name, choices in self.coding.genes]
            arch = self.coding.decode(indices)
            if self.feasible([arch])[0]:
                trial.set_user_attr("violation", (0.0,))
                self.pending.setdefault(arch, []).append(trial.number)
                found.append(arch)
            else:
                trial.set_user_attr("violation", (1.0,))
                self.study.tell(trial, 0.0)
        if len(found) < n:
            raise InfeasibleBudgetError(f"tpe: found {len(found)} of {n} archs inside the budget in "
                                        f"{self.max_draws * n} trials")
        return found

    def observe(self, archs: Sequence[Arch], scores: Sequence[float]) -> None:
        super().observe(archs, scores)
        for arch, score in zip(archs, scores):
            self.study.tell(self.pending[arch].pop(0), float(score))
            if not self.pending[arch]:
                del self.pending[arch]

    @staticmethod
    def random_states(study) -> list[np.random.RandomState]:
        """The numpy generators TPE draws from: its own and its startup sampler's. Optuna keeps them private (a
        ``LazyRandomState`` since Optuna 3.5, a ``RandomState`` before) and offers no way to save them but pickle."""
        owners = (study.sampler, study.sampler._random_sampler)
        return [getattr(owner._rng, "rng", owner._rng) for owner in owners]

    def state_dict(self):
        to_json = self.optuna.distributions.distribution_to_json
        trials = [{"state": t.state.name, "value": t.value, "params": t.params,
                   "distributions": {name: to_json(d) for name, d in t.distributions.items()},
                   "user_attrs": t.user_attrs, "system_attrs": t.system_attrs}
                  for t in self.study.get_trials(deepcopy=False)]
        # RandomState.get_state(): (kind, 624 uint32 keys, position, has_gauss, cached_gaussian)
        generators = [[kind, keys.tolist(), *rest] for kind, keys, *rest in
                      (rng.get_state() for rng in self.random_states(self.study))]
        pending = [(arch.to_dict(), numbers) for arch, numbers in self.pending.items()]
        return {**super().state_dict(), "trials": trials, "generators": generators, "pending": pending}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        if "trials" not in state:
            raise CheckpointMismatchError("this tpe search state was written by an older version, which pickled the "
                                          "Optuna study; "
                             "it is not loaded (unpickling a file can run any code): start the search again")
        from_json = self.optuna.distributions.json_to_distribution
        study = self._new_study()
        try:
            for saved in state["trials"]:
                study.add_trial(self.optuna.trial.create_trial(
                    state=self.optuna.trial.TrialState[saved["state"]], value=saved["value"], params=saved["params"],
                    distributions={name: from_json(d) for name, d in saved["distributions"].items()},
                    user_attrs=saved["user_attrs"], system_attrs=saved["system_attrs"]))
            for rng, (kind, keys, *rest) in zip(self.random_states(study), state["generators"], strict=True):
                rng.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
            pending = {self.space.arch_type.from_dict(arch): [int(n) for n in numbers]
                       for arch, numbers in state["pending"]}
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointError(f"the tpe search state is malformed: {error!r}") from error
        self.study, self.pending = study, pending
