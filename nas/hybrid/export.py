"""A saved hybrid subnet rebuilt: the plain network of an arch of a space, its weights to be loaded.

``nas.export.save_subnet`` stores a hybrid subnet's space and arch with its weights; the plain network's structure is
what :meth:`HybridSupernet.extract` gives for that arch. The loader extracts it from the supernet of the space
narrowed to the arch's own choices (:func:`narrowed`), which holds the arch's modules and nothing else, built on the
meta device (no memory, no initialisation), and gives it empty storage.
"""
from __future__ import annotations

import dataclasses

import torch

from elastic_ops.plain_hybrid import HybridNetwork

from .arch import HybridArch
from .space import HybridSpace, StageChoices
from .style import STYLES
from .supernet import HybridSupernet, HybridSupernetConfig


def narrowed(space: HybridSpace, arch: HybridArch) -> HybridSpace:
    """``space`` with each stage's choices narrowed to ``arch``'s (kernel sizes and V-scales where they apply). The
    resolutions stay: the largest sets the size of the relative position tables and of the token MLPs."""
    space.validate(arch)
    vscale = STYLES[space.style].v_scale
    stages = tuple(StageChoices(ops=(s.op,), depths=(s.depth,), channels=(s.channels,), expansions=(s.expansion,),
                                kernel_sizes=(s.kernel_size,) if s.op == "conv" else choices.kernel_sizes,
                                v_scales=(s.v_scale,) if s.op == "attention" and vscale else (), dsms=(s.dsm,),
                                stride=choices.stride, se=choices.se)
                   for s, choices in zip(arch.stages, space.stages))
    return dataclasses.replace(space, stages=stages)


def rebuild(space: HybridSpace, arch: HybridArch, device: torch.device | str = "cpu") -> HybridNetwork:
    """The plain network of ``arch`` (validated against ``space``) with uninitialised weights on ``device``."""
    with torch.device("meta"):
        skeleton = HybridSupernet(HybridSupernetConfig(narrowed(space, arch))).extract(arch)
    return skeleton.to_empty(device=device)


__all__ = ["narrowed", "rebuild"]
