"""A saved hybrid subnet rebuilt: the plain network of an arch of a space, its weights to be loaded.

``nas.export.save_subnet`` stores a hybrid subnet's space and arch with its weights; the plain network's structure is
what :meth:`HybridSupernet.extract` gives for that arch, so the loader extracts it from a supernet built on the meta
device (no memory, no computation) and gives it empty storage.
"""
from __future__ import annotations

import torch

from elastic_ops.plain_hybrid import HybridNetwork

from .arch import HybridArch
from .space import HybridSpace
from .supernet import HybridSupernet, HybridSupernetConfig


def rebuild(space: HybridSpace, arch: HybridArch, device: torch.device | str = "cpu") -> HybridNetwork:
    """The plain network of ``arch`` (validated against ``space``) with uninitialised weights on ``device``."""
    with torch.device("meta"):
        skeleton = HybridSupernet(HybridSupernetConfig(space)).extract(arch)
    return skeleton.to_empty(device=device)


__all__ = ["rebuild"]
