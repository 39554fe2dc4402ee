"""The supernet of a search space, whichever its kind: the ViT supernet of a ``SearchSpace``, the hybrid supernet of a
``HybridSpace``."""
from __future__ import annotations

from .hybrid.space import HybridSpace
from .hybrid.supernet import HybridSupernet, HybridSupernetConfig
from .memory import check_memory
from .space import Space
from .supernet import SupernetConfig, VisionTransformerSupernet


def build_supernet(space: Space, drop_path_rate: float = 0.0, *, batch_size: int = 1, training: bool = False,
                   max_memory_gb: float | None = None) -> VisionTransformerSupernet | HybridSupernet:
    """A freshly initialised supernet holding every subnet of ``space``, once ``nas.memory.check_memory`` has found
    that it fits ``max_memory_gb`` (None: the default limit), trained or evaluated ``batch_size`` images a step."""
    check_memory(space, batch_size, max_memory_gb, training)
    if isinstance(space, HybridSpace):
        return HybridSupernet(HybridSupernetConfig(space, drop_path_rate=drop_path_rate))
    return VisionTransformerSupernet(SupernetConfig.from_space(space, drop_path_rate=drop_path_rate))


__all__ = ["build_supernet"]
