"""The supernet of a search space, whichever its family (``nas.family``)."""
from __future__ import annotations

from torch import nn

from .family import Space, family_of


def build_supernet(space: Space, drop_path_rate: float = 0.0) -> nn.Module:
    """A freshly initialised supernet holding every subnet of ``space``."""
    return family_of(space).build_supernet(space, drop_path_rate)


__all__ = ["build_supernet"]
