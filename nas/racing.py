"""Racing (successive halving with confidence bounds) of a search step's candidates over the search data.

A search keeps only a few of the candidates it evaluates (evolution: the ``parents`` best; NSGA-II: the Pareto
front), so most candidates need not be evaluated on every image to be ranked out. The search data is cut into
slices of growing size (an eighth, an eighth, a quarter, a half: each stage doubles what a survivor has seen). All
candidates start on the first slice; after each slice, the binomial confidence interval of every candidate's top-1
accuracy (Wilson's score interval on its correct count) goes to the searchers, and a candidate no searcher could still
keep (its upper bound below what they keep, with the stated confidence) stops there, with the accuracy measured so
far and its ``samples``. The survivors continue to the next slice; after the last, their metrics are exactly those of
a full evaluation, since slice counts add up.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

from .evaluate import EvalResult
from .family import Arch

Interval = tuple[float, float]  # (low, high) top-1 accuracy in percent
Contenders = Callable[[Mapping[Arch, Interval]], set[Arch]]  # racing archs -> those that must go on


@dataclass(frozen=True)
class RaceConfig:
    """``confidence``: of each interval (two-sided); ``first_fraction``: the first slice's share of the data, each
    later slice as large as all before it."""

    confidence: float = 0.999
    first_fraction: float = 0.125

    @property
    def z(self) -> float:
        return NormalDist().inv_cdf(0.5 + self.confidence / 2)


def wilson_interval(top1: float, samples: int, z: float) -> Interval:
    """Wilson's score interval, in percent, of an accuracy of ``top1`` percent measured on ``samples`` images."""
    p = top1 / 100.0
    denominator = 1 + z * z / samples
    centre = (p + z * z / (2 * samples)) / denominator
    half = z * math.sqrt(p * (1 - p) / samples + z * z / (4 * samples * samples)) / denominator
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def slice_bounds(total: int, first_fraction: float) -> list[tuple[int, int]]:
    """``(start, stop)`` of each slice of ``total`` images: the first ``first_fraction`` of them, then slices doubling
    what came before, the last one ending at ``total``."""
    bounds, seen = [], max(1, min(total, round(total * first_fraction)))
    bounds.append((0, seen))
    while seen < total:
        stop = min(total, 2 * seen)
        bounds.append((seen, stop))
        seen = stop
    return bounds


def combine(first: EvalResult, second: EvalResult) -> EvalResult:
    """Metrics over the images of both results (disjoint slices)."""
    samples = first.samples + second.samples

    def mean(a: float, b: float) -> float:
        return (a * first.samples + b * second.samples) / samples

    return EvalResult(top1=mean(first.top1, second.top1), top5=mean(first.top5, second.top5),
                      loss=mean(first.loss, second.loss), samples=samples)


def race(archs: Sequence[Arch], slices: int, evaluate_slice: Callable[[list[Arch], int], list[EvalResult]],
         contenders: Contenders, config: RaceConfig) -> dict[Arch, EvalResult]:
    """Metrics of every arch: over all ``slices`` for those that stay contenders, over the first slices for those that
    drop out. ``evaluate_slice(archs, i)`` evaluates on slice ``i``."""
    results: dict[Arch, EvalResult] = {}
    running = list(dict.fromkeys(archs))
    for index in range(slices):
        for arch, result in zip(running, evaluate_slice(running, index), strict=True):
            results[arch] = combine(results[arch], result) if arch in results else result
        if index == slices - 1:
            break
        intervals = {arch: wilson_interval(results[arch].top1, results[arch].samples, config.z) for arch in running}
        keep = contenders(intervals)
        running = [arch for arch in running if arch in keep]
        if not running:
            break
    return results


def top_k_contenders(decided: Mapping[Arch, float], racing: Mapping[Arch, Interval], k: int) -> set[Arch]:
    """The racing archs that may still be among the ``k`` best: those whose upper bound reaches the k-th largest of
    the decided scores and the racing lower bounds."""
    floors = sorted([*decided.values(), *(low for low, _ in racing.values())], reverse=True)
    if len(floors) < k:
        return set(racing)
    threshold = floors[k - 1]
    return {arch for arch, (_, high) in racing.items() if high >= threshold}
