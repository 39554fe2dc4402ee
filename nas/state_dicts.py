"""Loading another project's weights, renamed to a supernet's names, with one error that names what does not fit
(the converters of ``nas.convert``, ``nas.hybrid.convert`` and ``nas.sam``)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


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


__all__ = ["load_converted"]
