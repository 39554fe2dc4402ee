"""The supernet of a search space, whichever its family (``nas.family``)."""
from __future__ import annotations

from torch import nn

from .family import Space, family_of
from .memory import check_memory


def build_supernet(space: Space, drop_path_rate: float = 0.0, *, batch_size: int = 1, training: bool = False,
                   max_memory_gb: float | None = None) -> nn.Module:
    """A freshly initialised supernet holding every subnet of ``space``, once ``nas.memory.check_memory`` has found
    that it fits ``max_memory_gb`` (None: the default limit), trained or evaluated ``batch_size`` images a step."""
    check_memory(space, batch_size, max_memory_gb, training)
    return family_of(space).build_supernet(space, drop_path_rate)


__all__ = ["build_supernet"]
