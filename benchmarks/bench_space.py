"""Speed of the search-space primitives (target: thousands of FLOPs-window draws per second).

Run: python -m pytest benchmarks/bench_space.py --benchmark-only
Each FLOPs window holds the middle ~10% of the space's MACs distribution (the 45th to 55th percentile).
"""
import numpy as np
import pytest

from nas.costs import macs_many, sample_in_flops_window
from nas.spaces import load_space

SPACES = ["autoformer-t", "autoformer-b", "vitas-t", "digits-tiny"]


def middle_window(space):
    cost = macs_many(space.sample_many(0, 4000), space)
    return tuple(np.quantile(cost, [0.45, 0.55]))


@pytest.mark.parametrize("name", SPACES)
def test_sample_in_flops_window(benchmark, name):
    space = load_space(name)
    low, high = middle_window(space)
    rng = np.random.default_rng(0)
    arch = benchmark(sample_in_flops_window, space, rng, low, high)
    assert space.contains(arch)
    if benchmark.stats is not None:  # None with --benchmark-disable
        benchmark.extra_info["draws_per_second"] = 1 / benchmark.stats.stats.median


@pytest.mark.parametrize("name", SPACES)
def test_sample(benchmark, name):
    space = load_space(name)
    rng = np.random.default_rng(0)
    benchmark(space.sample, rng)


@pytest.mark.parametrize("name", ["autoformer-b", "vitas-t"])
def test_macs_many_10k(benchmark, name):
    space = load_space(name)
    batch = space.sample_many(0, 10_000)
    benchmark(macs_many, batch, space)
