"""The program autotuner (``nas.searchers.autotuner``): OpenTuner's AUC bandit against a hand count, the ensemble on a
synthetic objective with a known optimum, credit moving to the technique that wins, and its plain-data state."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_search import distance_objective, plain_types, synthetic_search, synthetic_setup

from nas.budget import Costs
from nas.costs import macs_many
from nas.errors import CheckpointError, ConfigError
from nas.searchers import AUCBandit, ProgramAutotuner, build_searcher
from nas.spaces import load_space


def slow_auc(history, key):
    """OpenTuner's ``exploitation_term_slow``: the AUC of ``key``'s credit curve, counted by hand."""
    score = position = 0
    for k, credit in history:
        if k == key:
            position += 1
            score += position if credit else 0
    return score * 2.0 / (position * (position + 1.0)) if position else 0.0


def test_auc_bandit_matches_the_hand_count_over_a_sliding_window():
    bandit = AUCBandit(["a", "b", "c"], c=0.05, window=7)
    rng = np.random.default_rng(0)
    history = []
    for _ in range(40):
        key, credit = ["a", "b", "c"][int(rng.integers(3))], int(rng.random() < 0.4)
        bandit.record(key, credit)
        history = (history + [(key, credit)])[-7:]
        for k in "abc":
            assert bandit.exploitation(k) == pytest.approx(slow_auc(history, k))
            assert bandit.uses[k] == sum(1 for h, _ in history if h == k)
    # Unused keys come first; then the one with the most (and latest) credit.
    fresh = AUCBandit(["a", "b", "c"])
    fresh.record("a", 1)
    fresh.record("b", 0)
    assert fresh.ordered(rng)[0] == "c"
    fresh.record("c", 0)
    assert fresh.ordered(rng)[0] == "a"
    # Picks made inside a batch count as uses: with no results yet, a batch of three tries every technique once.
    assert sorted(AUCBandit(["a", "b", "c"]).ordered(rng, {"a": 1, "b": 1})[:1]) == ["c"]


def test_autotuner_finds_the_known_optimum_under_the_budget():
    space, budget, target = synthetic_setup("digits-tiny")
    costs = Costs(space)
    score = distance_objective(target)
    for seed in range(3):
        searcher = build_searcher("autotuner", space, costs.feasible([budget]), seed=seed)
        for _ in range(10):
            archs = searcher.propose(20)
            assert (macs_many(archs, space) <= budget.high).all()
            assert len(set(archs)) == len(archs)
            searcher.observe(archs, [score(a) for a in archs])
        assert searcher.best() == (target, 100.0)
        assert set(searcher.uses) == {"random", "hillclimb", "de", "model"} and min(searcher.uses.values()) > 0


class RiggedAutotuner(ProgramAutotuner):
    """``hillclimb`` replaced by an oracle that fixes one wrong gene of the best arch towards a target: nearly each
    of its proposals is a new best, while random draws almost never are."""

    target: np.ndarray

    def _hillclimb(self):
        genes = self._ranked()[0].copy()
        wrong = np.flatnonzero(genes != self.target)
        if len(wrong) == 0:
            return genes  # not new: the technique has nothing to offer
        fix = wrong[int(self.rng.integers(len(wrong)))]
        genes[fix] = self.target[fix]
        return genes


def test_bandit_shifts_credit_and_proposals_to_the_technique_that_wins():
    space = load_space("autoformer-t")
    tuner = RiggedAutotuner(space, lambda archs: np.ones(len(archs), bool), seed=1, techniques=("random", "hillclimb"))
    tuner.target = np.array([len(c) - 1 for _, c in tuner.coding.genes])  # the largest arch
    genes_right = lambda arch: int((np.array(tuner.genotypes[arch]) == tuner.target).sum())  # noqa: E731
    first = None
    for step in range(12):
        archs = tuner.propose(6)
        tuner.observe(archs, [float(genes_right(a)) for a in archs])
        if step == 1:
            first = dict(tuner.uses)
    credits = tuner.credits()
    assert credits["hillclimb"] > 3 * max(credits["random"], 1), credits
    late = {k: tuner.uses[k] - first[k] for k in tuner.uses}
    assert late["hillclimb"] >= 0.8 * sum(late.values()), late


def test_autotuner_state_is_plain_data_and_resumes(tmp_path):
    first, _ = synthetic_search(tmp_path, "autotuner", generations=2)
    first.run(tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert plain_types(state) <= {dict, list, tuple, str, int, float, bool, type(None)}
    assert sum(state["searchers"][0]["uses"].values()) == 32
    resumed, _ = synthetic_search(tmp_path, "autotuner", generations=3)
    resumed.load_state(tmp_path / "state.pt")
    assert resumed.searchers[0].bandit.history == first.searchers[0].bandit.history
    garbled = {**state["searchers"][0], "genotypes": []}
    torch.save({**state, "searchers": [garbled, *state["searchers"][1:]]}, tmp_path / "garbled.pt")
    with pytest.raises(CheckpointError, match="the autotuner search state is malformed"):
        resumed.load_state(tmp_path / "garbled.pt")


def test_autotuner_bad_options():
    space = load_space("digits-tiny")
    with pytest.raises(ConfigError, match="techniques must be some of"):
        ProgramAutotuner(space, lambda a: np.ones(len(a), bool), techniques=("annealing",))
