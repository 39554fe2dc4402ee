"""A subnet of a SAM encoder supernet: the ViT family's :class:`~nas.vit.arch.Arch` (embed dim, heads and MLP ratio
per layer, layers on or off; one patch size) under the SAM family's name, so that ``nas.family.family_of`` finds the
SAM family from an arch as from its space or supernet."""
from __future__ import annotations

from typing import ClassVar

from ..vit.arch import Arch, ArchBatch


class SamArch(Arch):
    family: ClassVar[str] = "sam"


class SamArchBatch(ArchBatch):
    family: ClassVar[str] = "sam"
    arch_type: ClassVar[type] = SamArch


__all__ = ["SamArch", "SamArchBatch"]
