"""The supernet of a search space, whichever its kind: the ViT supernet of a ``SearchSpace``, the hybrid supernet of a
``HybridSpace``, SAM's encoder of a ``SamSpace``."""
from __future__ import annotations

from .hybrid.space import HybridSpace
from .hybrid.supernet import HybridSupernet, HybridSupernetConfig
from .sam.space import SamSpace
from .space import Space
from .supernet import SupernetConfig, VisionTransformerSupernet


def build_supernet(space: Space, drop_path_rate: float = 0.0) -> VisionTransformerSupernet | HybridSupernet:
    """A freshly initialised supernet holding every subnet of ``space``."""
    if isinstance(space, SamSpace):
        from .sam.supernet import SamEncoderConfig, SamEncoderSupernet  # it reads checkpoints, which build supernets

        return SamEncoderSupernet(SamEncoderConfig.from_space(space, drop_path_rate=drop_path_rate))
    if isinstance(space, HybridSpace):
        return HybridSupernet(HybridSupernetConfig(space, drop_path_rate=drop_path_rate))
    return VisionTransformerSupernet(SupernetConfig.from_space(space, drop_path_rate=drop_path_rate))


__all__ = ["build_supernet"]
