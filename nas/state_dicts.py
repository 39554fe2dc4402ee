"""Loading another project's weights, renamed to a supernet's names, with one error that names what does not fit
(the converters of ``nas.convert``, ``nas.hybrid.convert`` and ``nas.sam``), and the record of what a conversion
made of each source tensor."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Conversion:
    """What a conversion made, and of what: the supernet, the converted model's subnet (None: every subnet of the
    supernet's space is the source's), and the source's tensors by fate: ``mapped`` (source name -> supernet name),
    ``folded`` (source name -> the supernet tensor it was folded into), ``unused`` (no counterpart) and ``redundant``
    (source name -> why it carries nothing: a tensor the source's own code never reads, or one that it derives and the
    supernet derives alike)."""

    supernet: nn.Module
    arch: Any = None
    mapped: dict[str, str] = field(default_factory=dict)
    folded: dict[str, str] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    redundant: dict[str, str] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {"mapped": dict(self.mapped), "folded": dict(self.folded), "unused": list(self.unused),
                "redundant": dict(self.redundant)}


def load_converted(model: nn.Module, state: dict[str, Tensor], unexpected: list[str], who: str,
                   error: type[Exception] = ValueError) -> None:
    """Copy ``state`` (renamed to ``model``'s names; ``unexpected``: the source's names that have none) into ``model``,
    or raise ``error`` naming the unexpected, missing and mis-shaped tensors (the first five of each)."""
    target = model.state_dict()
    unexpected = sorted(unexpected + [name for name in state if name not in target])
    missing = sorted(set(target) - set(state))
    shapes = sorted(f"{name}: {tuple(t.shape)} vs {tuple(target[name].shape)}" for name, t in state.items()
                    if name in target and t.shape != target[name].shape)
    if unexpected or missing or shapes:
        problems = [f"{what}: {names[:5]}" for what, names in (("unexpected", unexpected), ("missing", missing),
                                                              ("shape mismatch", shapes)) if names]
        raise error(f"{who}: the weights do not fit a supernet of this space; " + "; ".join(problems))
    with torch.no_grad():
        for name, tensor in state.items():
            target[name].copy_(tensor)


__all__ = ["Conversion", "load_converted"]
