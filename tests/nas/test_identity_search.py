"""The identity probability searched per budget (ViTAS): candidates scored by the held-out accuracy of archs drawn
with them inside the budget, on a synthetic objective whose best probability is known; the bisection stays the
default and nothing is measured without candidates."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nas import costs
from nas.samplers import build_sampler
from nas.trainer import TrainConfig
from nas.vit.space import SearchSpace

# Ten layers, any of them an identity, any depth: the depth of a draw with identity probability p is Binomial(10, 1-p).
SPACE = SearchSpace(name="identity-search", embed_dims=[32], depths=list(range(1, 11)), num_heads=[1, 2],
                    mlp_ratios=[1.0, 2.0], head_dim=16, patch_sizes=[8], img_size=32, num_classes=10,
                    identity_layers=True)
CANDIDATES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def expected_score(p: float) -> float:
    return -sum(math.comb(10, d) * (1 - p) ** d * p ** (10 - d) * (max(d, 1) - 7) ** 2 for d in range(11))


def test_the_search_finds_the_probability_that_maximises_the_expected_score():
    """score = -(depth - 7)^2: its expectation under identity probability p (depth Binomial(10, 1-p), a draw of depth
    0 refilled to 1) is best at p = 0.3 (-2.1; 0.2 and 0.4 give -2.6 and -3.4)."""
    low, high = costs.macs_range(SPACE)
    sampler = build_sampler("identity", SPACE, seed=3, total_steps=8, macs_range=(low, high),
                            search_probabilities=CANDIDATES, search_step=2, search_archs=2000)
    calibrated = sampler.scale
    assert sampler.measures
    seen = []

    def measure(arch):
        seen.append(arch)
        return -float((arch.depth - 7) ** 2)

    assert sampler.update([], [], measure) == {}  # before search_step nothing is measured
    sampler.sample(), sampler.sample()
    record = sampler.update([], [], measure)["identity_probability_search"]
    assert record["chosen"] == 0.3 and sampler.scale == 0.3 and record["calibrated"] == calibrated
    scores = {row["probability"]: row["score"] for row in record["candidates"]}
    for p, score in scores.items():
        assert score == pytest.approx(expected_score(p), abs=0.6)
    assert len(seen) == len(set(seen)), "an arch was measured twice"
    assert sampler.update([], [], measure) == {}, "the search runs once"
    state = sampler.state_dict()
    fresh = build_sampler("identity", SPACE, seed=3, total_steps=8, macs_range=(low, high),
                          search_probabilities=CANDIDATES, search_step=2, search_archs=2000)
    fresh.load_state_dict(state)
    assert fresh.scale == 0.3 and fresh.probability_search == record


def test_only_archs_inside_the_budget_are_scored():
    low, high = costs.macs_range(SPACE)
    window = (low + 0.4 * (high - low), low + 0.6 * (high - low))
    sampler = build_sampler("identity", SPACE, seed=4, total_steps=4, macs_range=window,
                            search_probabilities=[0.2, 0.5, 0.8], search_step=1, search_archs=50)
    sampler.sample()

    def measure(arch):
        assert window[0] <= costs.macs(arch, SPACE) <= window[1]
        return 1.0

    record = sampler.update([], [], measure)["identity_probability_search"]
    assert record["macs_range"] == list(window)
    assert all(row["archs"] <= 50 for row in record["candidates"]) and record["chosen"] in (0.2, 0.5, 0.8)


def test_a_candidate_that_rarely_draws_inside_the_budget_is_not_chosen():
    """Deep archs fall in this window; p = 0.9 leaves one or two layers on, so it seldom draws inside the window.
    Its few archs score best, but it samples the budget worse than 0.1 and 0.3, which draw every arch asked for."""
    low, high = costs.macs_range(SPACE)
    window = (low + 0.5 * (high - low), high)
    sampler = build_sampler("identity", SPACE, seed=7, total_steps=4, macs_range=window,
                            search_probabilities=[0.1, 0.3, 0.9], search_step=1, search_archs=20)
    sampler.sample()
    record = sampler.update([], [], lambda arch: 1.0 / arch.depth)["identity_probability_search"]
    archs = {row["probability"]: row["archs"] for row in record["candidates"]}
    assert archs[0.1] == 20 and archs[0.9] < 20
    assert record["chosen"] == 0.3  # the shallower of the two full ones scores higher


def test_the_bisection_stays_the_default_and_bad_options_are_refused():
    sampler = build_sampler("identity", SPACE, seed=5)
    assert not sampler.measures and sampler.update([], [], None) == {}
    assert not type(sampler).measures_with({}) and type(sampler).measures_with({"search_probabilities": [0.5]})
    with pytest.raises(ValueError, match="search_probabilities"):
        build_sampler("identity", SPACE, search_probabilities=[1.5])
    with pytest.raises(ValueError, match="search_step"):
        build_sampler("identity", SPACE, search_probabilities=[0.5], search_step=0)
    # No layer an identity: ten layers cost at least 887k MACs, above this window (which the bisection reaches).
    sampler = build_sampler("identity", SPACE, seed=6, total_steps=4, macs_range=(4e5, 6e5),
                            search_probabilities=[0.0], search_step=1, search_archs=4)
    sampler.sample()
    with pytest.raises(ValueError, match="no candidate probability"):
        sampler.update([], [], lambda arch: 1.0)
    assert np.isfinite(sampler.scale)


def test_the_trainer_loads_held_out_images_for_a_searching_identity_sampler(tmp_path):
    config = TrainConfig(out_dir=str(tmp_path), sampler="identity",
                         sampler_options={"search_probabilities": [0.2, 0.4]}, search_holdout=0)
    from nas.errors import ConfigError
    from nas.trainer import Trainer

    with pytest.raises(ConfigError, match="search_holdout"):
        Trainer(config)
