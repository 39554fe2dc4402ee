"""The random generators of the search spaces: every function that draws takes a ``numpy.random.Generator`` or an int
seed."""
from __future__ import annotations

import numpy as np


def as_generator(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy.random.Generator or an int seed, got {type(rng).__name__}")
