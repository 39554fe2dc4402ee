"""A paired significance test for the statistical tests (a searcher against random search, a sampler's walk)."""
from __future__ import annotations

import itertools

import numpy as np


def sign_flip_p_value(gains) -> float:
    """One-sided exact p-value of a paired sign-flip (permutation) test: the fraction of the 2^n sign patterns of the
    gains whose sum reaches the observed sum. Where the two sides of each pair are exchangeable (a searcher no better
    than the one it is paired with), the p-value is at most alpha with probability at most alpha; ties count against
    the claim."""
    gains = np.asarray(gains, dtype=float)
    signs = np.array(list(itertools.product((1, -1), repeat=len(gains))))
    return float(np.mean(signs @ np.abs(gains) >= gains.sum() - 1e-9))
