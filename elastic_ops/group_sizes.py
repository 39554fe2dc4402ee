"""The size table of K subnets run together (DESIGN.md section 3, batched mode)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class GroupSizes:
    """Active size of one elastic dimension for each of K subnets.

    ``values``: host tuple; ``width``: the largest (the padded width of the stacked activations);
    ``table``: int32 tensor ``[K]`` on the device, for grouped kernels.
    """

    def __init__(self, values: Sequence[int], device: torch.device | str):
        self.values = tuple(int(v) for v in values)
        if not self.values or min(self.values) < 1:
            raise ValueError(f"GroupSizes: every subnet needs an active size >= 1, got {self.values}")
        self.width = max(self.values)
        self.uniform = min(self.values) == self.width
        self.table = torch.tensor(self.values, dtype=torch.int32, device=device)
        self._masks: dict[tuple[torch.dtype, int], Tensor] = {}
        self._scaled: dict[int, GroupSizes] = {}

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        return f"GroupSizes({list(self.values)})"

    def scaled(self, factor: int) -> "GroupSizes":
        """Sizes in units ``factor`` times smaller: heads -> channels of the attention context."""
        if factor not in self._scaled:
            self._scaled[factor] = GroupSizes([v * factor for v in self.values], self.table.device)
        return self._scaled[factor]

    def mask(self, dtype: torch.dtype, ndim: int) -> Tensor:
        """1 on each subnet's active channels, 0 on its padding; shape ``[K, 1, ..., 1, width]`` (``ndim`` dims)."""
        key = (dtype, ndim)
        if key not in self._masks:
            channels = torch.arange(self.width, device=self.table.device)
            active = (channels[None, :] < self.table[:, None]).to(dtype)
            self._masks[key] = active.view(len(self), *([1] * (ndim - 2)), self.width)
        return self._masks[key]
