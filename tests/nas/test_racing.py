"""Racing of a search step's candidates (nas.racing): the bounds, the slices, and that racing keeps what full
evaluation would keep, on synthetic accuracies with known values."""
from __future__ import annotations

import numpy as np
import pytest

from nas.evaluate import EvalResult
from nas.racing import RaceConfig, race, slice_bounds, top_k_contenders, wilson_interval
from nas.searchers import NSGA2
from nas.spaces import load_space
from nas.vit.arch import Arch


def test_wilson_interval_against_hand_computed_values():
    # 50 of 100 at 95% (z = 1.96): the textbook [0.4038, 0.5962]; 0 of 10: [0, 0.2775].
    assert wilson_interval(50.0, 100, 1.96) == pytest.approx((40.38, 59.62), abs=0.01)
    assert wilson_interval(0.0, 10, 1.96) == pytest.approx((0.0, 27.75), abs=0.01)
    assert RaceConfig(confidence=0.95).z == pytest.approx(1.95996, abs=1e-4)


def test_slices_double_what_came_before_and_cover_the_data():
    assert slice_bounds(1000, 0.125) == [(0, 125), (125, 250), (250, 500), (500, 1000)]
    assert slice_bounds(10, 0.125) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 10)]
    assert slice_bounds(64, 1.0) == [(0, 64)]


class Synthetic:
    """Candidates of known accuracy: each image is right for a candidate with its probability, drawn once, so that
    full evaluation and racing see the same data; counts how many image-forwards each costs."""

    def __init__(self, accuracies: np.ndarray, images: int, seed: int):
        self.correct = np.random.default_rng(seed).random((len(accuracies), images)) < accuracies[:, None]
        self.archs = [Arch(16 + i, (1,), (1.0,), (True,)) for i in range(len(accuracies))]
        self.bounds = slice_bounds(images, 0.125)
        self.forwards = 0

    def evaluate_slice(self, archs, index):
        start, stop = self.bounds[index]
        self.forwards += len(archs) * (stop - start)
        return [EvalResult(top1=100.0 * self.correct[a.embed_dim - 16, start:stop].mean(), top5=100.0, loss=1.0,
                           samples=stop - start) for a in archs]

    def full_top(self, k: int) -> set[Arch]:
        order = np.argsort(-self.correct.mean(axis=1), kind="stable")
        return {self.archs[i] for i in order[:k]}


@pytest.mark.parametrize("seed", range(3))
def test_racing_keeps_what_full_evaluation_keeps_and_saves_forwards(seed):
    # 50 candidates of one step spread over 22 points (wider than the 4 points of a trained CIFAR-10 supernet's
    # subnets under one budget, where racing stops nobody: benchmarks/RESULTS.md), 10,000 images as AutoFormer
    # searches on: the 10 best by full-data accuracy must all finish, with exactly their full-data accuracy.
    accuracies = np.random.default_rng(100 + seed).uniform(0.40, 0.62, size=50)
    synthetic = Synthetic(accuracies, 10000, seed)
    results = race(synthetic.archs, len(synthetic.bounds), synthetic.evaluate_slice,
                   lambda racing: top_k_contenders({}, racing, 10), RaceConfig())
    finished = {arch for arch, result in results.items() if result.samples == 10000}
    assert synthetic.full_top(10) <= finished
    for arch in finished:
        assert results[arch].top1 == pytest.approx(100.0 * synthetic.correct[arch.embed_dim - 16].mean())
    saved = 1 - synthetic.forwards / (50 * 10000)
    assert saved > 0.4, f"racing saved only {saved:.0%} of the image-forwards"


def test_racing_stops_nobody_who_might_be_kept():
    # Two candidates far apart and one in between at the threshold: with k = 2, only the far worse one stops.
    synthetic = Synthetic(np.array([0.9, 0.1, 0.5]), 800, seed=0)
    results = race(synthetic.archs, len(synthetic.bounds), synthetic.evaluate_slice,
                   lambda racing: top_k_contenders({}, racing, 2), RaceConfig())
    assert [results[a].samples for a in synthetic.archs] == [800, 100, 800]


def test_nsga2_keeps_racing_what_no_one_confidently_dominates():
    space = load_space("cifar-tiny")
    archs = [space.sample(np.random.default_rng(i)) for i in range(3)]
    costs = {archs[0]: 1.0, archs[1]: 2.0, archs[2]: 3.0}
    searcher = NSGA2(space, lambda a: np.ones(len(a), dtype=bool), cost=lambda a: np.array([costs[x] for x in a]))
    searcher.observe([archs[0]], [60.0])  # decided: cheapest, 60%
    racing = {archs[1]: (40.0, 55.0),     # dearer and confidently worse: dominated, out
              archs[2]: (58.0, 70.0)}     # dearer but may be better: on the front, goes on
    assert searcher.contenders(racing) == {archs[2]}
