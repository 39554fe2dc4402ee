"""Parameters and MACs of the archs of any family (``nas.family``: each family counts its own, e.g. ``nas.vit.cost``,
``nas.hybrid.cost``), the range of a cost over a space, and uniform draws of a space inside a MACs window, which the
samplers, the budgets and the searches build on."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from .family import Arch, Cost, Space, family_of


def params_many(archs: Sequence[Arch] | object, space: Space) -> np.ndarray:
    """[K] int64 parameter counts of archs of ``space`` (a list or the family's arch batch)."""
    return family_of(space).params_many(archs, space)


def macs_many(archs: Sequence[Arch] | object, space: Space) -> np.ndarray:
    """[K] int64 multiply-accumulates of one image's forward pass of archs of ``space``."""
    return family_of(space).macs_many(archs, space)


def params(arch: Arch, space: Space) -> int:
    return int(params_many([arch], space)[0])


def macs(arch: Arch, space: Space) -> int:
    return int(macs_many([arch], space)[0])


def cost_range(space: Space, cost: Cost) -> tuple[float, float]:
    """The smallest and the largest ``cost`` (a vectorised cost such as :func:`params_many`) of an arch of
    ``space``."""
    return family_of(space).cost_range(space, cost)


@functools.cache
def macs_range(space: Space) -> tuple[int, int]:
    """The smallest and the largest MACs of an arch of ``space``."""
    low, high = cost_range(space, lambda archs: macs_many(archs, space))
    return int(low), int(high)


def sample_in_flops_window(space: Space, rng: np.random.Generator | int, low: float, high: float,
                           max_tries: int = 64, batch_size: int = 256) -> Arch:
    """A uniform draw of ``space`` conditioned on ``low <= macs(arch) <= high``, by rejection over vectorised batches
    (the space's ``sample_where``).

    Raises ValueError when the window misses the space's MACs range, RuntimeError when no draw of ``max_tries``
    batches lands in it (a window too narrow to hit by chance)."""
    if not low <= high:
        raise ValueError(f"MACs window low={low} > high={high}")
    space_low, space_high = macs_range(space)
    if high < space_low or low > space_high:
        raise ValueError(f"MACs window [{low:.4g}, {high:.4g}] is outside space {space.name!r}'s range "
                         f"[{space_low:.4g}, {space_high:.4g}] (min_arch, max_arch)")

    def inside(batch) -> np.ndarray:
        cost = macs_many(batch, space)
        return (cost >= low) & (cost <= high)

    return space.sample_where(rng, inside, f"MACs window [{low:.4g}, {high:.4g}]", max_tries, batch_size)


__all__ = ["cost_range", "macs", "macs_many", "macs_range", "params", "params_many", "sample_in_flops_window"]
